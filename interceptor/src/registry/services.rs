//! Services: a ServiceEntry as the data path uses it, with its ports and endpoints.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::Serialize;

use super::workloads::selected_endpoints;
use crate::audience::Audience;
use crate::config::{
    Protocol, Resolution, ServiceEntry, Severity, Source, Sourced, WorkloadEntry,
    WorkloadEntrySpec, object_name,
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
    pub(super) cumulative_weights: Vec<u64>,
    /// Per port, the DestinationRule policy that applies (filled in by the registry).
    pub upstream: Vec<Option<Arc<super::UpstreamPolicy>>>,
    /// The namespaces whose clients it intercepts (`exportTo`).
    pub audience: Audience,
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
    pub(super) fn from_spec(
        endpoint: &WorkloadEntrySpec,
        resolution: Resolution,
        field: &str,
        report: &mut impl FnMut(Severity, String, String),
    ) -> Option<Endpoint> {
        if endpoint.address.is_empty() && !endpoint.network.is_empty() {
            // Istio reaches such an endpoint through its network's gateway; a node agent
            // has none, and validation has already warned about it.
            return None;
        }
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

impl Service {
    pub(super) fn from_entry(
        entry: &Sourced<ServiceEntry>,
        workload_entries: &[Sourced<WorkloadEntry>],
        report: &mut impl FnMut(Severity, String, String),
    ) -> Option<Service> {
        let spec = &entry.resource.spec;
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
        // endpoint per host. DYNAMIC_DNS (wildcard hosts only) resolves the name the
        // connection was routed by: its SNI or Host.
        let endpoints_from_hosts = spec.endpoints().is_empty()
            && spec.workload_selector.is_none()
            && matches!(
                spec.resolution,
                Resolution::Dns | Resolution::DnsRoundRobin | Resolution::DynamicDns
            );
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
            upstream: Vec::new(),
            audience: Audience::of(&spec.export_to, entry.resource.metadata.namespace()),
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
mod tests {
    use super::{
        super::{Registry, test_support::*},
        *,
    };

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

    #[test]
    fn an_endpoint_known_only_by_its_network_is_left_out_without_an_error() {
        for resolution in ["STATIC", "DNS"] {
            let remote = entry(
                "remote",
                &format!(
                    "  resolution: {resolution}\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  endpoints: [{{address: 198.18.0.1}}, {{network: net1}}]\n"
                ),
            );
            let (registry, _) = Registry::build(&config(&[&remote])).expect("builds");
            let endpoints = &registry.services()[0].endpoints;
            assert_eq!(endpoints.len(), 1, "{resolution}: {endpoints:?}");
        }
    }

    #[test]
    fn dynamic_dns_resolves_the_name_the_connection_was_routed_by() {
        let dynamic = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: dynamic}\nspec:\n  hosts: [\"*.wild.example\"]\n  resolution: DYNAMIC_DNS\n  ports: [{number: 443, name: tls, protocol: TLS}]\n";
        let (registry, _) = Registry::build(&config(&[dynamic])).unwrap();
        let service = &registry.services()[0];
        assert!(service.endpoints_from_hosts && service.endpoints.is_empty());
        let crate::registry::Lookup::ByHost(routes) =
            registry.lookup("198.18.0.1:443".parse().unwrap())
        else {
            panic!("a port-only TLS port is routed by SNI");
        };
        let route = registry
            .route_by_host(
                routes,
                crate::registry::HostKind::Sni,
                Some("api.wild.example"),
            )
            .unwrap();
        assert_eq!(route.host.as_deref(), Some("api.wild.example"));
        assert_eq!(registry.allocated("*.wild.example").count(), 0);
    }
}
