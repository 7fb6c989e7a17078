//! VirtualServices: their `tls` routes, which override the SNI routes of the services
//! they cover.

use std::sync::Arc;

use super::{Backend, Endpoint, HostPattern, Port, Registry, Service, hosts_overlap};
use crate::audience::Audience;
use crate::config::{
    Finding, Protocol, Resolution, Severity, Source, Sourced, VirtualService, object_name,
};

impl Registry {
    /// Applies a VirtualService's `tls` routes: for the SNI hosts it matches, on the
    /// port-only TLS ports of the services it applies to, its destinations replace the
    /// services' own SNI routes. As in Istio, once a VirtualService matches on a port,
    /// the default SNI routes of the services it covers are not generated there.
    pub(super) fn add_virtual_service(
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
                                virtual_service: Some(Arc::from(name.as_str())),
                            }),
                            None => warnings.push(Finding::at(
                                Severity::Warning,
                                &source.source,
                                name.clone(),
                                format!("spec.tls[{route_index}].route[{destination_index}].destination.port"),
                                format!("{} has no port {port_number}; this destination is ignored", target.host),
                            )),
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
            upstream: Vec::new(),
            // Reached only through the VirtualService's own routes.
            audience: Audience::Everyone,
        };
        self.services.push(Arc::new(service));
        Some((self.services.len() - 1, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{HostKind, Lookup, test_support::*};
    use super::*;

    #[test]
    fn virtual_service_tls_routes_override_sni_and_split_by_weight() {
        let config = weighted_tls_split();
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
