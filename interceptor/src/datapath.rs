//! Which path each intercepted destination takes: the kernel path, where connect4/6
//! rewrite the connect straight to a backend endpoint, or the proxy.
//!
//! The decision is a plain value per service port, made here from the registry
//! snapshot and unit-tested without root; `kernel::maps` only writes it. The proxy
//! stays for whatever needs the connection's bytes or a decision the kernel cannot
//! make: SNI and Host routing, VirtualService routes, DestinationRules, `unix://`
//! endpoints, hostnames to resolve, and the outbound policy for unmatched traffic.

use std::{
    collections::{BTreeSet, HashMap, HashSet, hash_map::Entry},
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use interceptor_common::{
    AudienceKey, BackendEndpoint, BackendSet, InterceptRule, MAX_BACKEND_ENDPOINTS, PROXY_PATH,
    address_of,
};
use ipnet::IpNet;

use crate::{
    audience::{Audience, AudienceIds},
    config::{ConfigSet, Resolution, object_name},
    outlier::KernelEndpoint,
    registry::{EndpointAddress, Port, Registry, Service, hosts_overlap},
};

/// The annotation with which a ServiceEntry asks for the proxy path.
pub const DATAPATH_ANNOTATION: &str = "interceptor.dev/datapath";

/// `--datapath`: whether eligible destinations take the kernel path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathMode {
    /// The kernel path wherever it is eligible, the proxy elsewhere.
    #[default]
    Auto,
    /// Every intercepted connection goes through the proxy.
    Proxy,
}

/// Why a service port takes the proxy path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProxyReason {
    /// `--datapath proxy`.
    Mode,
    /// The entry's `interceptor.dev/datapath: proxy` annotation.
    Annotation,
    /// A TLS or HTTP port: the proxy reads its SNI or Host.
    Protocol,
    /// A port-only port several entries share: the SNI or Host decides among them.
    SharedPort,
    /// A VirtualService routes one of the entry's hosts.
    VirtualService,
    /// A DestinationRule covers one of the entry's hosts.
    DestinationRule,
    UnixEndpoint,
    /// An endpoint is a hostname the proxy resolves per connection.
    HostnameEndpoint,
    /// Resolution DYNAMIC_DNS: the addresses are learned from the application's
    /// own lookups.
    DynamicDns,
    /// More endpoints than a kernel backend set holds.
    TooManyEndpoints,
    /// The weights add up to more than the kernel's 32-bit tickets.
    WeightOverflow,
    /// Another service port's backend set has the same id.
    IdCollision,
}

impl ProxyReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Mode => "datapath_proxy",
            Self::Annotation => "annotation",
            Self::Protocol => "protocol",
            Self::SharedPort => "shared_port",
            Self::VirtualService => "virtual_service",
            Self::DestinationRule => "destination_rule",
            Self::UnixEndpoint => "unix_endpoint",
            Self::HostnameEndpoint => "hostname_endpoint",
            Self::DynamicDns => "dynamic_dns",
            Self::TooManyEndpoints => "too_many_endpoints",
            Self::WeightOverflow => "weight_overflow",
            Self::IdCollision => "id_collision",
        }
    }
}

/// Where kernel-path connects to one service port go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backends {
    /// Resolution NONE: the address the application connected to, on this port
    /// (`targetPort`, or the port itself).
    KeepAddress { port: u16 },
    /// One of these, picked with probability proportional to its weight; none at all
    /// refuses the connect. A hostname stands for every address it resolves to, each
    /// with the endpoint's weight; `first_only` (DNS_ROUND_ROBIN) keeps only the first
    /// address of the first endpoint.
    Endpoints {
        endpoints: Vec<(Target, u16, u32)>,
        first_only: bool,
    },
}

/// An endpoint's address as the kernel path takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Ip(IpAddr),
    /// Resolved by the daemon's DNS cache; the backend set is rewritten when the
    /// answer changes.
    Host(String),
}

/// The addresses the daemon's DNS cache holds for the hostnames of kernel-path
/// endpoints; a host the cache has no usable answer for has none.
pub type Resolved = HashMap<String, Arc<[IpAddr]>>;

/// Why each service takes the proxy path whatever its ports, from the resources
/// around it: its annotation, VirtualServices and DestinationRules. Indexed like
/// `services`.
pub fn config_reasons(
    config: &ConfigSet,
    services: &[impl AsRef<Service>],
) -> Vec<Option<ProxyReason>> {
    // Named once: a lookup per service over every entry made a config of 10,000
    // entries take seconds to load.
    let annotated: HashSet<String> = config
        .service_entries
        .iter()
        .filter(|entry| {
            entry
                .resource
                .metadata
                .annotations
                .get(DATAPATH_ANNOTATION)
                .is_some_and(|value| value == "proxy")
        })
        .map(|entry| object_name("ServiceEntry", &entry.resource.metadata))
        .collect();
    services
        .iter()
        .map(|service| {
            let service = service.as_ref();
            let annotated = annotated.contains(&service.name);
            let covers = |host: &str| service.hosts.iter().any(|own| hosts_overlap(own, host));
            if annotated {
                Some(ProxyReason::Annotation)
            } else if config.virtual_services.iter().any(|vs| {
                let spec = &vs.resource.spec;
                spec.applies_to_mesh()
                    && !(spec.http.is_empty() && spec.tls.is_empty() && spec.tcp.is_empty())
                    && spec.hosts.iter().any(|host| covers(host))
            }) {
                Some(ProxyReason::VirtualService)
            } else if config
                .destination_rules
                .iter()
                .any(|rule| covers(&rule.resource.spec.host))
            {
                Some(ProxyReason::DestinationRule)
            } else {
                None
            }
        })
        .collect()
}

/// The path of one service port, given the reason its service as a whole takes the
/// proxy, if any.
pub fn port_path(
    service: &Service,
    port: &Port,
    service_reason: Option<ProxyReason>,
) -> Result<Backends, ProxyReason> {
    if let Some(reason) = service_reason {
        return Err(reason);
    }
    if port.protocol.is_tls() || port.protocol.is_http() {
        return Err(ProxyReason::Protocol);
    }
    let (endpoints, first_only) = match service.resolution {
        Resolution::None => {
            return Ok(Backends::KeepAddress {
                port: port.default_endpoint_port,
            });
        }
        Resolution::DynamicDns => return Err(ProxyReason::DynamicDns),
        Resolution::Static | Resolution::Dns => (&service.endpoints[..], false),
        // The proxy uses the first address of the first endpoint.
        Resolution::DnsRoundRobin => (&service.endpoints[..service.endpoints.len().min(1)], true),
    };
    let mut backends = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let target = match &endpoint.address {
            EndpointAddress::Ip(ip) => Target::Ip(*ip),
            EndpointAddress::Hostname(host) => Target::Host(host.clone()),
            EndpointAddress::Unix(_) => return Err(ProxyReason::UnixEndpoint),
        };
        // The endpoint's port for this service port: by name, then targetPort, then
        // the number, as the proxy maps it.
        let number = endpoint
            .ports
            .get(&port.name)
            .copied()
            .unwrap_or(port.default_endpoint_port);
        let weight = u32::try_from(endpoint.weight).map_err(|_| ProxyReason::WeightOverflow)?;
        backends.push((target, number, weight));
    }
    Ok(Backends::Endpoints {
        endpoints: backends,
        first_only,
    })
}

/// The kernel's form of `backends`, with hostnames replaced by the addresses in
/// `resolved`, less the endpoints `ejected` lists (unless that would leave none). A
/// host not looked up yet leaves the port on the proxy path for now.
pub fn backend_set(
    backends: &Backends,
    resolved: &Resolved,
    ejected: impl Fn(SocketAddr) -> bool,
) -> Result<BackendSet, ProxyReason> {
    let mut set = BackendSet {
        count: 0,
        total_weight: 0,
        keep_address_port: [0; 2],
        _pad: [0; 6],
        endpoints: [BackendEndpoint::NONE; MAX_BACKEND_ENDPOINTS],
    };
    if let Backends::KeepAddress { port } = backends {
        set.keep_address_port = port.to_be_bytes();
        return Ok(set);
    }
    let mut picks = picks(backends, resolved)?;
    // The ejection logic keeps one endpoint in; a DNS answer that changed since may
    // not have, and every endpoint is then a better guess than none.
    if picks.iter().any(|(addr, _)| !ejected(*addr)) {
        picks.retain(|(addr, _)| !ejected(*addr));
    }
    let total = picks
        .iter()
        .try_fold(0u32, |total, (_, weight)| total.checked_add(*weight))
        .ok_or(ProxyReason::WeightOverflow)?;
    // All weights zero: the proxy's pick takes the first endpoint.
    if total == 0 {
        picks.truncate(1);
        for pick in &mut picks {
            pick.1 = 1;
        }
    }
    for (slot, (addr, weight)) in set.endpoints.iter_mut().zip(&picks) {
        set.total_weight += weight;
        *slot = BackendEndpoint {
            addr: address_of(addr.ip()),
            port: addr.port().to_be_bytes(),
            _pad: [0; 2],
            cumulative_weight: set.total_weight,
        };
        set.count += 1;
    }
    Ok(set)
}

/// Every endpoint address of `backends` with its weight, hostnames resolved by
/// `resolved`; none for [`Backends::KeepAddress`].
fn picks(backends: &Backends, resolved: &Resolved) -> Result<Vec<(SocketAddr, u32)>, ProxyReason> {
    let Backends::Endpoints {
        endpoints,
        first_only,
    } = backends
    else {
        return Ok(Vec::new());
    };
    let mut picks: Vec<(SocketAddr, u32)> = Vec::new();
    for (target, port, weight) in endpoints {
        let addresses = match target {
            Target::Ip(ip) => Arc::from([*ip]),
            Target::Host(host) => resolved
                .get(host)
                .cloned()
                .ok_or(ProxyReason::HostnameEndpoint)?,
        };
        let take = if *first_only { 1 } else { addresses.len() };
        picks.extend(
            addresses
                .iter()
                .take(take)
                .map(|ip| (SocketAddr::new(*ip, *port), *weight)),
        );
    }
    if picks.len() > MAX_BACKEND_ENDPOINTS {
        return Err(ProxyReason::TooManyEndpoints);
    }
    Ok(picks)
}

/// Which path each rule of a registry snapshot takes, before hostnames are resolved:
/// what the kernel keeps between a reload and the DNS refreshes that follow it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    addresses: Vec<(IpNet, u16, u32, Option<u32>, Audience)>,
    ports: Vec<(u16, u32, Option<u32>, Audience)>,
    /// The backends of each kernel-path backend set id.
    backends: HashMap<u32, Backends>,
    /// The service port of each backend set id.
    owners: HashMap<u32, (String, u16)>,
    proxied: Vec<(String, u16, ProxyReason)>,
}

impl Plan {
    /// The hostnames whose addresses the kernel-path backend sets need.
    pub fn hosts(&self) -> BTreeSet<String> {
        self.backends
            .values()
            .flat_map(|backends| match backends {
                Backends::Endpoints { endpoints, .. } => endpoints
                    .iter()
                    .filter_map(|(target, _, _)| match target {
                        Target::Host(host) => Some(host.clone()),
                        Target::Ip(_) => None,
                    })
                    .collect(),
                Backends::KeepAddress { .. } => Vec::new(),
            })
            .collect()
    }

    /// The endpoint addresses of backend set `id`, ejected or not.
    pub fn endpoints(&self, id: u32, resolved: &Resolved) -> Vec<SocketAddr> {
        self.backends
            .get(&id)
            .and_then(|backends| picks(backends, resolved).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(addr, _)| addr)
            .collect()
    }

    /// What the kernel maps must hold, with hostnames resolved by `resolved` and
    /// the endpoints in `ejected` left out.
    pub fn rules(&self, resolved: &Resolved, ejected: &BTreeSet<KernelEndpoint>) -> KernelRules {
        let mut rules = KernelRules {
            proxied: self.proxied.clone(),
            ..KernelRules::default()
        };
        let mut unresolved: HashMap<u32, ProxyReason> = HashMap::new();
        for (id, backends) in &self.backends {
            match backend_set(backends, resolved, |addr| ejected.contains(&(*id, addr))) {
                Ok(set) => {
                    rules.backends.insert(*id, set);
                }
                Err(reason) => {
                    unresolved.insert(*id, reason);
                }
            }
        }
        let audiences = AudienceIds::new(
            self.addresses
                .iter()
                .map(|(.., audience)| audience)
                .chain(self.ports.iter().map(|(.., audience)| audience)),
        );
        let rule = |rule_id: u32, id: Option<u32>, audience: &Audience| InterceptRule {
            rule_id,
            backends: id
                .filter(|id| rules.backends.contains_key(id))
                .unwrap_or(PROXY_PATH),
            audience: audiences.id(audience),
        };
        let addresses = self
            .addresses
            .iter()
            .map(|(network, port, rule_id, id, audience)| {
                (*network, *port, rule(*rule_id, *id, audience))
            })
            .collect();
        let ports = self
            .ports
            .iter()
            .map(|(port, rule_id, id, audience)| (*port, rule(*rule_id, *id, audience)))
            .collect();
        rules.audiences = audiences.members();
        rules.addresses = addresses;
        rules.ports = ports;
        for (id, reason) in unresolved {
            if let Some((service, port)) = self.owner(id) {
                rules.proxied.push((service, port, reason));
            }
        }
        rules.proxied.sort();
        rules.proxied.dedup();
        rules
    }

    /// The path this plan gives a service port (by service name and port number):
    /// its kernel-path backends, or why it takes the proxy; `None` if no rule has it.
    pub fn path_of(&self, service: &str, port: u16) -> Option<Result<&Backends, ProxyReason>> {
        let owned = |(name, number): &(String, u16)| name == service && *number == port;
        if let Some(id) = self
            .owners
            .iter()
            .find(|(_, owner)| owned(owner))
            .map(|(id, _)| id)
        {
            return self.backends.get(id).map(Ok);
        }
        self.proxied
            .iter()
            .find(|(name, number, _)| owned(&(name.clone(), *number)))
            .map(|(_, _, reason)| Err(*reason))
    }

    fn owner(&self, id: u32) -> Option<(String, u16)> {
        self.owners.get(&id).cloned()
    }
}

/// What the kernel maps must hold for a registry snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelRules {
    /// (CIDR, port) → rule.
    pub addresses: Vec<(IpNet, u16, InterceptRule)>,
    /// port → rule, for services without addresses.
    pub ports: Vec<(u16, InterceptRule)>,
    /// Backend sets by id, for the rules on the kernel path.
    pub backends: HashMap<u32, BackendSet>,
    /// The members of the audiences the rules name.
    pub audiences: BTreeSet<AudienceKey>,
    /// Why the other service ports take the proxy path, by service name and port.
    pub proxied: Vec<(String, u16, ProxyReason)>,
}

/// The paths of `registry`'s rules under `mode`; `scoped`: each rule intercepts only
/// the clients of the namespaces its services are exported to, which takes knowing
/// the clients' namespaces (the cluster's pods).
pub fn plan(registry: &Registry, mode: DatapathMode, scoped: bool) -> Plan {
    let services = registry.services();
    let intercepts = registry.intercepts();
    let mut plan = Plan::default();
    let mut path = |service_index: usize, port_number: u16, shared: bool| -> Option<u32> {
        let service = &services[service_index];
        let port = service
            .ports
            .iter()
            .find(|port| port.number == port_number)?;
        let service_reason = match mode {
            DatapathMode::Proxy => Some(ProxyReason::Mode),
            DatapathMode::Auto if shared => Some(ProxyReason::SharedPort),
            DatapathMode::Auto => registry.proxy_reason(service_index),
        };
        let decided = port_path(service, port, service_reason).and_then(|backends| {
            let id = backend_id(&service.name, port_number);
            let owner = (service.name.clone(), port_number);
            match plan.owners.entry(id) {
                Entry::Occupied(existing) if *existing.get() != owner => {
                    Err(ProxyReason::IdCollision)
                }
                entry => {
                    entry.or_insert(owner);
                    plan.backends.insert(id, backends);
                    Ok(id)
                }
            }
        });
        match decided {
            Ok(id) => Some(id),
            Err(reason) => {
                plan.proxied
                    .push((service.name.clone(), port_number, reason));
                None
            }
        }
    };
    let audience = |service: &Service| match scoped {
        true => service.audience.clone(),
        false => Audience::Everyone,
    };
    let mut addresses = Vec::new();
    for (network, port, rule_id) in &intercepts.addresses {
        addresses.push((
            *network,
            *port,
            *rule_id,
            path(*rule_id as usize, *port, false),
            audience(&services[*rule_id as usize]),
        ));
    }
    let mut ports = Vec::new();
    for (port, rule_id) in &intercepts.ports {
        // Several entries without addresses on one port: the proxy tells them apart,
        // and the port is intercepted for the clients of each.
        let sharing: Vec<&Arc<Service>> = registry.port_only_services(*port).collect();
        let shared_audience = Audience::union_of(sharing.iter().map(|service| audience(service)));
        ports.push((
            *port,
            *rule_id,
            path(*rule_id as usize, *port, sharing.len() > 1),
            shared_audience,
        ));
    }
    plan.addresses = addresses;
    plan.ports = ports;
    plan
}

/// A backend set's id: a hash of the service's name and port, so it stays the same
/// across reloads and a rule never points at another service's set while the maps
/// change.
pub fn backend_id(service: &str, port: u16) -> u32 {
    let mut hasher = DefaultHasher::new();
    (service, port).hash(&mut hasher);
    let id = hasher.finish() as u32;
    if id == PROXY_PATH { 0 } else { id }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Sourced, registry::test_support::*};

    fn built(config: &ConfigSet) -> Registry {
        Registry::build(config).expect("valid config").0
    }

    fn backends_of(rules: &KernelRules, rule: InterceptRule) -> Option<&BackendSet> {
        rules.backends.get(&rule.backends)
    }

    #[test]
    fn static_endpoints_keep_their_weights_and_map_ports_by_name_then_target_port() {
        let config = config(&[&entry(
            "db",
            "  addresses: [240.240.0.5]\n  resolution: STATIC\n  ports: [{number: 5432, name: pg, targetPort: 6432}]\n  endpoints:\n  - {address: 198.18.0.1, weight: 3, ports: {pg: 7000}}\n  - {address: 198.18.0.2, weight: 1}\n",
        )]);
        let registry = built(&config);
        let service = &registry.services()[0];
        assert_eq!(
            port_path(service, &service.ports[0], None),
            Ok(Backends::Endpoints {
                endpoints: vec![
                    (Target::Ip("198.18.0.1".parse().unwrap()), 7000, 3),
                    (Target::Ip("198.18.0.2".parse().unwrap()), 6432, 1),
                ],
                first_only: false,
            })
        );
        let rules =
            plan(&registry, DatapathMode::Auto, false).rules(&Resolved::new(), &BTreeSet::new());
        let (_, _, rule) = rules.addresses[0];
        let set = backends_of(&rules, rule).expect("kernel path");
        assert_eq!((set.count, set.total_weight), (2, 4));
        assert_eq!(set.endpoints[0].cumulative_weight, 3);
        assert_eq!(set.endpoints[1].cumulative_weight, 4);
        assert_eq!(set.endpoints[1].port, 6432u16.to_be_bytes());
        assert_eq!(
            set.endpoints[0].addr,
            address_of("198.18.0.1".parse().unwrap())
        );
    }

    #[test]
    fn ejected_endpoints_are_left_out_of_their_set_only() {
        let config = config(&[&entry(
            "db",
            "  addresses: [240.240.0.5]\n  resolution: STATIC\n  ports: [{number: 5432, name: pg}]\n  endpoints:\n  - {address: 198.18.0.1, weight: 3}\n  - {address: 198.18.0.2, weight: 1}\n",
        )]);
        let registry = built(&config);
        let planned = plan(&registry, DatapathMode::Auto, false);
        let id = backend_id("ServiceEntry/default/db", 5432);
        let (dead, live): (SocketAddr, SocketAddr) = (
            "198.18.0.1:5432".parse().unwrap(),
            "198.18.0.2:5432".parse().unwrap(),
        );
        assert_eq!(planned.endpoints(id, &Resolved::new()), [dead, live]);
        let rules = planned.rules(&Resolved::new(), &BTreeSet::from([(id, dead)]));
        let set = backends_of(&rules, rules.addresses[0].2).expect("kernel path");
        assert_eq!((set.count, set.total_weight), (1, 1));
        assert_eq!(set.endpoints[0].addr, address_of(live.ip()));
        // Another set's ejection of the same address changes nothing here.
        let rules = planned.rules(&Resolved::new(), &BTreeSet::from([(id ^ 1, dead)]));
        let set = backends_of(&rules, rules.addresses[0].2).expect("kernel path");
        assert_eq!((set.count, set.total_weight), (2, 4));
        // Every endpoint ejected: all of them rather than none.
        let rules = planned.rules(&Resolved::new(), &BTreeSet::from([(id, dead), (id, live)]));
        let set = backends_of(&rules, rules.addresses[0].2).expect("kernel path");
        assert_eq!(set.count, 2);
    }

    #[test]
    fn none_keeps_the_address_and_takes_the_target_port() {
        let config = config(&[&entry(
            "any",
            "  addresses: [198.18.0.0/24]\n  resolution: NONE\n  ports: [{number: 80, name: tcp, protocol: TCP, targetPort: 8080}]\n",
        )]);
        let registry = built(&config);
        let rules =
            plan(&registry, DatapathMode::Auto, false).rules(&Resolved::new(), &BTreeSet::new());
        let set = backends_of(&rules, rules.addresses[0].2).expect("kernel path");
        assert_eq!(set.keep_address_port, 8080u16.to_be_bytes());
    }

    #[test]
    fn dns_uses_every_resolved_address_and_round_robin_the_first() {
        let endpoints =
            "  endpoints:\n  - {address: api.upstream, weight: 2}\n  - {address: 198.18.0.9}\n";
        let dns = entry(
            "dns",
            &format!(
                "  addresses: [240.240.0.1]\n  resolution: DNS\n  ports: [{{number: 9000, name: tcp}}]\n{endpoints}"
            ),
        );
        let round_robin = entry(
            "rr",
            &format!(
                "  addresses: [240.240.0.2]\n  resolution: DNS_ROUND_ROBIN\n  ports: [{{number: 9000, name: tcp}}]\n{endpoints}"
            ),
        );
        let registry = built(&config(&[&dns, &round_robin]));
        let planned = plan(&registry, DatapathMode::Auto, false);
        assert_eq!(planned.hosts(), BTreeSet::from(["api.upstream".to_owned()]));

        // Until the host is resolved, both take the proxy path.
        let unresolved = planned.rules(&Resolved::new(), &BTreeSet::new());
        assert!(unresolved.backends.is_empty());
        assert_eq!(unresolved.proxied.len(), 2);

        let resolved = Resolved::from([(
            "api.upstream".to_owned(),
            Arc::from(["198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap()]),
        )]);
        let rules = planned.rules(&resolved, &BTreeSet::new());
        let dns_set = backends_of(&rules, rules.addresses[0].2).expect("kernel path");
        // Each resolved address has its endpoint's weight, the literal its own.
        assert_eq!((dns_set.count, dns_set.total_weight), (3, 5));
        let rr_set = backends_of(&rules, rules.addresses[1].2).expect("kernel path");
        assert_eq!((rr_set.count, rr_set.total_weight), (1, 2));
        assert_eq!(
            rr_set.endpoints[0].addr,
            address_of("198.18.0.1".parse().unwrap())
        );

        // A failed lookup leaves the other endpoints; nothing at all refuses.
        let failed = Resolved::from([("api.upstream".to_owned(), Arc::from([]))]);
        let rules = planned.rules(&failed, &BTreeSet::new());
        let dns_set = backends_of(&rules, rules.addresses[0].2).expect("kernel path");
        assert_eq!(dns_set.count, 1);
        let rr_set = backends_of(&rules, rules.addresses[1].2).expect("kernel path");
        assert_eq!(rr_set.count, 0);
    }

    #[test]
    fn what_needs_the_proxy_takes_it() {
        let tls = entry(
            "tls",
            "  addresses: [240.240.0.1]\n  resolution: STATIC\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  endpoints: [{address: 198.18.0.1}]\n",
        );
        let unix = entry(
            "unix",
            "  addresses: [240.240.0.2]\n  resolution: STATIC\n  ports: [{number: 9000, name: tcp}]\n  endpoints: [{address: unix:///run/app.sock}]\n",
        );
        let hostname = entry(
            "hostname",
            "  addresses: [240.240.0.3]\n  resolution: DNS\n  ports: [{number: 9000, name: tcp}]\n",
        );
        let annotated = entry(
            "annotated",
            "  addresses: [240.240.0.4]\n  resolution: STATIC\n  ports: [{number: 9000, name: tcp}]\n  endpoints: [{address: 198.18.0.1}]\n",
        )
        .replace(
            "name: annotated}",
            "name: annotated, annotations: {interceptor.dev/datapath: proxy}}",
        );
        let first = entry(
            "first",
            "  ports: [{number: 6379, name: tcp}]\n  resolution: NONE\n",
        );
        let second = entry(
            "second",
            "  ports: [{number: 6379, name: tcp}]\n  resolution: NONE\n",
        );
        let routed = entry(
            "routed",
            "  addresses: [240.240.0.5]\n  resolution: STATIC\n  ports: [{number: 9000, name: tcp}]\n  endpoints: [{address: 198.18.0.1}]\n",
        );
        let eligible = entry(
            "eligible",
            "  addresses: [240.240.0.6]\n  resolution: STATIC\n  ports: [{number: 9000, name: tcp}]\n  endpoints: [{address: 198.18.0.1}]\n",
        );
        let mut config = config(&[
            &tls, &unix, &hostname, &annotated, &first, &second, &routed, &eligible,
        ]);
        config.virtual_services.push(Sourced {
            source: config.service_entries[0].source.clone(),
            resource: serde_saphyr::from_str(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: route}\nspec:\n  hosts: [routed.example]\n  tcp:\n  - route: [{destination: {host: eligible.example}}]\n",
            )
            .unwrap(),
        });
        let registry = built(&config);
        let rules =
            plan(&registry, DatapathMode::Auto, false).rules(&Resolved::new(), &BTreeSet::new());
        let reason = |name: &str| {
            rules
                .proxied
                .iter()
                .find(|(service, _, _)| service == &format!("ServiceEntry/default/{name}"))
                .map(|(_, _, reason)| *reason)
        };
        assert_eq!(reason("tls"), Some(ProxyReason::Protocol));
        assert_eq!(reason("unix"), Some(ProxyReason::UnixEndpoint));
        // Until its hostname is resolved.
        assert_eq!(reason("hostname"), Some(ProxyReason::HostnameEndpoint));
        assert_eq!(reason("annotated"), Some(ProxyReason::Annotation));
        assert_eq!(reason("first"), Some(ProxyReason::SharedPort));
        assert_eq!(reason("routed"), Some(ProxyReason::VirtualService));
        assert_eq!(reason("eligible"), None);
        assert_eq!(rules.backends.len(), 1);

        let everything =
            plan(&registry, DatapathMode::Proxy, false).rules(&Resolved::new(), &BTreeSet::new());
        assert!(everything.backends.is_empty());
        assert!(
            everything
                .addresses
                .iter()
                .all(|(_, _, rule)| rule.backends == PROXY_PATH)
        );
    }

    #[test]
    fn a_destination_rule_sends_its_host_to_the_proxy() {
        let mut config = config(&[&entry(
            "db",
            "  addresses: [240.240.0.5]\n  resolution: STATIC\n  ports: [{number: 5432, name: tcp}]\n  endpoints: [{address: 198.18.0.1}]\n",
        )]);
        config.destination_rules.push(Sourced {
            source: config.service_entries[0].source.clone(),
            resource: serde_saphyr::from_str(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db}\nspec:\n  host: \"*.example\"\n",
            )
            .unwrap(),
        });
        let registry = built(&config);
        let rules =
            plan(&registry, DatapathMode::Auto, false).rules(&Resolved::new(), &BTreeSet::new());
        assert_eq!(rules.proxied[0].2, ProxyReason::DestinationRule);
    }

    #[test]
    fn no_endpoint_refuses_and_backend_ids_are_stable() {
        let config = config(&[&entry(
            "empty",
            "  addresses: [240.240.0.5]\n  resolution: STATIC\n  ports: [{number: 5432, name: tcp}]\n",
        )]);
        let registry = built(&config);
        let first =
            plan(&registry, DatapathMode::Auto, false).rules(&Resolved::new(), &BTreeSet::new());
        let set = backends_of(&first, first.addresses[0].2).expect("kernel path");
        assert_eq!(
            (set.count, set.total_weight, set.keep_address_port),
            (0, 0, [0; 2])
        );
        assert_eq!(
            plan(&registry, DatapathMode::Auto, false).rules(&Resolved::new(), &BTreeSet::new()),
            first
        );
        assert_ne!(first.addresses[0].2.backends, PROXY_PATH);
    }

    #[test]
    fn scoped_rules_name_their_entries_audience_and_a_shared_port_the_union() {
        let in_namespace = |name: &str, namespace: &str, spec: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  hosts: [{name}.example]\n{spec}"
            )
        };
        let tcp = "  resolution: STATIC\n  endpoints: [{address: 198.18.0.1}]\n";
        let config = config(&[
            &in_namespace(
                "db",
                "shop",
                &format!(
                    "  addresses: [240.240.0.5]\n  exportTo: [.]\n  ports: [{{number: 5432, name: tcp}}]\n{tcp}"
                ),
            ),
            &in_namespace(
                "open",
                "shop",
                &format!(
                    "  addresses: [240.240.0.6]\n  ports: [{{number: 5432, name: tcp}}]\n{tcp}"
                ),
            ),
            &in_namespace(
                "a",
                "shop",
                "  exportTo: [.]\n  resolution: DNS\n  ports: [{number: 443, name: tls, protocol: TLS}]\n",
            ),
            &in_namespace(
                "b",
                "web",
                "  exportTo: [., blog]\n  resolution: DNS\n  ports: [{number: 443, name: tls, protocol: TLS}]\n",
            ),
        ]);
        let registry = built(&config);
        let rules =
            plan(&registry, DatapathMode::Auto, true).rules(&Resolved::new(), &BTreeSet::new());
        let audience_of = |rule: InterceptRule| -> BTreeSet<u32> {
            rules
                .audiences
                .iter()
                .filter(|key| key.audience == rule.audience)
                .map(|key| key.namespace)
                .collect()
        };
        let ids = |names: &[&str]| -> BTreeSet<u32> {
            names
                .iter()
                .map(|name| crate::audience::namespace_id(name))
                .collect()
        };
        let address_rule = |vip: &str| {
            rules
                .addresses
                .iter()
                .find(|(network, ..)| network.addr().to_string() == vip)
                .map(|(.., rule)| *rule)
                .unwrap()
        };
        assert_eq!(audience_of(address_rule("240.240.0.5")), ids(&["shop"]));
        assert_eq!(
            address_rule("240.240.0.6").audience,
            interceptor_common::EVERYONE
        );
        let (_, shared) = rules.ports.iter().find(|(port, _)| *port == 443).unwrap();
        assert_eq!(audience_of(*shared), ids(&["blog", "shop", "web"]));

        // Unscoped (no namespaces known), every rule is for everyone.
        let unscoped =
            plan(&registry, DatapathMode::Auto, false).rules(&Resolved::new(), &BTreeSet::new());
        assert!(unscoped.audiences.is_empty());
        assert!(
            unscoped
                .addresses
                .iter()
                .all(|(.., rule)| rule.audience == interceptor_common::EVERYONE)
        );
    }
}
