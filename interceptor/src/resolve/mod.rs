//! Choosing the upstream for a routed connection, by the service's resolution:
//! NONE keeps the original destination, STATIC picks an endpoint by weight, DNS
//! spreads over every resolved address (Envoy's STRICT_DNS), and DNS_ROUND_ROBIN uses
//! the first address of the current answer (LOGICAL_DNS).

pub mod dns;
mod marked;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use futures_util::future::join_all;
use rand::seq::SliceRandom as _;

use crate::{
    config::Resolution,
    registry::{Endpoint, EndpointAddress, Route, weighted_index},
};
pub use dns::{DnsCache, DnsSettings, LookupError};

/// One place to connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Tcp(SocketAddr),
    /// A filesystem path, or an abstract socket name starting with `@`.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the service has no endpoint")]
    NoEndpoint,
    /// Message only: the proxy logs this error on its own.
    #[error("DNS: {0}")]
    Dns(LookupError),
}

impl From<LookupError> for ResolveError {
    fn from(error: LookupError) -> Self {
        Self::Dns(error)
    }
}

/// The targets to try, in order. Only DNS resolution returns more than one: the
/// weighted pick first, then the other addresses as fallbacks if it refuses.
pub async fn targets(
    route: &Route,
    original: SocketAddr,
    dns: &Arc<DnsCache>,
) -> Result<Vec<Target>, ResolveError> {
    let service = &route.service;
    let port = route.port();
    match service.resolution {
        Resolution::None => Ok(vec![Target::Tcp(SocketAddr::new(
            original.ip(),
            port.default_endpoint_port,
        ))]),
        Resolution::Static => {
            let endpoint = service.pick_endpoint().ok_or(ResolveError::NoEndpoint)?;
            literal_target(endpoint, route)
                .map(|target| vec![target])
                .ok_or(ResolveError::NoEndpoint)
        }
        Resolution::DnsRoundRobin => {
            let endpoints = routed_endpoints(route);
            let endpoint = endpoints.first().ok_or(ResolveError::NoEndpoint)?;
            if let Some(target) = literal_target(endpoint, route) {
                return Ok(vec![target]);
            }
            let addresses = resolve_endpoint(endpoint, dns).await?;
            let first = addresses.first().ok_or(ResolveError::NoEndpoint)?;
            Ok(vec![tcp_target(endpoint, route, *first)])
        }
        Resolution::Dns | Resolution::DynamicDns => {
            let endpoints = routed_endpoints(route);
            let resolved = join_all(endpoints.iter().map(|endpoint| async move {
                endpoint_targets(endpoint, route, dns)
                    .await
                    .map(|targets| targets.into_iter().map(move |target| (endpoint, target)))
            }))
            .await;
            let mut backends: Vec<(&Endpoint, Target)> = Vec::new();
            let mut first_error = None;
            for result in resolved {
                match result {
                    Ok(found) => backends.extend(found),
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            if backends.is_empty() {
                return Err(first_error.map_or(ResolveError::NoEndpoint, ResolveError::Dns));
            }
            // Every resolved address is a backend with its endpoint's weight.
            let chosen = weighted_index(backends.iter().map(|(endpoint, _)| endpoint.weight));
            let first = backends.swap_remove(chosen);
            backends.shuffle(&mut rand::rng());
            Ok(std::iter::once(first)
                .chain(backends)
                .map(|(_, target)| target)
                .collect())
        }
    }
}

/// A DNS service made of its own hosts resolves only the host the connection was
/// routed by (its SNI or Host); one with explicit endpoints uses all of them.
pub(crate) fn routed_endpoints(route: &Route) -> std::borrow::Cow<'_, [Endpoint]> {
    let service = &route.service;
    let Some(host) = route
        .host
        .as_deref()
        .filter(|_| service.endpoints_from_hosts)
    else {
        return std::borrow::Cow::Borrowed(&service.endpoints);
    };
    let matching: Vec<Endpoint> = service
        .endpoints
        .iter()
        .filter(|endpoint| matches!(&endpoint.address, EndpointAddress::Hostname(name) if name.eq_ignore_ascii_case(host)))
        .cloned()
        .collect();
    if matching.is_empty() {
        std::borrow::Cow::Owned(vec![Endpoint::hostname(host)])
    } else {
        std::borrow::Cow::Owned(matching)
    }
}

/// Every target one endpoint of a DNS service stands for: each address its hostname
/// resolves to, or the endpoint itself when it is an IP or (a WorkloadEntry a
/// selector chose) a unix socket.
async fn endpoint_targets(
    endpoint: &Endpoint,
    route: &Route,
    dns: &Arc<DnsCache>,
) -> Result<Vec<Target>, LookupError> {
    if let Some(target) = literal_target(endpoint, route) {
        return Ok(vec![target]);
    }
    let addresses = resolve_endpoint(endpoint, dns).await?;
    Ok(addresses
        .into_iter()
        .map(|address| tcp_target(endpoint, route, address))
        .collect())
}

/// The addresses a hostname endpoint resolves to; a literal one is its own address.
async fn resolve_endpoint(
    endpoint: &Endpoint,
    dns: &Arc<DnsCache>,
) -> Result<Vec<IpAddr>, LookupError> {
    match &endpoint.address {
        EndpointAddress::Hostname(host) => Ok(dns.lookup(host).await?.to_vec()),
        EndpointAddress::Ip(address) => Ok(vec![*address]),
        EndpointAddress::Unix(_) => Ok(Vec::new()),
    }
}

/// An endpoint given as an IP or a unix socket; `None` for a hostname.
/// Every endpoint of a STATIC service, for a DestinationRule's load balancer to
/// order (a route without one picks a single endpoint by weight).
pub fn every_static_target(route: &Route) -> Vec<Target> {
    route
        .service
        .endpoints
        .iter()
        .filter_map(|endpoint| literal_target(endpoint, route))
        .collect()
}

fn literal_target(endpoint: &Endpoint, route: &Route) -> Option<Target> {
    match &endpoint.address {
        EndpointAddress::Ip(address) => Some(tcp_target(endpoint, route, *address)),
        EndpointAddress::Unix(path) => Some(Target::Unix(PathBuf::from(path))),
        EndpointAddress::Hostname(_) => None,
    }
}

/// The endpoint's port for the route's service port: mapped by name, then
/// targetPort, then the number.
fn tcp_target(endpoint: &Endpoint, route: &Route, address: IpAddr) -> Target {
    Target::Tcp(SocketAddr::new(address, endpoint_port(endpoint, route)))
}

pub(crate) fn endpoint_port(endpoint: &Endpoint, route: &Route) -> u16 {
    let port = route.port();
    endpoint
        .ports
        .get(&port.name)
        .copied()
        .unwrap_or(port.default_endpoint_port)
}

/// The targets of a route whose addresses need no DNS lookup, for tests: the cache
/// asks a server nobody listens on, so a lookup would fail the test.
#[cfg(test)]
pub(crate) fn targets_without_lookup(route: &Route, original: SocketAddr) -> Vec<Target> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dns = DnsCache::new(DnsSettings {
            servers: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
            query_timeout: std::time::Duration::from_millis(50),
            ..DnsSettings::default()
        })
        .unwrap();
        targets(route, original, &dns).await.unwrap()
    })
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::registry::{
        Registry,
        test_support::{config, entry},
    };

    fn targets_for(yaml: &str, destination: &str) -> Vec<Target> {
        targets_in(&config(&[yaml]), destination)
    }

    fn targets_in(config: &crate::config::ConfigSet, destination: &str) -> Vec<Target> {
        let (registry, _) = Registry::build(config).unwrap();
        let destination: SocketAddr = destination.parse().unwrap();
        let route = registry.route(destination).expect("routed");
        targets_without_lookup(&route, destination)
    }

    fn tcp(addr: &str) -> Target {
        Target::Tcp(addr.parse().unwrap())
    }

    #[test]
    fn static_endpoints_map_ports_by_name_then_target_port_then_number() {
        let service = entry(
            "api",
            "  addresses: [240.240.0.2]\n  resolution: STATIC\n  ports:\n  - {number: 80, name: http, targetPort: 8080}\n  - {number: 81, name: admin}\n  - {number: 82, name: plain}\n  endpoints:\n  - address: 198.18.0.1\n    ports: {admin: 9091}\n",
        );
        assert_eq!(
            targets_for(&service, "240.240.0.2:80"),
            [tcp("198.18.0.1:8080")]
        );
        assert_eq!(
            targets_for(&service, "240.240.0.2:81"),
            [tcp("198.18.0.1:9091")]
        );
        assert_eq!(
            targets_for(&service, "240.240.0.2:82"),
            [tcp("198.18.0.1:82")]
        );
    }

    #[test]
    fn none_keeps_the_original_address_and_applies_target_port() {
        let service = entry(
            "passthrough",
            "  addresses: [198.18.0.0/24]\n  ports: [{number: 80, name: http, targetPort: 8080}]\n",
        );
        assert_eq!(
            targets_for(&service, "198.18.0.9:80"),
            [tcp("198.18.0.9:8080")]
        );
    }

    #[test]
    fn unix_endpoints_become_unix_targets() {
        let service = entry(
            "local",
            "  addresses: [240.240.0.4]\n  resolution: STATIC\n  ports: [{number: 80, name: http}]\n  endpoints:\n  - address: unix:///run/app.sock\n",
        );
        assert_eq!(
            targets_for(&service, "240.240.0.4:80"),
            [Target::Unix(PathBuf::from("/run/app.sock"))]
        );
    }

    #[test]
    fn dns_with_ip_endpoints_lists_every_endpoint_as_a_fallback() {
        let service = entry(
            "spread",
            "  addresses: [240.240.0.5]\n  resolution: DNS\n  ports: [{number: 80, name: http}]\n  endpoints:\n  - address: 198.18.0.1\n  - address: 198.18.0.2\n",
        );
        let mut targets = targets_for(&service, "240.240.0.5:80");
        targets.sort_by_key(ToString::to_string);
        assert_eq!(targets, [tcp("198.18.0.1:80"), tcp("198.18.0.2:80")]);
    }

    #[test]
    fn a_dns_service_uses_the_unix_socket_workloads_its_selector_chose() {
        let mut config = config(&[&entry(
            "selected",
            "  addresses: [240.240.0.6]\n  resolution: DNS\n  ports: [{number: 80, name: http}]\n  workloadSelector: {labels: {app: local}}\n",
        )]);
        for (name, address) in [("socket", "unix:///run/local.sock"), ("vm", "198.18.0.6")] {
            config.workload_entries.push(crate::config::Sourced {
                source: crate::config::Source {
                    file: "workloads.yaml".into(),
                    document: 0,
                },
                resource: serde_saphyr::from_str(&format!(
                    "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\nspec: {{address: '{address}', labels: {{app: local}}}}\n"
                ))
                .unwrap(),
            });
        }
        let mut targets = targets_in(&config, "240.240.0.6:80");
        targets.sort_by_key(ToString::to_string);
        assert_eq!(
            targets,
            [
                tcp("198.18.0.6:80"),
                Target::Unix(PathBuf::from("/run/local.sock"))
            ]
        );
    }
}
