//! The registry: an immutable snapshot of what is intercepted and where it goes.
//!
//! A snapshot is built whole from a validated [`ConfigSet`] and never mutated, so a
//! reload can later swap it behind one pointer while connections keep the snapshot
//! they started with.

mod hosts;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use serde::Serialize;

pub use hosts::HostTable;
pub(crate) use hosts::{HostPattern, best_match, hosts_overlap};

use crate::config::{
    ConfigSet, Finding, Protocol, Resolution, ServiceEntry, Severity, Source, Sourced,
    VirtualService, WorkloadEntry, WorkloadEntrySpec, WorkloadSelector, object_name, validate,
};

/// A ServiceEntry as the data path uses it.
#[derive(Debug, Serialize)]
pub struct Service {
    /// `ServiceEntry/namespace/name`.
    pub name: String,
    pub source: Source,
    pub hosts: Vec<String>,
    /// IPv4 and IPv6 addresses and CIDRs that identify this service's connections.
    pub addresses: Vec<IpNet>,
    pub resolution: Resolution,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
    /// The endpoints are the service's own hosts (DNS without `endpoints`), so a
    /// connection routed by one host resolves that host only.
    pub endpoints_from_hosts: bool,
    /// Running sums of endpoint weights, for a weighted pick with one binary search.
    #[serde(skip)]
    cumulative_weights: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Port {
    pub number: u16,
    pub name: String,
    #[serde(serialize_with = "serialize_protocol")]
    pub protocol: Protocol,
    /// The port used when an endpoint does not map this port itself: `targetPort`,
    /// or else the port number.
    pub default_endpoint_port: u16,
}

fn serialize_protocol<S: serde::Serializer>(
    protocol: &Protocol,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{protocol:?}"))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointAddress {
    Ip(IpAddr),
    /// Resolved per connection through the DNS cache (DNS and DNS_ROUND_ROBIN).
    Hostname(String),
    /// A filesystem path, or an abstract socket name starting with `@`.
    Unix(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub address: EndpointAddress,
    /// Endpoint ports by service-port name (the WorkloadEntry `ports` map).
    pub ports: HashMap<String, u16>,
    pub weight: u64,
    /// `WorkloadEntry/namespace/name` for an endpoint the service's workloadSelector
    /// chose; inline endpoints have none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_entry: Option<String>,
}

/// A registry lookup: the service and which of its ports the connection targets.
#[derive(Debug, Clone)]
pub struct Route {
    pub service: Arc<Service>,
    pub port: usize,
    /// The host the connection was routed by (SNI, Host header or VirtualService
    /// destination); a DNS service without endpoints resolves this host only.
    pub host: Option<String>,
}

/// What a registry lookup decided from the original destination alone.
#[derive(Debug)]
pub enum Lookup<'a> {
    Route(Route),
    /// Several services share the port without addresses: the TLS SNI or the HTTP
    /// Host header decides.
    ByHost(&'a PortRoutes),
    /// Intercepted, but nothing matches (the config changed since the redirect):
    /// the outbound traffic policy decides.
    Unmatched,
}

/// One weighted choice of where a host-routed connection goes.
#[derive(Debug, Clone)]
pub struct Backend {
    service: usize,
    port: usize,
    /// The host to resolve, when the route names one; `None` means the connection's
    /// own SNI or Host (a wildcard entry).
    host: Option<String>,
    weight: u64,
}

/// How connections to one port-only port are routed.
#[derive(Debug, Default)]
pub struct PortRoutes {
    /// By TLS SNI: TLS and HTTPS ports, and VirtualService `tls` routes.
    pub tls: HostTable<Arc<[Backend]>>,
    /// By HTTP Host header: HTTP-family ports.
    pub http: HostTable<Arc<[Backend]>>,
    /// The oldest opaque (TCP or unset-protocol) service on the port, which takes
    /// what no host matches.
    opaque: Option<(usize, usize)>,
    /// SNI patterns a VirtualService set, which a later VirtualService must not remove
    /// as some service's default route.
    tls_overridden: std::collections::HashSet<String>,
}

/// Which request field routes a port-only connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    Sni,
    Http,
}

/// Picks an index with probability proportional to its weight (the first if all are 0).
pub fn weighted_index(weights: impl Iterator<Item = u64> + Clone) -> usize {
    let total: u64 = weights.clone().sum();
    if total == 0 {
        return 0;
    }
    let mut ticket = rand::random_range(0..total);
    for (index, weight) in weights.enumerate() {
        if ticket < weight {
            return index;
        }
        ticket -= weight;
    }
    0
}

impl PortRoutes {
    fn needs_host(&self) -> bool {
        !self.tls.is_empty() || !self.http.is_empty()
    }
}

impl Route {
    pub fn port(&self) -> &Port {
        &self.service.ports[self.port]
    }
}

/// What the kernel maps must hold for a snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InterceptSet {
    /// (CIDR, port) → rule id.
    pub addresses: Vec<(IpNet, u16, u32)>,
    /// port → rule id, for services without addresses.
    pub ports: Vec<(u16, u32)>,
}

#[derive(Debug, Default)]
pub struct Registry {
    services: Vec<Arc<Service>>,
    /// Per destination port, the address rules grouped by prefix length, longest first,
    /// so a lookup costs one hash probe per distinct prefix length on that port, however
    /// many entries are loaded.
    by_address: HashMap<u16, Vec<PrefixGroup>>,
    /// Per port, how connections to services without addresses are routed.
    by_port: HashMap<u16, PortRoutes>,
    intercepts: InterceptSet,
}

#[derive(Debug)]
struct PrefixGroup {
    /// In IPv6 bits: IPv4 networks are held IPv4-mapped, as the kernel holds them.
    prefix_len: u8,
    /// Network address (host bits cleared) → (service index, port index).
    networks: HashMap<u128, (usize, usize)>,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration cannot be served:\n{}", .findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct BuildError {
    pub findings: Vec<Finding>,
}

/// What a build produced besides the registry: things it ignores, which the caller logs.
pub type BuildWarnings = Vec<Finding>;

impl Registry {
    /// Builds a snapshot from a validated configuration, rejecting what the data path
    /// cannot serve yet. Entries are considered oldest first, so where two claim the
    /// same destination the older one wins, as in Istio.
    pub fn build(config: &ConfigSet) -> Result<(Self, BuildWarnings), BuildError> {
        // Oldest first, in the same order validation uses to say which entry wins.
        let entries = validate::entry_order(&config.service_entries)
            .into_iter()
            .map(|index| &config.service_entries[index]);

        let mut registry = Registry::default();
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        for entry in entries {
            let mut report = |severity, field: String, message: String| {
                let finding = Finding {
                    severity,
                    file: entry.source.file.clone(),
                    document: entry.source.document,
                    object: object_name("ServiceEntry", &entry.resource.metadata),
                    field,
                    message,
                };
                match severity {
                    Severity::Error => errors.push(finding),
                    Severity::Warning => warnings.push(finding),
                }
            };
            if let Some(service) = Service::from_entry(entry, &config.workload_entries, &mut report)
            {
                registry.add(service);
            }
        }
        for virtual_service in &config.virtual_services {
            registry.add_virtual_service(virtual_service, &mut warnings);
        }
        if !errors.is_empty() {
            return Err(BuildError { findings: errors });
        }
        for groups in registry.by_address.values_mut() {
            groups.sort_by_key(|group| std::cmp::Reverse(group.prefix_len));
        }
        Ok((registry, warnings))
    }

    fn add(&mut self, service: Service) {
        let index = self.services.len();
        let rule_id = index as u32;
        let addresses = service.addresses.clone();
        for (port_index, port) in service.ports.iter().enumerate() {
            if addresses.is_empty() {
                if !self.by_port.contains_key(&port.number) {
                    self.intercepts.ports.push((port.number, rule_id));
                }
                let routes = self.by_port.entry(port.number).or_default();
                let table = if port.protocol.is_tls() {
                    &mut routes.tls
                } else if port.protocol.is_http() {
                    &mut routes.http
                } else {
                    routes.opaque.get_or_insert((index, port_index));
                    continue;
                };
                for host in &service.hosts {
                    let backend = Backend {
                        service: index,
                        port: port_index,
                        host: (!host.starts_with('*')).then(|| host.clone()),
                        weight: 1,
                    };
                    table.insert_if_absent(host, Arc::from([backend]));
                }
                continue;
            }
            for network in &addresses {
                let prefix_len = mapped_prefix_len(network);
                let groups = self.by_address.entry(port.number).or_default();
                let group = match groups
                    .iter_mut()
                    .position(|group| group.prefix_len == prefix_len)
                {
                    Some(position) => &mut groups[position],
                    None => {
                        groups.push(PrefixGroup {
                            prefix_len,
                            networks: HashMap::new(),
                        });
                        groups.last_mut().expect("just pushed")
                    }
                };
                // An older entry already claims this address and port; validation has
                // warned about it, naming the winner.
                let std::collections::hash_map::Entry::Vacant(slot) =
                    group.networks.entry(mapped_bits(network.network()))
                else {
                    continue;
                };
                slot.insert((index, port_index));
                self.intercepts
                    .addresses
                    .push((*network, port.number, rule_id));
            }
        }
        self.services.push(Arc::new(service));
    }

    /// Applies a VirtualService's `tls` routes: for the SNI hosts it matches, on the
    /// port-only TLS ports of the services it applies to, its destinations replace the
    /// services' own SNI routes. As in Istio, once a VirtualService matches on a port,
    /// the default SNI routes of the services it covers are not generated there.
    fn add_virtual_service(
        &mut self,
        source: &Sourced<VirtualService>,
        warnings: &mut Vec<Finding>,
    ) {
        let virtual_service = &source.resource;
        if !virtual_service.spec.applies_to_mesh() || virtual_service.spec.tls.is_empty() {
            return;
        }
        let name = object_name("VirtualService", &virtual_service.metadata);
        let covered: Vec<usize> = self
            .services
            .iter()
            .enumerate()
            .filter(|(_, service)| {
                service.hosts.iter().any(|host| {
                    virtual_service
                        .spec
                        .hosts
                        .iter()
                        .any(|vs_host| hosts_overlap(host, vs_host))
                })
            })
            .map(|(index, _)| index)
            .collect();
        for (route_index, route) in virtual_service.spec.tls.iter().enumerate() {
            for tls_match in &route.matches {
                let ports: Vec<u16> = covered
                    .iter()
                    .flat_map(|&index| {
                        let service = &self.services[index];
                        service
                            .ports
                            .iter()
                            .filter(|port| port.protocol.is_tls() && service.addresses.is_empty())
                            .map(|port| port.number)
                            .collect::<Vec<_>>()
                    })
                    .filter(|number| tls_match.port == 0 || u64::from(*number) == tls_match.port)
                    .collect();
                for listener_port in ports {
                    let mut backends = Vec::new();
                    for (destination_index, destination) in route.route.iter().enumerate() {
                        let Some(target) = &destination.destination else {
                            continue;
                        };
                        let port_number = target
                            .port
                            .and_then(|selector| u16::try_from(selector.number).ok())
                            .filter(|number| *number != 0)
                            .unwrap_or(listener_port);
                        match self.destination_backend(&name, &target.host, port_number) {
                            Some((service, port)) => backends.push(Backend {
                                service,
                                port,
                                host: (!target.host.starts_with('*')).then(|| target.host.clone()),
                                // A lone destination takes all traffic whatever its weight.
                                weight: if route.route.len() == 1 { 1 } else { destination.weight.max(0) as u64 },
                            }),
                            None => warnings.push(Finding {
                                severity: Severity::Warning,
                                file: source.source.file.clone(),
                                document: source.source.document,
                                object: name.clone(),
                                field: format!("spec.tls[{route_index}].route[{destination_index}].destination.port"),
                                message: format!("{} has no port {port_number}; this destination is ignored", target.host),
                            }),
                        }
                    }
                    if backends.iter().all(|backend| backend.weight == 0) {
                        continue;
                    }
                    let backends: Arc<[Backend]> = Arc::from(backends);
                    let Some(routes) = self.by_port.get_mut(&listener_port) else {
                        continue;
                    };
                    // Istio makes one service per host, so only the hosts this
                    // VirtualService covers lose their default route.
                    for &index in &covered {
                        for host in &self.services[index].hosts {
                            let covered_host = virtual_service
                                .spec
                                .hosts
                                .iter()
                                .any(|vs_host| hosts_overlap(host, vs_host));
                            if covered_host && !routes.tls_overridden.contains(host) {
                                routes.tls.remove(host);
                            }
                        }
                    }
                    for sni in &tls_match.sni_hosts {
                        routes.tls.insert(sni, Arc::clone(&backends));
                        routes.tls_overridden.insert(sni.clone());
                    }
                }
            }
        }
    }

    /// The service a VirtualService destination host names: a ServiceEntry host
    /// (exact first, then a wildcard), or else a DNS name resolved as it is.
    fn destination_backend(
        &mut self,
        owner: &str,
        host: &str,
        port: u16,
    ) -> Option<(usize, usize)> {
        let by_name = |exact: bool| {
            self.services.iter().position(|service| {
                service.hosts.iter().any(|candidate| {
                    let candidate = HostPattern::new(candidate);
                    if exact {
                        candidate.same(HostPattern::new(host))
                    } else {
                        candidate.overlaps(HostPattern::new(host))
                    }
                })
            })
        };
        if let Some(index) = by_name(true).or_else(|| by_name(false)) {
            let port_index = self.services[index]
                .ports
                .iter()
                .position(|p| p.number == port)?;
            return Some((index, port_index));
        }
        let service = Service {
            name: format!("{owner} destination {host}"),
            source: self
                .services
                .first()
                .map(|s| s.source.clone())
                .unwrap_or(Source {
                    file: Default::default(),
                    document: 0,
                }),
            hosts: vec![host.to_owned()],
            addresses: Vec::new(),
            resolution: Resolution::Dns,
            ports: vec![Port {
                number: port,
                name: "tls".into(),
                protocol: Protocol::Tls,
                default_endpoint_port: port,
            }],
            endpoints: vec![Endpoint::hostname(host)],
            endpoints_from_hosts: true,
            cumulative_weights: vec![1],
        };
        self.services.push(Arc::new(service));
        Some((self.services.len() - 1, 0))
    }

    /// Decides what it can from the original destination: the longest address prefix on
    /// that port first, then the port-only routes of the port.
    pub fn lookup(&self, destination: SocketAddr) -> Lookup<'_> {
        let port = destination.port();
        let address = mapped_bits(destination.ip());
        let by_address = self.by_address.get(&port).and_then(|groups| {
            groups.iter().find_map(|group| {
                let mask = prefix_mask(group.prefix_len);
                group.networks.get(&(address & mask)).copied()
            })
        });
        if let Some((service, port)) = by_address {
            return Lookup::Route(self.route_to(service, port, None));
        }
        match self.by_port.get(&port) {
            Some(routes) if routes.needs_host() => Lookup::ByHost(routes),
            Some(PortRoutes {
                opaque: Some((service, port)),
                ..
            }) => Lookup::Route(self.route_to(*service, *port, None)),
            _ => Lookup::Unmatched,
        }
    }

    /// Routes a port-only connection by the host it named (TLS SNI or HTTP Host),
    /// falling back to the port's opaque service. `None`: nothing matches, and the
    /// outbound traffic policy decides.
    pub fn route_by_host(
        &self,
        routes: &PortRoutes,
        table: HostKind,
        host: Option<&str>,
    ) -> Option<Route> {
        let table = match table {
            HostKind::Sni => &routes.tls,
            HostKind::Http => &routes.http,
        };
        if let Some(backends) = host.and_then(|host| table.lookup(host)) {
            let chosen = &backends[weighted_index(backends.iter().map(|backend| backend.weight))];
            let routed_host = chosen.host.clone().or_else(|| host.map(str::to_owned));
            return Some(self.route_to(chosen.service, chosen.port, routed_host));
        }
        let (service, port) = routes.opaque?;
        Some(self.route_to(service, port, None))
    }

    fn route_to(&self, service: usize, port: usize, host: Option<String>) -> Route {
        Route {
            service: Arc::clone(&self.services[service]),
            port,
            host,
        }
    }

    /// The route for a destination when no host is known: address or opaque port
    /// routes only. For tests and callers that never sniff.
    pub fn route(&self, destination: SocketAddr) -> Option<Route> {
        match self.lookup(destination) {
            Lookup::Route(route) => Some(route),
            Lookup::ByHost(routes) => self.route_by_host(routes, HostKind::Sni, None),
            Lookup::Unmatched => None,
        }
    }

    pub fn intercepts(&self) -> &InterceptSet {
        &self.intercepts
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }
}

fn prefix_mask(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

/// An address in one space for both families: IPv4 mapped into IPv6 (::ffff:a.b.c.d),
/// so an IPv4 destination never matches an IPv6 network and the other way round.
fn mapped_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(ip) => u128::from(ip.to_ipv6_mapped()),
        IpAddr::V6(ip) => u128::from(ip),
    }
}

fn mapped_prefix_len(network: &IpNet) -> u8 {
    match network {
        IpNet::V4(network) => 96 + network.prefix_len(),
        IpNet::V6(network) => network.prefix_len(),
    }
}

/// Istio's annotation that makes a WorkloadEntry's `Healthy` condition count.
const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";

impl Endpoint {
    /// A host the proxy resolves itself, with the service's default ports.
    pub fn hostname(host: &str) -> Endpoint {
        Endpoint {
            address: EndpointAddress::Hostname(host.to_owned()),
            ports: HashMap::new(),
            weight: 1,
            workload_entry: None,
        }
    }

    /// An endpoint from a WorkloadEntry spec, inline or standalone; `field` locates
    /// it in findings.
    fn from_spec(
        endpoint: &WorkloadEntrySpec,
        resolution: Resolution,
        field: &str,
        report: &mut impl FnMut(Severity, String, String),
    ) -> Option<Endpoint> {
        let address = if let Some(path) = endpoint.unix_socket_path() {
            EndpointAddress::Unix(path.to_owned())
        } else if let Ok(ip) = endpoint.address.parse::<IpAddr>() {
            EndpointAddress::Ip(ip)
        } else if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
            EndpointAddress::Hostname(endpoint.address.clone())
        } else {
            report(
                Severity::Error,
                format!("{field}.address"),
                format!(
                    "endpoint address {:?} is not a valid IP address",
                    endpoint.address
                ),
            );
            return None;
        };
        let mut ports = HashMap::new();
        for (name, number) in &endpoint.ports {
            match u16::try_from(*number) {
                Ok(number) if number != 0 => {
                    ports.insert(name.clone(), number);
                }
                _ => report(
                    Severity::Error,
                    format!("{field}.ports.{name}"),
                    format!("port number {number} must be in the range 1..65535"),
                ),
            }
        }
        Some(Endpoint {
            address,
            ports,
            weight: endpoint.load_balancing_weight(),
            workload_entry: None,
        })
    }
}

/// The endpoints a ServiceEntry's workloadSelector chooses, as Istio does: the
/// WorkloadEntries in the entry's namespace whose labels (metadata labels over spec
/// labels) include every selector label, oldest first. Pods cannot be selected: a
/// node-level proxy reading files has no view of the cluster's pods.
fn selected_endpoints(
    entry: &Sourced<ServiceEntry>,
    selector: &WorkloadSelector,
    workload_entries: &[Sourced<WorkloadEntry>],
    report: &mut impl FnMut(Severity, String, String),
) -> Vec<Endpoint> {
    let spec = &entry.resource.spec;
    if spec.resolution == Resolution::None {
        // NONE forwards to the original destination; validation already warned.
        return Vec::new();
    }
    let namespace = entry.resource.metadata.namespace();
    let in_namespace: Vec<&Sourced<WorkloadEntry>> = workload_entries
        .iter()
        .filter(|workload| workload.resource.metadata.namespace() == namespace)
        .collect();
    let order = validate::oldest_first(in_namespace.iter().map(|w| &w.resource.metadata));
    let mut endpoints = Vec::new();
    for workload in order.into_iter().map(|index| in_namespace[index]) {
        let metadata = &workload.resource.metadata;
        let workload_spec = &workload.resource.spec;
        let label = |key: &String| metadata.labels.get(key).or(workload_spec.labels.get(key));
        if !selector
            .labels
            .iter()
            .all(|(key, value)| label(key) == Some(value))
        {
            continue;
        }
        let name = object_name("WorkloadEntry", metadata);
        let field = format!("spec.workloadSelector ({name})");
        let dns = matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        if workload_spec.address.is_empty() {
            report(
                Severity::Warning,
                field,
                "not used: it has no address (reaching it through its network's gateway is not supported)".into(),
            );
            continue;
        }
        if !dns && workload_spec.address.parse::<IpAddr>().is_err() {
            // Istio selects hostname and unix-socket WorkloadEntries for DNS services only.
            report(
                Severity::Warning,
                field,
                format!(
                    "not used: its address {:?} is not an IP, and only DNS and DNS_ROUND_ROBIN entries select such workloads",
                    workload_spec.address
                ),
            );
            continue;
        }
        if !is_healthy(&workload.resource) {
            report(
                Severity::Warning,
                field,
                format!(
                    "not used: {HEALTH_CHECKS_ANNOTATION} is true and its Healthy condition is not True"
                ),
            );
            continue;
        }
        if let Some(mut endpoint) =
            Endpoint::from_spec(workload_spec, spec.resolution, &field, report)
        {
            endpoint.workload_entry = Some(name);
            endpoints.push(endpoint);
        }
    }
    if endpoints.is_empty() {
        report(
            Severity::Warning,
            "spec.workloadSelector".into(),
            format!(
                "selects no usable WorkloadEntry in namespace {namespace}; connections to it are refused until one is added (Pods are not visible to this proxy)"
            ),
        );
    }
    endpoints
}

/// A WorkloadEntry whose health checks are enabled counts only once its `Healthy`
/// condition is True, as in Istio; others are always healthy.
fn is_healthy(workload: &WorkloadEntry) -> bool {
    let checked = workload
        .metadata
        .annotations
        .get(HEALTH_CHECKS_ANNOTATION)
        .is_some_and(|value| value.eq_ignore_ascii_case("true"));
    if !checked {
        return true;
    }
    let conditions = workload
        .status
        .as_ref()
        .and_then(|status| status.get("conditions"))
        .and_then(serde_yaml::Value::as_sequence);
    conditions.into_iter().flatten().any(|condition| {
        condition.get("type").and_then(serde_yaml::Value::as_str) == Some("Healthy")
            && condition.get("status").and_then(serde_yaml::Value::as_str) == Some("True")
    })
}

impl Service {
    fn from_entry(
        entry: &Sourced<ServiceEntry>,
        workload_entries: &[Sourced<WorkloadEntry>],
        report: &mut impl FnMut(Severity, String, String),
    ) -> Option<Service> {
        let spec = &entry.resource.spec;
        if spec.resolution == Resolution::DynamicDns {
            report(
                Severity::Error,
                "spec.resolution".into(),
                "DYNAMIC_DNS needs an egress waypoint, which this proxy is not".into(),
            );
            return None;
        }
        let mut addresses = Vec::new();
        for (index, raw) in spec.addresses.iter().enumerate() {
            match parse_address(raw) {
                Some(network) => addresses.push(network.trunc()),
                None => report(
                    Severity::Error,
                    format!("spec.addresses[{index}]"),
                    format!("{raw} is not a valid IP or CIDR"),
                ),
            }
        }

        let mut ports = Vec::new();
        for (index, port) in spec.ports.iter().enumerate() {
            let (Ok(number), Ok(default_endpoint_port)) = (
                u16::try_from(port.number),
                u16::try_from(port.default_endpoint_port()),
            ) else {
                report(
                    Severity::Error,
                    format!("spec.ports[{index}]"),
                    "port out of range".into(),
                );
                continue;
            };
            let protocol = port.protocol();
            if protocol == Protocol::Udp {
                report(
                    Severity::Warning,
                    format!("spec.ports[{index}].protocol"),
                    "UDP ports are not intercepted".into(),
                );
                continue;
            }
            ports.push(Port {
                number,
                name: port.name.clone(),
                protocol,
                default_endpoint_port,
            });
        }

        let mut endpoints = Vec::new();
        for (index, endpoint) in spec.endpoints().iter().enumerate() {
            let field = format!("spec.endpoints[{index}]");
            if let Some(endpoint) = Endpoint::from_spec(endpoint, spec.resolution, &field, report) {
                endpoints.push(endpoint);
            }
        }
        if let Some(selector) = &spec.workload_selector {
            endpoints.extend(selected_endpoints(
                entry,
                selector,
                workload_entries,
                report,
            ));
        }
        // Without endpoints, a DNS service resolves its own hosts, as Istio makes one
        // endpoint per host.
        let endpoints_from_hosts = spec.endpoints().is_empty()
            && spec.workload_selector.is_none()
            && matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        if endpoints_from_hosts {
            endpoints.extend(
                spec.hosts
                    .iter()
                    .filter(|host| !host.starts_with('*'))
                    .map(|host| Endpoint::hostname(host)),
            );
        }
        let cumulative_weights = endpoints
            .iter()
            .scan(0u64, |total, endpoint| {
                *total = total.saturating_add(endpoint.weight);
                Some(*total)
            })
            .collect();

        Some(Service {
            name: object_name("ServiceEntry", &entry.resource.metadata),
            source: entry.source.clone(),
            hosts: spec.hosts.clone(),
            resolution: spec.resolution,
            ports,
            endpoints,
            endpoints_from_hosts,
            cumulative_weights,
            addresses,
        })
    }

    /// Picks an endpoint with probability proportional to its weight.
    pub fn pick_endpoint(&self) -> Option<&Endpoint> {
        let total = *self.cumulative_weights.last()?;
        let ticket = rand::random_range(0..total);
        let index = self
            .cumulative_weights
            .partition_point(|&running| running <= ticket);
        self.endpoints.get(index)
    }
}

/// Go's ParsePrefix accepts host bits after the prefix (`172.1.2.16/16`); so does this.
fn parse_address(raw: &str) -> Option<IpNet> {
    if raw.contains('/') {
        raw.parse::<IpNet>().ok()
    } else {
        raw.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;

    use crate::config::{ConfigSet, Source, Sourced};

    pub fn config(documents: &[&str]) -> ConfigSet {
        ConfigSet {
            service_entries: documents
                .iter()
                .enumerate()
                .map(|(document, yaml)| Sourced {
                    source: Source {
                        file: PathBuf::from("test.yaml"),
                        document,
                    },
                    resource: serde_yaml::from_str(yaml).expect("valid ServiceEntry"),
                })
                .collect(),
            ..ConfigSet::default()
        }
    }

    pub fn entry(name: &str, extra: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}.example]\n{extra}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};

    fn route_name(registry: &Registry, destination: &str) -> Option<String> {
        registry
            .route(destination.parse().unwrap())
            .map(|route| route.service.name.clone())
    }

    #[test]
    fn the_longest_prefix_on_the_destination_port_wins() {
        let wide = entry(
            "wide",
            "  addresses: [198.18.0.0/16]\n  ports: [{number: 80, name: http}]\n",
        );
        let narrow = entry(
            "narrow",
            "  addresses: [198.18.5.0/24]\n  ports: [{number: 80, name: http}]\n",
        );
        let other_port = entry(
            "other-port",
            "  addresses: [198.18.5.7]\n  ports: [{number: 81, name: http}]\n",
        );
        let (registry, warnings) =
            Registry::build(&config(&[&wide, &narrow, &other_port])).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let name = |destination| route_name(&registry, destination);
        assert_eq!(
            name("198.18.5.7:80").as_deref(),
            Some("ServiceEntry/default/narrow")
        );
        assert_eq!(
            name("198.18.6.7:80").as_deref(),
            Some("ServiceEntry/default/wide")
        );
        assert_eq!(
            name("198.18.5.7:81").as_deref(),
            Some("ServiceEntry/default/other-port")
        );
        assert_eq!(name("198.19.0.1:80"), None);
        assert_eq!(name("198.18.6.7:81"), None);
    }

    #[test]
    fn each_family_matches_only_its_own_networks() {
        let every_ipv6 = entry(
            "every-ipv6",
            "  addresses: [\"::/0\"]\n  ports: [{number: 80, name: http}]\n",
        );
        let every_ipv4 = entry(
            "every-ipv4",
            "  addresses: [0.0.0.0/0]\n  ports: [{number: 80, name: http}]\n",
        );
        let narrow_ipv6 = entry(
            "narrow-ipv6",
            "  addresses: [\"2001:2::/64\"]\n  ports: [{number: 80, name: http}]\n",
        );
        let (registry, warnings) =
            Registry::build(&config(&[&every_ipv6, &every_ipv4, &narrow_ipv6])).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let name = |destination| route_name(&registry, destination);
        assert_eq!(
            name("198.18.0.1:80").as_deref(),
            Some("ServiceEntry/default/every-ipv4")
        );
        assert_eq!(
            name("[2001:2::7]:80").as_deref(),
            Some("ServiceEntry/default/narrow-ipv6")
        );
        assert_eq!(
            name("[2001:3::7]:80").as_deref(),
            Some("ServiceEntry/default/every-ipv6")
        );
        assert_eq!(name("[2001:2::7]:81"), None);
    }

    #[test]
    fn the_oldest_entry_wins_a_shared_port_and_a_shared_address() {
        let newer = entry(
            "newer",
            "  addresses: [240.240.0.1]\n  ports: [{number: 5432, name: tcp}]\n",
        )
        .replace(
            "name: newer}",
            "name: newer, creationTimestamp: '2024-02-01T00:00:00Z'}",
        );
        let older = entry(
            "older",
            "  addresses: [240.240.0.1]\n  ports: [{number: 5432, name: tcp}]\n",
        )
        .replace(
            "name: older}",
            "name: older, creationTimestamp: '2023-01-01T00:00:00Z'}",
        );
        let (registry, warnings) = Registry::build(&config(&[&newer, &older])).unwrap();
        assert_eq!(
            route_name(&registry, "240.240.0.1:5432").as_deref(),
            Some("ServiceEntry/default/older")
        );
        assert!(
            warnings.is_empty(),
            "validation reports conflicts: {warnings:?}"
        );
        assert_eq!(registry.intercepts().addresses.len(), 1);

        let first = entry("first", "  ports: [{number: 6379, name: redis}]\n");
        let second = entry("second", "  ports: [{number: 6379, name: redis}]\n");
        let (registry, _) = Registry::build(&config(&[&first, &second])).unwrap();
        assert_eq!(
            route_name(&registry, "198.18.0.1:6379").as_deref(),
            Some("ServiceEntry/default/first")
        );
        assert_eq!(registry.intercepts().ports, vec![(6379, 0)]);
    }

    #[test]
    fn weighted_picks_follow_the_weights_and_zero_counts_as_one() {
        let service = entry(
            "weighted",
            "  addresses: [240.240.0.3]\n  resolution: STATIC\n  ports: [{number: 80, name: http}]\n  endpoints:\n  - {address: 198.18.0.1, weight: 9}\n  - {address: 198.18.0.2, weight: 0}\n",
        );
        let (registry, _) = Registry::build(&config(&[&service])).unwrap();
        let service = &registry.services()[0];
        let heavy = (0..10_000)
            .filter(|_| {
                service.pick_endpoint().unwrap().address
                    == EndpointAddress::Ip("198.18.0.1".parse().unwrap())
            })
            .count();
        // Expected 9000; ±300 is ten standard deviations.
        assert!((8_700..=9_300).contains(&heavy), "{heavy}");
    }

    /// `body` continues `metadata` (indented lines) and then gives `spec` and `status`.
    fn workload(name: &str, namespace: &str, body: &str) -> Sourced<WorkloadEntry> {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{body}"
        );
        Sourced {
            source: Source {
                file: "workloads.yaml".into(),
                document: 0,
            },
            resource: serde_yaml::from_str(&yaml).expect("valid WorkloadEntry"),
        }
    }

    #[test]
    fn a_workload_selector_chooses_matching_workload_entries_in_its_namespace() {
        let selecting = |resolution: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: data}}\nspec:\n  hosts: [db.example]\n  addresses: [240.240.0.5]\n  ports: [{{number: 5432, name: pg}}]\n  resolution: {resolution}\n  workloadSelector: {{labels: {{app: db}}}}\n"
            )
        };
        let static_entry = selecting("STATIC");
        let mut config = config(&[&static_entry]);
        config.workload_entries = vec![
            // Created later than vm-b, so it comes second.
            workload(
                "vm-a",
                "data",
                "  creationTimestamp: '2026-01-02T00:00:00Z'\nspec: {address: 198.18.0.1, labels: {app: db}, weight: 3, ports: {pg: 6432}}",
            ),
            // Metadata labels win over spec labels.
            workload(
                "vm-b",
                "data",
                "  creationTimestamp: '2026-01-01T00:00:00Z'\n  labels: {app: db}\nspec: {address: 198.18.0.2, labels: {app: web}}",
            ),
            workload(
                "vm-web",
                "data",
                "spec: {address: 198.18.0.3, labels: {app: web}}",
            ),
            workload(
                "vm-elsewhere",
                "other",
                "spec: {address: 198.18.0.4, labels: {app: db}}",
            ),
            workload(
                "vm-unhealthy",
                "data",
                "  annotations: {proxy.istio.io/health-checks-enabled: 'true'}\nspec: {address: 198.18.0.5, labels: {app: db}}",
            ),
            workload(
                "vm-healthy",
                "data",
                "  annotations: {proxy.istio.io/health-checks-enabled: 'true'}\nspec: {address: 198.18.0.6, labels: {app: db}}\nstatus: {conditions: [{type: Healthy, status: 'True'}]}",
            ),
            workload(
                "vm-named",
                "data",
                "spec: {address: db.vm.example, labels: {app: db}}",
            ),
        ];
        let (registry, warnings) = Registry::build(&config).unwrap();
        let service = registry
            .route("240.240.0.5:5432".parse().unwrap())
            .unwrap()
            .service;
        let chosen: Vec<(&str, &EndpointAddress, Option<u16>, u64)> = service
            .endpoints
            .iter()
            .map(|endpoint| {
                (
                    endpoint.workload_entry.as_deref().unwrap(),
                    &endpoint.address,
                    endpoint.ports.get("pg").copied(),
                    endpoint.weight,
                )
            })
            .collect();
        let ip = |text: &str| EndpointAddress::Ip(text.parse().unwrap());
        assert_eq!(
            chosen,
            [
                ("WorkloadEntry/data/vm-b", &ip("198.18.0.2"), None, 1),
                ("WorkloadEntry/data/vm-a", &ip("198.18.0.1"), Some(6432), 3),
                ("WorkloadEntry/data/vm-healthy", &ip("198.18.0.6"), None, 1),
            ]
        );
        assert!(!service.endpoints_from_hosts);
        let said = |needle: &str| warnings.iter().any(|w| w.field.contains(needle));
        assert!(said("vm-unhealthy") && said("vm-named"), "{warnings:?}");
        assert!(!said("vm-web") && !said("vm-elsewhere"), "{warnings:?}");

        // A DNS entry also selects workloads addressed by hostname, and resolves no
        // endpoint of its own hosts.
        config.service_entries = super::test_support::config(&[&selecting("DNS")]).service_entries;
        let (registry, _) = Registry::build(&config).unwrap();
        let service = registry
            .route("240.240.0.5:5432".parse().unwrap())
            .unwrap()
            .service;
        assert!(
            service
                .endpoints
                .iter()
                .any(|endpoint| endpoint.address
                    == EndpointAddress::Hostname("db.vm.example".into()))
        );
        assert!(
            !service
                .endpoints
                .iter()
                .any(|endpoint| endpoint.address == EndpointAddress::Hostname("db.example".into()))
        );

        // Selecting nothing is served (connections are refused) and warned about.
        config.workload_entries.clear();
        let (registry, warnings) = Registry::build(&config).unwrap();
        assert!(
            registry
                .route("240.240.0.5:5432".parse().unwrap())
                .unwrap()
                .service
                .endpoints
                .is_empty()
        );
        assert!(
            warnings.iter().any(|w| w.field == "spec.workloadSelector"
                && w.message.contains("selects no usable WorkloadEntry")),
            "{warnings:?}"
        );
    }

    #[test]
    fn what_cannot_be_served_is_rejected_with_the_field() {
        let dynamic = entry(
            "dynamic",
            "  resolution: DYNAMIC_DNS\n  ports: [{number: 443, name: tls, protocol: TLS}]\n",
        );
        let error = Registry::build(&config(&[&dynamic])).unwrap_err();
        assert_eq!(error.findings[0].field, "spec.resolution");
        assert!(
            error.to_string().contains("test.yaml: document 0"),
            "{error}"
        );
    }

    #[test]
    fn virtual_service_tls_routes_override_sni_and_split_by_weight() {
        let mut config = config(&[
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: apis}\nspec:\n  hosts: [api.example.com, \"*.example.org\"]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: NONE\n",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: blue}\nspec:\n  hosts: [blue.internal]\n  addresses: [240.240.0.7]\n  ports: [{number: 8443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.0.7}]\n",
        ]);
        config.virtual_services.push(Sourced {
            source: Source {
                file: std::path::PathBuf::from("vs.yaml"),
                document: 0,
            },
            resource: serde_yaml::from_str(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: split}\nspec:\n  hosts: [\"*.example.org\"]\n  tls:\n  - match: [{sniHosts: [www.example.org], port: 443}]\n    route:\n    - {destination: {host: blue.internal, port: {number: 8443}}, weight: 80}\n    - {destination: {host: green.external}, weight: 20}\n",
            )
            .unwrap(),
        });
        let (registry, warnings) = Registry::build(&config).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let Lookup::ByHost(routes) = registry.lookup("198.18.9.9:443".parse().unwrap()) else {
            panic!("port 443 is routed by host");
        };
        let route = |sni: &str| registry.route_by_host(routes, HostKind::Sni, Some(sni));
        assert_eq!(
            route("api.example.com").unwrap().service.name,
            "ServiceEntry/default/apis"
        );
        // The VirtualService covers *.example.org, so its default SNI route is gone.
        assert!(route("other.example.org").is_none());
        let mut blue = 0;
        for _ in 0..1_000 {
            let chosen = route("www.example.org").unwrap();
            if chosen.service.name == "ServiceEntry/default/blue" {
                assert_eq!(chosen.port().number, 8443);
                blue += 1;
            } else {
                assert_eq!(chosen.host.as_deref(), Some("green.external"));
                assert_eq!(chosen.service.resolution, Resolution::Dns);
                assert_eq!(chosen.port().number, 443);
            }
        }
        // 800 expected; ±80 is more than six standard deviations.
        assert!((720..=880).contains(&blue), "{blue}");
    }
}
