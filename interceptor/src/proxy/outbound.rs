//! Where a redirected connection goes, decided apart from doing it (ztunnel's
//! `build_request` before `proxy_to`). The decision is a plain value, computed from
//! the original destination, the snapshot, the outbound policy and, where the port
//! routes by host, the name the client sent; the proxy then carries it out. So every
//! routing rule can be tested without sockets or root.
//!
//! It takes two steps because reading the client's name is I/O: [`decide`] answers
//! from the destination alone or asks for the name, and [`decide_by_host`] answers
//! once the proxy has read it.

use std::net::SocketAddr;

use crate::{
    metrics::FailureReason,
    registry::{HostKind, Lookup, PortRoutes, Registry, Route, best_match},
};

/// Istio's meshConfig.outboundTrafficPolicy, for intercepted traffic no service matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutboundPolicy {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// The first step's answer.
#[derive(Debug)]
pub enum Step<'a> {
    Decided(Decision),
    /// Services share the port without addresses: the TLS SNI or the HTTP Host
    /// header decides, so read it and call [`decide_by_host`].
    NeedsHost(&'a PortRoutes),
}

/// Where a connection goes.
#[derive(Debug)]
pub enum Decision {
    /// To a service; its resolution turns the route into addresses.
    Forward(Forward),
    /// Where it was going: no service matches and the policy is ALLOW_ANY.
    Passthrough(SocketAddr),
    /// Nowhere: the client is reset.
    Reject(Reject),
}

#[derive(Debug)]
pub struct Forward {
    pub route: Route,
    /// Which of the service's hosts the client's name matched, by index.
    matched_host: Option<usize>,
}

impl Forward {
    /// The service's own host pattern the client's name matched, for metrics.
    pub fn matched_host(&self) -> Option<&str> {
        self.matched_host
            .map(|index| self.route.service.hosts[index].as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// No service matches and the outbound policy is REGISTRY_ONLY.
    RegistryOnly,
}

impl From<Reject> for FailureReason {
    fn from(reject: Reject) -> Self {
        match reject {
            Reject::RegistryOnly => FailureReason::registry_only,
        }
    }
}

/// Decides from the original destination alone, if it can: an address route, the
/// port's one opaque service, or no match at all.
pub fn decide(registry: &Registry, original: SocketAddr, policy: OutboundPolicy) -> Step<'_> {
    match registry.lookup(original) {
        Lookup::Route(route) => Step::Decided(forward(route, None)),
        Lookup::ByHost(routes) => Step::NeedsHost(routes),
        Lookup::Unmatched => Step::Decided(unmatched(original, policy)),
    }
}

/// Decides a host-routed connection by the name it sent (`None`: a ClientHello
/// without SNI or a request without Host), falling back to the port's opaque service
/// and then to the outbound policy.
pub fn decide_by_host(
    registry: &Registry,
    routes: &PortRoutes,
    original: SocketAddr,
    kind: HostKind,
    host: Option<&str>,
    policy: OutboundPolicy,
) -> Decision {
    match registry.route_by_host(routes, kind, host) {
        Some(route) => {
            let matched_host = host.and_then(|host| best_match(&route.service.hosts, host));
            forward(route, matched_host)
        }
        None => unmatched(original, policy),
    }
}

fn forward(route: Route, matched_host: Option<usize>) -> Decision {
    Decision::Forward(Forward {
        route,
        matched_host,
    })
}

fn unmatched(original: SocketAddr, policy: OutboundPolicy) -> Decision {
    match policy {
        // Istio's ALLOW_ANY: what matches no service goes where it was going.
        OutboundPolicy::AllowAny => Decision::Passthrough(original),
        OutboundPolicy::RegistryOnly => Decision::Reject(Reject::RegistryOnly),
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{
        config::Resolution,
        registry::test_support::{
            TLS, build, by_host, entry, registry, sni_wildcards, tls_with_opaque_fallback,
            weighted_tls_split,
        },
        resolve::{self, Target},
    };

    const ALLOW_ANY: OutboundPolicy = OutboundPolicy::AllowAny;
    const REGISTRY_ONLY: OutboundPolicy = OutboundPolicy::RegistryOnly;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// The whole decision, sniffing answered with `sniffed` when the port asks.
    fn decision(
        registry: &Registry,
        original: &str,
        sniffed: Option<(HostKind, Option<&str>)>,
        policy: OutboundPolicy,
    ) -> Decision {
        let original = addr(original);
        match decide(registry, original, policy) {
            Step::Decided(decision) => {
                assert!(sniffed.is_none(), "decided without the host");
                decision
            }
            Step::NeedsHost(routes) => {
                let (kind, host) = sniffed.expect("the port routes by host");
                decide_by_host(registry, routes, original, kind, host, policy)
            }
        }
    }

    fn sni(host: &str) -> Option<(HostKind, Option<&str>)> {
        Some((HostKind::Sni, Some(host)))
    }

    fn forwarded(decision: Decision) -> Forward {
        match decision {
            Decision::Forward(forward) => forward,
            other => panic!("not forwarded: {other:?}"),
        }
    }

    /// (service name, the pattern for metrics, the host the route resolves).
    fn routed(decision: Decision) -> (String, Option<String>, Option<String>) {
        let forward = forwarded(decision);
        (
            forward.route.service.name.clone(),
            forward.matched_host().map(str::to_owned),
            forward.route.host.clone(),
        )
    }

    fn owned(text: &str) -> Option<String> {
        Some(text.to_owned())
    }

    /// The addresses the proxy would try, for services that need no DNS lookup.
    fn targets(decision: Decision, original: &str) -> Vec<Target> {
        resolve::targets_without_lookup(&forwarded(decision).route, addr(original))
    }

    fn tcp(text: &str) -> Target {
        Target::Tcp(addr(text))
    }

    #[test]
    fn an_exact_sni_beats_a_wildcard_and_a_longer_wildcard_a_shorter() {
        let registry = sni_wildcards();
        let route = |name| routed(decision(&registry, "198.18.0.1:443", sni(name), ALLOW_ANY));
        assert_eq!(
            route("api.example.com"),
            (
                "ServiceEntry/default/exact".into(),
                owned("api.example.com"),
                owned("api.example.com")
            )
        );
        // Names differ in case only: the pattern as the entry writes it is the label.
        assert_eq!(
            route("API.Example.COM"),
            (
                "ServiceEntry/default/exact".into(),
                owned("api.example.com"),
                owned("api.example.com")
            )
        );
        // A wildcard route resolves the client's own name.
        assert_eq!(
            route("www.example.com"),
            (
                "ServiceEntry/default/wildcard".into(),
                owned("*.example.com"),
                owned("www.example.com")
            )
        );
        assert_eq!(
            route("example.com"),
            (
                "ServiceEntry/default/wide".into(),
                owned("*.com"),
                owned("example.com")
            )
        );
    }

    #[test]
    fn an_address_route_decides_without_reading_the_host() {
        let registry = registry(&[
            &entry(
                "addressed",
                &format!(
                    "  addresses: [240.240.0.1]\n  ports: [{TLS}]\n  resolution: STATIC\n  endpoints: [{{address: 198.18.0.1}}]\n"
                ),
            ),
            &by_host("shared", "[api.example.com]", TLS, "  resolution: NONE\n"),
        ]);
        let forward = forwarded(decision(&registry, "240.240.0.1:443", None, ALLOW_ANY));
        assert_eq!(forward.route.service.name, "ServiceEntry/default/addressed");
        assert_eq!(forward.matched_host(), None);
        assert!(matches!(
            decide(&registry, addr("240.240.0.2:443"), ALLOW_ANY),
            Step::NeedsHost(_)
        ));
    }

    #[test]
    fn http_ports_route_by_the_host_header() {
        let registry = registry(&[
            &by_host(
                "web",
                "[web.example, \"*.web.example\"]",
                "{number: 80, name: http, protocol: HTTP}",
                "  resolution: NONE\n",
            ),
            &by_host(
                "api",
                "[api.example]",
                "{number: 80, name: http, protocol: HTTP}",
                "  resolution: NONE\n",
            ),
        ]);
        let route = |host| {
            decision(
                &registry,
                "198.18.0.1:80",
                Some((HostKind::Http, Some(host))),
                REGISTRY_ONLY,
            )
        };
        assert_eq!(
            routed(route("api.example")),
            (
                "ServiceEntry/default/api".into(),
                owned("api.example"),
                owned("api.example")
            )
        );
        assert_eq!(
            routed(route("static.web.example")),
            (
                "ServiceEntry/default/web".into(),
                owned("*.web.example"),
                owned("static.web.example")
            )
        );
        assert!(matches!(
            route("other.example"),
            Decision::Reject(Reject::RegistryOnly)
        ));
        // The SNI table of an HTTP-only port is empty.
        assert!(matches!(
            decision(&registry, "198.18.0.1:80", sni("api.example"), ALLOW_ANY),
            Decision::Passthrough(original) if original == addr("198.18.0.1:80")
        ));
    }

    #[test]
    fn virtual_service_tls_routes_split_by_weight() {
        let config = weighted_tls_split();
        let registry = build(&config);
        let mut blue = 0;
        for _ in 0..1_000 {
            let forward = forwarded(decision(
                &registry,
                "198.18.9.9:443",
                sni("www.example.org"),
                REGISTRY_ONLY,
            ));
            let route = &forward.route;
            if route.service.name == "ServiceEntry/default/blue" {
                assert_eq!(route.port().number, 8443);
                blue += 1;
            } else {
                assert_eq!(route.host.as_deref(), Some("green.external"));
                assert_eq!(route.service.resolution, Resolution::Dns);
                assert_eq!(route.port().number, 443);
            }
        }
        // 800 expected; ±80 is more than six standard deviations.
        assert!((720..=880).contains(&blue), "{blue}");
        // The hosts the VirtualService covers lose their default route.
        assert!(matches!(
            decision(
                &registry,
                "198.18.9.9:443",
                sni("other.example.org"),
                REGISTRY_ONLY
            ),
            Decision::Reject(Reject::RegistryOnly)
        ));
    }

    #[test]
    fn the_outbound_policy_decides_what_no_service_matches() {
        let registry = registry(&[&entry(
            "known",
            "  addresses: [240.240.0.1]\n  ports: [{number: 80, name: http}]\n",
        )]);
        for original in ["240.240.0.1:81", "198.18.0.1:80", "[2001:db8::1]:80"] {
            assert!(
                matches!(
                    decision(&registry, original, None, ALLOW_ANY),
                    Decision::Passthrough(to) if to == addr(original)
                ),
                "{original}"
            );
            assert!(
                matches!(
                    decision(&registry, original, None, REGISTRY_ONLY),
                    Decision::Reject(Reject::RegistryOnly)
                ),
                "{original}"
            );
        }
        assert_eq!(
            FailureReason::from(Reject::RegistryOnly),
            FailureReason::registry_only
        );
    }

    #[test]
    fn a_port_with_no_host_match_falls_back_to_its_opaque_service_then_the_policy() {
        let tls_only = registry(&[&by_host(
            "tls",
            "[api.example.com]",
            TLS,
            "  resolution: NONE\n",
        )]);
        for host in [Some("other.example.com"), None] {
            assert!(matches!(
                decision(&tls_only, "198.18.0.1:443", Some((HostKind::Sni, host)), ALLOW_ANY),
                Decision::Passthrough(to) if to == addr("198.18.0.1:443")
            ));
            assert!(matches!(
                decision(
                    &tls_only,
                    "198.18.0.1:443",
                    Some((HostKind::Sni, host)),
                    REGISTRY_ONLY
                ),
                Decision::Reject(Reject::RegistryOnly)
            ));
        }

        let with_opaque = tls_with_opaque_fallback();
        for host in [Some("other.example.com"), None] {
            assert_eq!(
                routed(decision(
                    &with_opaque,
                    "198.18.0.1:443",
                    Some((HostKind::Sni, host)),
                    REGISTRY_ONLY
                )),
                ("ServiceEntry/default/opaque".into(), None, None)
            );
        }
        // A port with one opaque service and no host routes never reads a host.
        let opaque_only = registry(&[&by_host(
            "opaque",
            "[db.example.com]",
            "{number: 5432, name: tcp, protocol: TCP}",
            "  resolution: NONE\n",
        )]);
        assert_eq!(
            routed(decision(
                &opaque_only,
                "198.18.0.1:5432",
                None,
                REGISTRY_ONLY
            )),
            ("ServiceEntry/default/opaque".into(), None, None)
        );
    }

    #[test]
    fn none_keeps_the_original_address_and_target_port_changes_only_the_port() {
        let registry = registry(&[
            &entry(
                "passthrough",
                "  addresses: [198.18.0.0/24]\n  ports: [{number: 80, name: http, targetPort: 8080}, {number: 81, name: plain}]\n",
            ),
            &by_host(
                "by-sni",
                "[api.example.com]",
                "{number: 443, name: tls, protocol: TLS, targetPort: 8443}",
                "  resolution: NONE\n",
            ),
        ]);
        let by_address =
            |original| targets(decision(&registry, original, None, ALLOW_ANY), original);
        assert_eq!(by_address("198.18.0.9:80"), [tcp("198.18.0.9:8080")]);
        assert_eq!(by_address("198.18.0.9:81"), [tcp("198.18.0.9:81")]);
        assert_eq!(
            targets(
                decision(
                    &registry,
                    "[2001:db8::7]:443",
                    sni("api.example.com"),
                    ALLOW_ANY
                ),
                "[2001:db8::7]:443"
            ),
            [tcp("[2001:db8::7]:8443")]
        );
    }

    #[test]
    fn static_endpoints_map_ports_by_name_then_target_port_then_number() {
        let registry = registry(&[&entry(
            "api",
            "  addresses: [240.240.0.2]\n  resolution: STATIC\n  ports:\n  - {number: 80, name: http, targetPort: 8080}\n  - {number: 81, name: admin, targetPort: 8081}\n  - {number: 82, name: plain}\n  endpoints:\n  - address: 198.18.0.1\n    ports: {admin: 9091}\n",
        )]);
        let resolved = |original| targets(decision(&registry, original, None, ALLOW_ANY), original);
        assert_eq!(resolved("240.240.0.2:80"), [tcp("198.18.0.1:8080")]);
        // The endpoint's own port for the name wins over targetPort.
        assert_eq!(resolved("240.240.0.2:81"), [tcp("198.18.0.1:9091")]);
        assert_eq!(resolved("240.240.0.2:82"), [tcp("198.18.0.1:82")]);
    }

    #[test]
    fn dns_spreads_over_every_endpoint_and_dns_round_robin_takes_the_first() {
        let endpoints = "  ports: [{number: 80, name: http}]\n  endpoints:\n  - address: 198.18.0.1\n  - address: 198.18.0.2\n";
        let registry = registry(&[
            &entry(
                "spread",
                &format!("  addresses: [240.240.0.5]\n  resolution: DNS\n{endpoints}"),
            ),
            &entry(
                "logical",
                &format!("  addresses: [240.240.0.6]\n  resolution: DNS_ROUND_ROBIN\n{endpoints}"),
            ),
        ]);
        let resolved = |original| targets(decision(&registry, original, None, ALLOW_ANY), original);
        let mut spread = resolved("240.240.0.5:80");
        spread.sort_by_key(ToString::to_string);
        assert_eq!(spread, [tcp("198.18.0.1:80"), tcp("198.18.0.2:80")]);
        assert_eq!(resolved("240.240.0.6:80"), [tcp("198.18.0.1:80")]);
    }

    #[test]
    fn a_dns_service_without_endpoints_resolves_the_host_it_was_routed_by() {
        let registry = registry(&[
            &by_host("wild", "[\"*.cdn.example\"]", TLS, "  resolution: DNS\n"),
            &by_host(
                "named",
                "[a.example, b.example]",
                TLS,
                "  resolution: DNS_ROUND_ROBIN\n",
            ),
        ]);
        let route = |name| {
            let forward = forwarded(decision(
                &registry,
                "198.18.0.1:443",
                sni(name),
                REGISTRY_ONLY,
            ));
            assert!(forward.route.service.endpoints_from_hosts);
            (
                forward.route.service.name.clone(),
                forward.route.host.clone(),
            )
        };
        assert_eq!(
            route("img.cdn.example"),
            ("ServiceEntry/default/wild".into(), owned("img.cdn.example"))
        );
        assert_eq!(
            route("B.Example"),
            ("ServiceEntry/default/named".into(), owned("b.example"))
        );
    }
}
