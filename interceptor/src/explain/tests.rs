//! Each routing rule of `proxy::outbound`'s tests, explained.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use super::*;
use crate::{
    config::{Source, Sourced},
    registry::test_support::{
        build, by_host, config, entry, registry, sni_wildcards, tls_with_opaque_fallback,
        weighted_tls_split,
    },
};

fn query(destination: &str, name: Option<(HostKind, &str)>) -> Query {
    Query {
        destination: destination.parse().unwrap(),
        name: name.map(|(kind, name)| (kind, name.to_owned())),
        cgroup: None,
        ipv6_proxy: true,
        namespace: None,
    }
}

fn ask(registry: &Registry, destination: &str, name: Option<(HostKind, &str)>) -> Explanation {
    ask_with(registry, OutboundPolicy::AllowAny, destination, name)
}

fn ask_with(
    registry: &Registry,
    policy: OutboundPolicy,
    destination: &str,
    name: Option<(HostKind, &str)>,
) -> Explanation {
    explain(
        registry,
        DatapathMode::Auto,
        policy,
        &query(destination, name),
        &Resolved::new(),
    )
}

fn sni(name: &str) -> Option<(HostKind, &str)> {
    Some((HostKind::Sni, name))
}

fn services(explanation: &Explanation) -> Vec<&str> {
    explanation
        .routes
        .iter()
        .map(|route| route.service.as_str())
        .collect()
}

fn endpoints(explanation: &Explanation) -> Vec<(String, u16, u64)> {
    explanation.routes[0]
        .endpoints
        .iter()
        .map(|endpoint| (endpoint.address.clone(), endpoint.port, endpoint.weight))
        .collect()
}

#[test]
fn a_destination_no_entry_claims_is_left_alone() {
    let registry = registry(&[&entry(
        "known",
        "  addresses: [240.240.0.1]\n  ports: [{number: 80, name: http}]\n",
    )]);
    let explanation = ask(&registry, "240.240.0.1:81", None);
    assert!(!explanation.intercepted);
    assert!(
        explanation.reason.contains("no ServiceEntry claims"),
        "{}",
        explanation.reason
    );
    assert!(explanation.datapath.is_none());
    assert!(render(&explanation).contains("intercepted: no"));
}

#[test]
fn an_entry_not_exported_to_the_client_s_namespace_leaves_its_connects_alone() {
    let registry = registry(&[&entry(
        "scoped",
        "  addresses: [240.240.0.1]\n  exportTo: [.]\n  ports: [{number: 80, name: tcp}]\n",
    )]);
    let ask_from = |namespace: Option<&str>| {
        let mut asked = query("240.240.0.1:80", None);
        asked.namespace = namespace.map(str::to_owned);
        explain(
            &registry,
            DatapathMode::Auto,
            OutboundPolicy::AllowAny,
            &asked,
            &Resolved::new(),
        )
    };
    let elsewhere = ask_from(Some("shop"));
    assert!(!elsewhere.intercepted);
    assert!(
        elsewhere.reason.contains("not exported to namespace shop"),
        "{}",
        elsewhere.reason
    );
    // The entry has no namespace: Kubernetes puts it in `default`.
    assert!(ask_from(Some("default")).intercepted);
    assert!(ask_from(None).intercepted, "unscoped: everyone's");
}

#[test]
fn a_cgroup_outside_the_attached_one_is_left_alone() {
    let registry = registry(&[&entry(
        "known",
        "  addresses: [240.240.0.1]\n  ports: [{number: 80, name: tcp}]\n",
    )]);
    let mut asked = query("240.240.0.1:80", None);
    asked.cgroup = Some((
        PathBuf::from("/sys/fs/cgroup/other"),
        PathBuf::from("/sys/fs/cgroup/apps"),
    ));
    let outside = explain(
        &registry,
        DatapathMode::Auto,
        OutboundPolicy::AllowAny,
        &asked,
        &Resolved::new(),
    );
    assert!(!outside.intercepted);
    assert!(outside.reason.contains("outside /sys/fs/cgroup/apps"));
    asked.cgroup = Some((
        PathBuf::from("/sys/fs/cgroup/apps/web"),
        PathBuf::from("/sys/fs/cgroup/apps"),
    ));
    let inside = explain(
        &registry,
        DatapathMode::Auto,
        OutboundPolicy::AllowAny,
        &asked,
        &Resolved::new(),
    );
    assert!(inside.intercepted);
}

#[test]
fn the_longest_prefix_names_its_entry_and_takes_the_kernel_path() {
    let registry = registry(&[
        &entry(
            "wide",
            "  addresses: [198.18.0.0/16]\n  ports: [{number: 5432, name: tcp}]\n  resolution: NONE\n",
        ),
        &entry(
            "narrow",
            "  addresses: [198.18.1.0/24]\n  ports: [{number: 5432, name: tcp}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.9.1, weight: 3}, {address: 198.18.9.2}]\n",
        ),
    ]);
    let narrow = ask(&registry, "198.18.1.7:5432", None);
    assert!(narrow.intercepted);
    assert!(narrow.reason.contains("198.18.1.0/24"), "{}", narrow.reason);
    assert_eq!(services(&narrow), ["ServiceEntry/default/narrow"]);
    assert_eq!(narrow.routes[0].file, PathBuf::from("test.yaml"));
    assert_eq!(narrow.routes[0].document, 1);
    assert_eq!(
        endpoints(&narrow),
        [
            ("198.18.9.1".into(), 5432, 3),
            ("198.18.9.2".into(), 5432, 1)
        ]
    );
    assert_eq!(narrow.datapath.as_ref().unwrap().path, "kernel");

    // NONE keeps the address the client asked for.
    let wide = ask(&registry, "198.18.2.7:5432", None);
    assert_eq!(services(&wide), ["ServiceEntry/default/wide"]);
    assert_eq!(endpoints(&wide), [("198.18.2.7".into(), 5432, 1)]);
    assert_eq!(wide.datapath.as_ref().unwrap().path, "kernel");

    // --datapath proxy says so.
    let proxied = explain(
        &registry,
        DatapathMode::Proxy,
        OutboundPolicy::AllowAny,
        &query("198.18.1.7:5432", None),
        &Resolved::new(),
    );
    let datapath = proxied.datapath.unwrap();
    assert_eq!(
        (datapath.path, datapath.reason.as_str()),
        ("proxy", "datapath_proxy")
    );
}

#[test]
fn sni_routes_say_exact_or_wildcard_and_tls_ports_take_the_proxy() {
    let registry = sni_wildcards();
    let exact = ask(&registry, "198.18.0.1:443", sni("api.example.com"));
    assert_eq!(services(&exact), ["ServiceEntry/default/exact"]);
    assert!(exact.routes[0].why.contains("exact host api.example.com"));
    assert!(exact.reason.contains("port-only"), "{}", exact.reason);
    let datapath = exact.datapath.as_ref().unwrap();
    assert_eq!(datapath.path, "proxy");

    let wildcard = ask(&registry, "198.18.0.1:443", sni("www.example.com"));
    assert_eq!(services(&wildcard), ["ServiceEntry/default/wildcard"]);
    assert!(
        wildcard.routes[0]
            .why
            .contains("wildcard host *.example.com")
    );
    assert_eq!(wildcard.routes[0].host.as_deref(), Some("www.example.com"));

    let unnamed = ask(&registry, "198.18.0.1:443", None);
    assert!(unnamed.intercepted);
    assert_eq!(unnamed.decision, "needs_host");
}

#[test]
fn http_ports_route_by_host_and_the_policy_decides_the_rest() {
    let http = "{number: 80, name: http, protocol: HTTP}";
    let registry = registry(&[&by_host(
        "web",
        "[web.example]",
        http,
        "  resolution: NONE\n",
    )]);
    let routed = ask(
        &registry,
        "198.18.0.1:80",
        Some((HostKind::Http, "web.example")),
    );
    assert_eq!(services(&routed), ["ServiceEntry/default/web"]);
    assert!(routed.routes[0].why.starts_with("Host web.example"));
    let other = Some((HostKind::Http, "other.example"));
    assert!(
        ask(&registry, "198.18.0.1:80", other)
            .decision
            .starts_with("passthrough")
    );
    assert!(
        ask_with(
            &registry,
            OutboundPolicy::RegistryOnly,
            "198.18.0.1:80",
            other
        )
        .decision
        .starts_with("reject")
    );
}

#[test]
fn a_virtual_service_split_shows_every_destination_with_its_weight() {
    let registry = build(&weighted_tls_split());
    let split = ask(&registry, "198.18.9.9:443", sni("www.example.org"));
    let mut routes: Vec<(&str, u64, bool)> = split
        .routes
        .iter()
        .map(|route| {
            (
                route.service.as_str(),
                route.weight,
                route.why.contains("VirtualService/default/split"),
            )
        })
        .collect();
    routes.sort();
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes.iter().all(|(_, _, by_vs)| *by_vs));
    assert!(routes.contains(&("ServiceEntry/default/blue", 80, true)));
    assert_eq!(routes.iter().map(|(_, weight, _)| weight).sum::<u64>(), 100);
}

#[test]
fn a_port_without_a_host_match_falls_back_to_its_opaque_service() {
    let registry = tls_with_opaque_fallback();
    let fallback = ask(&registry, "198.18.0.1:443", sni("other.example.com"));
    assert_eq!(services(&fallback), ["ServiceEntry/default/opaque"]);
    assert!(fallback.routes[0].why.contains("opaque"));
    assert_eq!(fallback.datapath.unwrap().reason, "shared_port");
}

#[test]
fn dns_endpoints_show_what_dns_says_and_round_robin_uses_the_first() {
    let registry = registry(&[
        &entry(
            "spread",
            "  addresses: [240.240.0.5]\n  resolution: DNS\n  ports: [{number: 80, name: tcp}]\n  endpoints: [{address: a.example}, {address: b.example}]\n",
        ),
        &entry(
            "logical",
            "  addresses: [240.240.0.6]\n  resolution: DNS_ROUND_ROBIN\n  ports: [{number: 80, name: tcp}]\n  endpoints: [{address: a.example}, {address: b.example}]\n",
        ),
    ]);
    let unresolved = ask(&registry, "240.240.0.5:80", None);
    assert_eq!(
        unresolved.hosts().into_iter().collect::<Vec<_>>(),
        ["a.example", "b.example"]
    );
    // Until its hosts resolve, a DNS entry waits on the proxy path.
    let datapath = unresolved.datapath.as_ref().unwrap();
    assert_eq!(datapath.path, "proxy");
    assert!(datapath.reason.starts_with("hostname_endpoint"));

    let mut resolved = Resolved::new();
    let a: IpAddr = "198.18.0.1".parse().unwrap();
    resolved.insert("a.example".into(), Arc::from([a]));
    resolved.insert(
        "b.example".into(),
        Arc::from(["198.18.0.2".parse::<IpAddr>().unwrap()]),
    );
    let answered = explain(
        &registry,
        DatapathMode::Auto,
        OutboundPolicy::AllowAny,
        &query("240.240.0.5:80", None),
        &resolved,
    );
    assert_eq!(answered.datapath.as_ref().unwrap().path, "kernel");
    assert_eq!(answered.routes[0].dns[0].addresses, [a]);
    assert!(render(&answered).contains("a.example -> 198.18.0.1"));

    let logical = ask(&registry, "240.240.0.6:80", None);
    assert_eq!(endpoints(&logical), [("a.example".into(), 80, 1)]);
}

#[test]
fn static_endpoints_map_ports_and_a_destination_rule_is_shown() {
    let mut config = config(&[&entry(
        "api",
        "  addresses: [240.240.0.2]\n  resolution: STATIC\n  ports:\n  - {number: 81, name: admin, targetPort: 8081}\n  - {number: 82, name: plain}\n  endpoints:\n  - address: 198.18.0.1\n    ports: {admin: 9091}\n",
    )]);
    config.destination_rules.push(Sourced {
        source: Source {
            file: PathBuf::from("dr.yaml"),
            document: 0,
        },
        resource: serde_saphyr::from_str(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\nspec:\n  host: api.example\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n",
        )
        .unwrap(),
    });
    let registry = build(&config);
    let admin = ask(&registry, "240.240.0.2:81", None);
    assert_eq!(endpoints(&admin), [("198.18.0.1".into(), 9091, 1)]);
    let policy = admin.routes[0].policy.as_ref().expect("the rule applies");
    assert_eq!(policy["rule"], "DestinationRule/default/api");
    assert_eq!(admin.datapath.as_ref().unwrap().reason, "destination_rule");
    assert!(render(&admin).contains("DestinationRule/default/api"));
    assert_eq!(
        endpoints(&ask(&registry, "240.240.0.2:82", None)),
        [("198.18.0.1".into(), 82, 1)]
    );
}

#[test]
fn query_values_survive_encoding() {
    let raw = "a b&c=d/é[::1]:443";
    let query = format!(
        "dest={}&sni={}",
        percent_encode("[::1]:443"),
        percent_encode(raw)
    );
    assert_eq!(
        query_pairs(&query),
        [
            ("dest".to_owned(), "[::1]:443".to_owned()),
            ("sni".to_owned(), raw.to_owned())
        ]
    );
}

#[test]
fn native_ipv6_on_the_proxy_path_needs_an_ipv6_listener() {
    let registry = registry(&[
        &entry(
            "proxied",
            "  addresses: [\"2001:2::1\"]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: NONE\n",
        ),
        &entry(
            "kernel",
            "  addresses: [\"2001:2::2\"]\n  ports: [{number: 5432, name: tcp}]\n  resolution: NONE\n",
        ),
    ]);
    let mut asked = query("[2001:2::1]:443", None);
    asked.ipv6_proxy = false;
    let left = explain(
        &registry,
        DatapathMode::Auto,
        OutboundPolicy::AllowAny,
        &asked,
        &Resolved::new(),
    );
    assert!(!left.intercepted);
    assert!(left.reason.contains("no IPv6 listener"), "{}", left.reason);
    // The kernel path needs no listener.
    asked.destination = "[2001:2::2]:5432".parse().unwrap();
    let kernel = explain(
        &registry,
        DatapathMode::Auto,
        OutboundPolicy::AllowAny,
        &asked,
        &Resolved::new(),
    );
    assert!(kernel.intercepted);
    assert_eq!(kernel.datapath.unwrap().path, "kernel");
}
