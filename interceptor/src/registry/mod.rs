//! The registry: an immutable snapshot of what is intercepted and where it goes.
//!
//! A snapshot is built whole from a validated [`ConfigSet`] and never mutated, so a
//! reload can later swap it behind one pointer while connections keep the snapshot
//! they started with.
//!
//! This module holds the snapshot, its build and its lookups; each kind of object
//! has its own: `services` (ServiceEntries), `workloads` (WorkloadEntry selection),
//! `virtual_services` (TLS route overrides), `addresses` (the address table) and
//! `hosts` (the host tables and the one host matcher).

mod addresses;
mod allocation;
mod destination_rules;
mod hosts;
mod services;
mod virtual_services;
mod workloads;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use ipnet::IpNet;

pub use self::allocation::{Allocations, StateError, StateFile};
use self::allocation::{OPT_OUT_LABEL, Ranges};
pub use self::destination_rules::UpstreamPolicy;
pub(crate) use self::hosts::{HostPattern, best_match, host_subset_of, hosts_overlap};
use self::{addresses::AddressTable, destination_rules::DestinationRules};
pub use self::{
    hosts::HostTable,
    services::{Endpoint, EndpointAddress, Port, Service},
};
use crate::config::{
    ConfigSet, Finding, Resolution, ServiceEntry, Severity, Sourced, object_name, validate,
};

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
    /// `VirtualService/namespace/name` when a VirtualService route put it here.
    virtual_service: Option<Arc<str>>,
}

/// One weighted choice a host-routed connection may take, for `interceptor explain`.
#[derive(Debug, Clone)]
pub struct Choice {
    pub route: Route,
    pub weight: u64,
    pub virtual_service: Option<Arc<str>>,
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
    tls_overridden: HashSet<String>,
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

    /// The DestinationRule policy for this port, if a rule covers the service.
    pub fn upstream_policy(&self) -> Option<&Arc<UpstreamPolicy>> {
        self.service.upstream.get(self.port)?.as_ref()
    }
}

/// What the kernel maps must hold for a snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InterceptSet {
    /// (CIDR, port) → rule id.
    pub addresses: Vec<(IpNet, u16, u32)>,
    /// port → rule id, for services without addresses.
    pub ports: Vec<(u16, u32)>,
    /// Allocated VIPs, whose undeclared ports are refused.
    pub vips: Vec<std::net::IpAddr>,
}

#[derive(Debug, Default)]
pub struct Registry {
    services: Vec<Arc<Service>>,
    by_address: AddressTable,
    /// Per port, how connections to services without addresses are routed.
    by_port: HashMap<u16, PortRoutes>,
    intercepts: InterceptSet,
    /// Why each service takes the proxy path whatever its ports (see `datapath`).
    proxy_reasons: Vec<Option<crate::datapath::ProxyReason>>,
    allocations: Allocations,
    /// Allocated VIP → the host it stands for, which a connection to it is routed by.
    vip_hosts: HashMap<std::net::IpAddr, String>,
    /// The wildcard hosts of DYNAMIC_DNS entries that get VIPs: each name under one
    /// that a client looks up gets VIPs of its own.
    dynamic_wildcards: Vec<String>,
    /// The names under [`Registry::dynamic_wildcards`] that have VIPs.
    dynamic_children: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration cannot be served:\n{}", .findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct BuildError {
    pub findings: Vec<Finding>,
    /// A file the configuration names could not be read for want of descriptors or
    /// memory, which says nothing about the configuration.
    pub shortage: bool,
}

/// What a build produced besides the registry: things it ignores, which the caller logs.
pub type BuildWarnings = Vec<Finding>;

impl Registry {
    /// Builds a snapshot from a validated configuration, rejecting what the data path
    /// cannot serve yet. Entries are considered oldest first, so where two claim the
    /// same destination the older one wins, as in Istio.
    pub fn build(config: &ConfigSet) -> Result<(Self, BuildWarnings), BuildError> {
        Self::build_allocating(config, &Allocations::default())
    }

    /// [`Registry::build`], allocating VIPs to the hosts that get them, keeping the
    /// `previous` allocations where they still hold.
    pub fn build_allocating(
        config: &ConfigSet,
        previous: &Allocations,
    ) -> Result<(Self, BuildWarnings), BuildError> {
        // Oldest first, in the same order validation uses to say which entry wins.
        let entries = validate::entry_order(&config.service_entries)
            .into_iter()
            .map(|index| &config.service_entries[index]);

        let mut registry = Registry::default();
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let destination_rules = DestinationRules::new(config, &mut errors, &mut warnings);
        let mut built = Vec::new();
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
            if let Some(mut service) =
                Service::from_entry(entry, &config.workload_entries, &mut report)
            {
                service.upstream = destination_rules.policies(
                    &service,
                    &entry.resource.spec.subject_alt_names,
                    &mut errors,
                );
                let allocates = wants_vips(&service, &entry.resource.metadata.labels);
                built.push((service, allocates, entry));
            }
        }
        // One address per host, however many entries name it: the oldest entry's
        // order decides who gets an address first.
        let mut wanted: Vec<String> = Vec::new();
        for (service, allocates, _) in &built {
            for host in service.hosts.iter().filter(|_| *allocates) {
                let host = host.to_ascii_lowercase();
                if !host.starts_with('*') && !wanted.contains(&host) {
                    wanted.push(host);
                }
            }
        }
        let children = dynamic_children(&built, previous);
        wanted.extend(children.iter().map(|(child, _)| child.clone()));
        let user: Vec<IpNet> = built
            .iter()
            .flat_map(|(service, _, _)| service.addresses.iter().copied())
            .collect();
        let (allocations, exhausted) = previous.allocate(&wanted, &user, Ranges::default());
        for (service, allocates, entry) in built {
            let index = registry.services.len();
            if allocates && service.resolution == Resolution::DynamicDns {
                registry.dynamic_wildcards.extend(
                    service
                        .hosts
                        .iter()
                        .filter(|host| host.starts_with('*'))
                        .map(|host| host.to_ascii_lowercase()),
                );
            }
            // A child is routed like its wildcard's entry, by its own name.
            for (child, _) in children.iter().filter(|(_, owner)| *owner == index) {
                for vip in allocations.vips(child) {
                    registry.add_vip(vip, index, &service, child);
                }
                if allocations.vips(child).next().is_some() {
                    registry.dynamic_children.push(child.clone());
                }
            }
            if allocates {
                for (field, host) in service.hosts.iter().enumerate() {
                    if exhausted.contains(&host.to_ascii_lowercase()) {
                        warnings.push(Finding {
                            severity: Severity::Warning,
                            file: entry.source.file.clone(),
                            document: entry.source.document,
                            object: object_name("ServiceEntry", &entry.resource.metadata),
                            field: format!("spec.hosts[{field}]"),
                            message: format!(
                                "no VIP left for {host}: its range is exhausted, so it is \
                                 intercepted by port only and DNS forwards it"
                            ),
                        });
                    }
                    for vip in allocations.vips(host) {
                        registry.add_vip(vip, index, &service, host);
                    }
                }
            }
            registry.add(service);
        }
        registry.intercepts.vips = registry.vip_hosts.keys().copied().collect();
        registry.allocations = allocations;
        for virtual_service in &config.virtual_services {
            registry.add_virtual_service(virtual_service, &mut warnings);
        }
        if !errors.is_empty() {
            return Err(BuildError {
                findings: errors,
                shortage: destination_rules.met_a_shortage(),
            });
        }
        registry.by_address.finish();
        registry.proxy_reasons = crate::datapath::config_reasons(config, &registry.services);
        Ok((registry, warnings))
    }

    /// Claims `vip` on every port of `service` (about to be added at `index`) for
    /// `host`: a VIP intercepts exactly the ports its entries declare.
    fn add_vip(&mut self, vip: std::net::IpAddr, index: usize, service: &Service, host: &str) {
        let network = IpNet::from(vip);
        for (port_index, port) in service.ports.iter().enumerate() {
            if self
                .by_address
                .insert(&network, port.number, (index, port_index))
            {
                self.intercepts
                    .addresses
                    .push((network, port.number, index as u32));
            }
        }
        self.vip_hosts.insert(vip, host.to_owned());
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
                        virtual_service: None,
                    };
                    table.insert_if_absent(host, Arc::from([backend]));
                }
                continue;
            }
            for network in &addresses {
                // An older entry already claims this address and port; validation has
                // warned about it, naming the winner.
                if self
                    .by_address
                    .insert(network, port.number, (index, port_index))
                {
                    self.intercepts
                        .addresses
                        .push((*network, port.number, rule_id));
                }
            }
        }
        self.services.push(Arc::new(service));
    }

    /// Decides what it can from the original destination: the longest address prefix on
    /// that port first, then the port-only routes of the port.
    pub fn lookup(&self, destination: SocketAddr) -> Lookup<'_> {
        if let Some((service, port)) = self.by_address.lookup(destination) {
            let host = self
                .vip_hosts
                .get(&destination.ip().to_canonical())
                .cloned();
            return Lookup::Route(self.route_to(service, port, host));
        }
        match self.by_port.get(&destination.port()) {
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
        if let Some(backends) = host_backends(routes, table, host) {
            let chosen = &backends[weighted_index(backends.iter().map(|backend| backend.weight))];
            return Some(self.backend_route(chosen, host));
        }
        let (service, port) = routes.opaque?;
        Some(self.route_to(service, port, None))
    }

    /// Every choice [`Registry::route_by_host`] picks among by weight, or the port's
    /// opaque service alone (weight 1); empty when nothing matches.
    pub fn host_choices(
        &self,
        routes: &PortRoutes,
        table: HostKind,
        host: Option<&str>,
    ) -> Vec<Choice> {
        if let Some(backends) = host_backends(routes, table, host) {
            return backends
                .iter()
                .map(|backend| Choice {
                    route: self.backend_route(backend, host),
                    weight: backend.weight,
                    virtual_service: backend.virtual_service.clone(),
                })
                .collect();
        }
        routes
            .opaque
            .map(|(service, port)| Choice {
                route: self.route_to(service, port, None),
                weight: 1,
                virtual_service: None,
            })
            .into_iter()
            .collect()
    }

    fn backend_route(&self, backend: &Backend, host: Option<&str>) -> Route {
        let routed_host = backend.host.clone().or_else(|| host.map(str::to_owned));
        self.route_to(backend.service, backend.port, routed_host)
    }

    fn route_to(&self, service: usize, port: usize, host: Option<String>) -> Route {
        Route {
            service: Arc::clone(&self.services[service]),
            port,
            host,
        }
    }

    /// The route for a destination when no host is known: address or opaque port
    /// routes only, as a connection that is never sniffed gets it.
    #[cfg(test)]
    pub fn route(&self, destination: SocketAddr) -> Option<Route> {
        match self.lookup(destination) {
            Lookup::Route(route) => Some(route),
            Lookup::ByHost(routes) => self.route_by_host(routes, HostKind::Sni, None),
            Lookup::Unmatched => None,
        }
    }

    /// The services without addresses that have port `port`: those the port's
    /// port-only rule stands for.
    pub fn port_only_services(&self, port: u16) -> impl Iterator<Item = &Arc<Service>> {
        self.services.iter().filter(move |service| {
            service.addresses.is_empty() && service.ports.iter().any(|own| own.number == port)
        })
    }

    pub fn intercepts(&self) -> &InterceptSet {
        &self.intercepts
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// Why the service at `index` takes the proxy path, if its config says so.
    pub fn proxy_reason(&self, index: usize) -> Option<crate::datapath::ProxyReason> {
        self.proxy_reasons.get(index).copied().flatten()
    }

    /// The VIPs allocated to a host (none when it has addresses of its own).
    pub fn allocated(&self, host: &str) -> impl Iterator<Item = std::net::IpAddr> + '_ {
        self.allocations.vips(host)
    }

    /// Every host's VIPs, to keep for the next build.
    pub fn allocations(&self) -> &Allocations {
        &self.allocations
    }

    /// The wildcard hosts (lowercase) under which each name looked up gets VIPs of its
    /// own: those of DYNAMIC_DNS entries that get VIPs.
    pub fn dynamic_wildcards(&self) -> &[String] {
        &self.dynamic_wildcards
    }

    /// The names under a [`Registry::dynamic_wildcards`] host that have VIPs.
    pub fn dynamic_children(&self) -> &[String] {
        &self.dynamic_children
    }
}

/// The names that get VIPs as children of a DYNAMIC_DNS wildcard host, each with the
/// index of the entry whose wildcard covers it most specifically: the names a client
/// asked the DNS server about before (kept in `previous`, which the DNS server adds
/// them to), unless a ServiceEntry names them itself.
fn dynamic_children(
    built: &[(Service, bool, &Sourced<ServiceEntry>)],
    previous: &Allocations,
) -> Vec<(String, usize)> {
    let hosts: HashSet<String> = built
        .iter()
        .flat_map(|(service, _, _)| service.hosts.iter().map(|host| host.to_ascii_lowercase()))
        .collect();
    let mut wildcards = HostTable::default();
    for (index, (service, allocates, _)) in built.iter().enumerate() {
        if *allocates && service.resolution == Resolution::DynamicDns {
            for host in service.hosts.iter().filter(|host| host.starts_with('*')) {
                wildcards.insert_if_absent(host, index);
            }
        }
    }
    if wildcards.is_empty() {
        return Vec::new();
    }
    previous
        .hosts
        .keys()
        .filter(|name| !name.starts_with('*') && !hosts.contains(name.as_str()))
        .filter_map(|name| Some((name.clone(), *wildcards.lookup(name)?)))
        .collect()
}

/// The backends the host table of `kind` routes `host` to, if a pattern matches.
fn host_backends<'a>(
    routes: &'a PortRoutes,
    kind: HostKind,
    host: Option<&str>,
) -> Option<&'a [Backend]> {
    let table = match kind {
        HostKind::Sni => &routes.tls,
        HostKind::Http => &routes.http,
    };
    host.and_then(|host| table.lookup(host))
        .map(|backends| &backends[..])
}

/// Whether an entry's hosts get VIPs: only when it has no addresses of its own, its
/// resolution is not NONE (NONE forwards to the address the client asked for), and
/// its label does not opt it out, as Istio decides.
fn wants_vips(service: &Service, labels: &std::collections::BTreeMap<String, String>) -> bool {
    service.addresses.is_empty()
        && service.resolution != Resolution::None
        && labels.get(OPT_OUT_LABEL).map(String::as_str) != Some("false")
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;

    use super::Registry;
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
                    resource: serde_saphyr::from_str(yaml).expect("valid ServiceEntry"),
                })
                .collect(),
            ..ConfigSet::default()
        }
    }

    /// The name of the service a destination routes to without a host.
    pub fn route_name(registry: &Registry, destination: &str) -> Option<String> {
        registry
            .route(destination.parse().unwrap())
            .map(|route| route.service.name.clone())
    }

    /// A NONE service for `api.example.com` and `*.example.org` on 443, a STATIC
    /// `blue.internal`, and a VirtualService that sends SNI `www.example.org` 80% to
    /// blue (port 8443) and 20% to `green.external`.
    pub fn weighted_tls_split() -> ConfigSet {
        let mut config = config(&[
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: apis}\nspec:\n  hosts: [api.example.com, \"*.example.org\"]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: NONE\n",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: blue}\nspec:\n  hosts: [blue.internal]\n  addresses: [240.240.0.7]\n  ports: [{number: 8443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.0.7}]\n",
        ]);
        config.virtual_services.push(Sourced {
            source: Source {
                file: std::path::PathBuf::from("vs.yaml"),
                document: 0,
            },
            resource: serde_saphyr::from_str(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: split}\nspec:\n  hosts: [\"*.example.org\"]\n  tls:\n  - match: [{sniHosts: [www.example.org], port: 443}]\n    route:\n    - {destination: {host: blue.internal, port: {number: 8443}}, weight: 80}\n    - {destination: {host: green.external}, weight: 20}\n",
            )
            .unwrap(),
        });
        config
    }

    pub fn entry(name: &str, extra: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}.example]\n{extra}"
        )
    }

    /// A ServiceEntry with `hosts` and no addresses, routed by host on `port`.
    pub fn by_host(name: &str, hosts: &str, port: &str, rest: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: {hosts}\n  ports: [{port}]\n{rest}"
        )
    }

    pub const TLS: &str = "{number: 443, name: tls, protocol: TLS}";

    /// The registry of `config`, which must build without warnings.
    pub fn build(config: &ConfigSet) -> Registry {
        let (registry, warnings) = Registry::build(config).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        registry
    }

    /// The registry of these ServiceEntry documents.
    pub fn registry(documents: &[&str]) -> Registry {
        build(&config(documents))
    }

    /// NONE services on TLS port 443 for `*.com`, `*.example.com` and
    /// `api.example.com`: an exact host, a longer and a shorter wildcard.
    pub fn sni_wildcards() -> Registry {
        registry(&[
            &by_host("wide", "[\"*.com\"]", TLS, "  resolution: NONE\n"),
            &by_host(
                "wildcard",
                "[\"*.example.com\"]",
                TLS,
                "  resolution: NONE\n",
            ),
            &by_host("exact", "[api.example.com]", TLS, "  resolution: NONE\n"),
        ])
    }

    /// Port 443 shared by a TLS service for `api.example.com` and an opaque TCP
    /// service, `opaque`, that takes what no host matches.
    pub fn tls_with_opaque_fallback() -> Registry {
        registry(&[
            &by_host("tls", "[api.example.com]", TLS, "  resolution: NONE\n"),
            &by_host(
                "opaque",
                "[db.example.com]",
                "{number: 443, name: tcp, protocol: TCP}",
                "  resolution: NONE\n",
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};

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
}

#[cfg(test)]
mod allocation_tests {
    use super::{test_support::*, *};

    fn db(name: &str, extra: &str) -> String {
        entry(
            name,
            &format!(
                "  ports: [{{number: 5432, name: tcp, protocol: TCP}}]\n  resolution: DNS\n{extra}"
            ),
        )
    }

    #[test]
    fn two_entries_on_one_port_each_get_a_vip_that_routes_to_them() {
        let config = config(&[&db("db-a", ""), &db("db-b", "")]);
        let (registry, warnings) = Registry::build(&config).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let vip = |host| registry.allocated(host).next().unwrap();
        let (a, b) = (vip("db-a.example"), vip("db-b.example"));
        assert_ne!(a, b);
        for (ip, name, host) in [(a, "db-a", "db-a.example"), (b, "db-b", "db-b.example")] {
            let route = registry.route(SocketAddr::new(ip, 5432)).unwrap();
            assert_eq!(route.service.name, format!("ServiceEntry/default/{name}"));
            assert_eq!(route.host.as_deref(), Some(host));
            // Only the declared port.
            assert!(
                registry
                    .intercepts()
                    .addresses
                    .iter()
                    .filter(|(network, _, _)| network.addr() == ip)
                    .all(|(_, port, _)| *port == 5432)
            );
        }
        assert_eq!(registry.allocated("db-a.example").count(), 2, "v4 and v6");

        // A reload that adds an entry keeps the addresses.
        let more =
            super::test_support::config(&[&db("db-c", ""), &db("db-a", ""), &db("db-b", "")]);
        let (again, _) = Registry::build_allocating(&more, registry.allocations()).unwrap();
        assert_eq!(again.allocated("db-a.example").next(), Some(a));
        assert_eq!(again.allocated("db-b.example").next(), Some(b));
    }

    #[test]
    fn addresses_none_and_the_opt_out_label_get_no_vip() {
        let opted_out = db("out", "").replace(
            "name: out}",
            "name: out, labels: {networking.istio.io/enable-autoallocate-ip: \"false\"}}",
        );
        let none = entry(
            "none",
            "  ports: [{number: 5432, name: tcp}]\n  resolution: NONE\n",
        );
        let own = db("own", "  addresses: [240.240.0.1]\n");
        let (registry, _) = Registry::build(&config(&[&opted_out, &none, &own])).unwrap();
        for host in ["out.example", "none.example", "own.example"] {
            assert_eq!(registry.allocated(host).count(), 0, "{host}");
        }
    }

    fn dynamic(name: &str, hosts: &str, port: u16, labels: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}{labels}}}\nspec:\n  hosts: [{hosts}]\n  resolution: DYNAMIC_DNS\n  ports: [{{number: {port}, name: tls, protocol: TLS}}]\n"
        )
    }

    /// The names a client asked about, as the DNS server adds them.
    fn asked(names: &[&str]) -> Allocations {
        let mut allocations = Allocations::default();
        for name in names {
            allocations.request(name);
        }
        allocations
    }

    #[test]
    fn a_name_asked_under_a_dynamic_dns_wildcard_gets_vips_on_the_entrys_ports() {
        let own = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: own}\nspec:\n  hosts: [own.wild.example]\n  addresses: [240.240.9.9]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.0.1}]\n";
        let config = config(&[
            &dynamic("wild", "\"*.wild.example\"", 443, ""),
            &dynamic("deep", "\"*.deep.wild.example\"", 8443, ""),
            &db("db-a", ""),
            own,
        ]);
        let (registry, _) = Registry::build(&config).unwrap();
        let mut wildcards = registry.dynamic_wildcards().to_vec();
        wildcards.sort();
        assert_eq!(wildcards, ["*.deep.wild.example", "*.wild.example"]);
        assert!(registry.dynamic_children().is_empty(), "none asked yet");
        assert_eq!(registry.allocated("*.wild.example").count(), 0);

        let (registry, _) = Registry::build_allocating(
            &config,
            &asked(&[
                "X.wild.example",
                "a.deep.wild.example",
                "own.wild.example",
                "else.example",
            ]),
        )
        .unwrap();
        let x = registry.allocated("x.wild.example").next().unwrap();
        assert_eq!(registry.allocated("x.wild.example").count(), 2, "v4 and v6");
        let route = registry.route(SocketAddr::new(x, 443)).unwrap();
        assert_eq!(route.service.name, "ServiceEntry/default/wild");
        assert_eq!(route.host.as_deref(), Some("x.wild.example"));
        assert!(registry.route(SocketAddr::new(x, 8443)).is_none());
        assert!(
            registry.intercepts().vips.contains(&x),
            "other ports are refused"
        );
        // The most specific wildcard owns a name.
        let a = registry.allocated("a.deep.wild.example").next().unwrap();
        let route = registry.route(SocketAddr::new(a, 8443)).unwrap();
        assert_eq!(route.service.name, "ServiceEntry/default/deep");
        // A host of its own is no child; a name under no wildcard gets nothing.
        let mut children = registry.dynamic_children().to_vec();
        children.sort();
        assert_eq!(children, ["a.deep.wild.example", "x.wild.example"]);
        assert_eq!(registry.allocated("else.example").count(), 0);
        assert_eq!(registry.allocated("own.wild.example").count(), 0);

        // Kept by a rebuild; dropped with its wildcard's entry.
        let (again, _) = Registry::build_allocating(&config, registry.allocations()).unwrap();
        assert_eq!(again.allocated("x.wild.example").next(), Some(x));
        let without = super::test_support::config(&[&db("db-a", "")]);
        let (gone, _) = Registry::build_allocating(&without, registry.allocations()).unwrap();
        assert_eq!(gone.allocated("x.wild.example").count(), 0);
        assert!(gone.dynamic_children().is_empty());
    }

    #[test]
    fn only_dynamic_dns_wildcards_that_allocate_have_children() {
        let opted_out = dynamic(
            "out",
            "\"*.out.example\"",
            443,
            ", labels: {networking.istio.io/enable-autoallocate-ip: \"false\"}",
        );
        let static_wildcard = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: static}\nspec:\n  hosts: [\"*.static.example\"]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.0.1}]\n";
        let (registry, _) = Registry::build_allocating(
            &config(&[&opted_out, static_wildcard]),
            &asked(&["x.out.example", "x.static.example"]),
        )
        .unwrap();
        assert!(registry.dynamic_wildcards().is_empty());
        assert!(registry.dynamic_children().is_empty());
        assert_eq!(registry.allocations().hosts.len(), 0);
    }
}
