//! Routing port-only TLS and HTTP entries by SNI and Host, VirtualService TLS routes,
//! and the outbound traffic policy, with real TLS handshakes through the proxy.

use std::{
    io::ErrorKind,
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{
    Daemon, Sandbox, TestServer,
    dns::DnsServer,
    server::{assert_closed_unanswered, connect, http_get},
    tls::{HelloDelivery, TestCa, start_tls_server, tls_who},
};
use rustls::ClientConfig;

/// The reference's external-svc-https and external-svc-redirect entries, as they are.
const SEEDS: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: external-svc-https
spec:
  hosts:
  - api.dropboxapi.com
  - www.googleapis.com
  - api.facebook.com
  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: TLS
  resolution: DNS
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: external-svc-redirect
spec:
  hosts:
  - wikipedia.org
  - "*.wikipedia.org"
  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: TLS
  resolution: NONE
"#;

const TLS_ROUTING: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: tls-routing
spec:
  hosts:
  - wikipedia.org
  - "*.wikipedia.org"
  tls:
  - match:
    - sniHosts:
      - wikipedia.org
      - "*.wikipedia.org"
    route:
    - destination:
        host: internal-egress-firewall.ns1.svc.cluster.local
"#;

/// An address no test host has: only a redirect can reach anything through it.
const NOWHERE: &str = "198.18.9.1:443";

struct World {
    sandbox: Sandbox,
    dns: DnsServer,
    client: Arc<ClientConfig>,
}

/// Upstreams for the seeds: the three API hosts (found through DNS), a wikipedia
/// origin, an internal egress firewall, and an origin for a host no entry declares.
fn world(name: &str) -> World {
    let sandbox = Sandbox::new(name);
    let dns = DnsServer::start();
    let ca = TestCa::new();
    let upstreams = [
        ("dropbox", "198.18.1.1", &["api.dropboxapi.com"][..]),
        ("googleapis", "198.18.1.2", &["www.googleapis.com"][..]),
        ("facebook", "198.18.1.3", &["api.facebook.com"][..]),
        (
            "wikipedia",
            "198.18.1.10",
            &["wikipedia.org", "*.wikipedia.org"][..],
        ),
        (
            "firewall",
            "198.18.1.20",
            &["wikipedia.org", "*.wikipedia.org"][..],
        ),
        (
            "unknown-origin",
            "198.18.1.30",
            &["unknown.example.org"][..],
        ),
    ];
    for (server, address, names) in upstreams {
        sandbox.add_host(address.parse().unwrap());
        start_tls_server(server, &format!("{address}:443"), ca.server_config(names));
        dns.set(names[0], &[address], 30);
    }
    dns.set(
        "internal-egress-firewall.ns1.svc.cluster.local",
        &["198.18.1.20"],
        30,
    );
    let client = ca.client_config();
    World {
        sandbox,
        dns,
        client,
    }
}

impl World {
    fn start(&self, yaml: &str, extra: &[&str]) -> Daemon {
        let server = self.dns.addr.to_string();
        let mut args = vec!["--dns-server", server.as_str()];
        if !extra.contains(&"--sniff-timeout-ms") {
            args.extend(["--sniff-timeout-ms", "500"]);
        }
        args.extend_from_slice(extra);
        self.sandbox.start_daemon(yaml, &args)
    }

    fn who(&self, addr: &str, sni: &str) -> String {
        tls_who(addr, sni, &self.client, HelloDelivery::Whole)
            .unwrap_or_else(|error| panic!("TLS to {addr} with SNI {sni}: {error}"))
    }
}

#[test]
fn three_snis_on_one_port_reach_three_upstreams_and_a_wildcard_passes_through() {
    let world = world("sni-routing");
    let daemon = world.start(SEEDS, &[]);
    // The handshake completing through the proxy proves it passed TLS through: it has
    // no key for these names.
    assert_eq!(
        world.who(NOWHERE, "api.dropboxapi.com"),
        "dropbox api.dropboxapi.com"
    );
    assert_eq!(
        world.who(NOWHERE, "www.googleapis.com"),
        "googleapis www.googleapis.com"
    );
    assert_eq!(
        world.who(NOWHERE, "api.facebook.com"),
        "facebook api.facebook.com"
    );
    // NONE: the wildcard entry forwards to where the client was going.
    assert_eq!(
        world.who("198.18.1.10:443", "en.wikipedia.org"),
        "wikipedia en.wikipedia.org"
    );
    assert_eq!(
        world.who("198.18.1.10:443", "wikipedia.org"),
        "wikipedia wikipedia.org"
    );
    let logs = daemon.wait_for_log("connection closed", 5);
    assert!(logs.contains("host=\"en.wikipedia.org\""), "{logs}");
    assert!(
        logs.contains("ServiceEntry/default/external-svc-redirect"),
        "{logs}"
    );
}

#[test]
fn a_virtual_service_steers_matching_sni_to_the_egress_firewall() {
    let world = world("sni-virtual-service");
    let _daemon = world.start(&format!("{SEEDS}---\n{TLS_ROUTING}"), &[]);
    assert_eq!(
        world.who("198.18.1.10:443", "en.wikipedia.org"),
        "firewall en.wikipedia.org"
    );
    assert_eq!(
        world.who("198.18.1.10:443", "wikipedia.org"),
        "firewall wikipedia.org"
    );
    // Hosts the VirtualService does not cover keep their own routes.
    assert_eq!(
        world.who(NOWHERE, "api.dropboxapi.com"),
        "dropbox api.dropboxapi.com"
    );
}

fn assert_refused(addr: &str, sni: &str, client: &Arc<ClientConfig>) {
    let error = tls_who(addr, sni, client, HelloDelivery::Whole)
        .expect_err("the connection must be refused");
    assert!(
        matches!(
            error.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
        ),
        "{error}"
    );
}

#[test]
fn registry_only_refuses_an_unknown_sni_and_allow_any_passes_it() {
    let world = world("sni-policy");
    let daemon = world.start(SEEDS, &["--outbound-policy", "registry-only"]);
    assert_refused("198.18.1.30:443", "unknown.example.org", &world.client);
    daemon.wait_for_log("REGISTRY_ONLY", 1);
    assert_eq!(
        world.who(NOWHERE, "api.facebook.com"),
        "facebook api.facebook.com"
    );
    drop(daemon);

    let _daemon = world.start(SEEDS, &["--outbound-policy", "allow-any"]);
    assert_eq!(
        world.who("198.18.1.30:443", "unknown.example.org"),
        "unknown-origin unknown.example.org"
    );
}

#[test]
fn a_client_hello_split_across_records_and_segments_is_reassembled() {
    let world = world("sni-split");
    // 16-byte records sent 40 ms apart take well over a second to arrive.
    let daemon = world.start(SEEDS, &["--sniff-timeout-ms", "5000"]);
    for size in [16, 200] {
        let answer = tls_who(
            NOWHERE,
            "api.dropboxapi.com",
            &world.client,
            HelloDelivery::Fragmented(size),
        )
        .unwrap_or_else(|error| {
            std::thread::sleep(Duration::from_millis(300));
            panic!("fragments of {size}: {error}\n{}", daemon.logs())
        });
        assert_eq!(answer, "dropbox api.dropboxapi.com");
    }
}

#[test]
fn garbage_and_silent_clients_are_closed_cleanly_and_logged() {
    let world = world("sni-bad-clients");
    let daemon = world.start(SEEDS, &[]);

    let mut garbage = connect(NOWHERE).unwrap();
    assert_closed_unanswered(&mut garbage, b"this is not TLS at all\r\n\r\n");
    daemon.wait_for_log("not a TLS ClientHello", 1);

    let started = Instant::now();
    let mut silent = connect(NOWHERE).unwrap();
    assert_closed_unanswered(&mut silent, b"");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    daemon.wait_for_log("no ClientHello or request head within", 1);

    // The daemon is unharmed.
    assert_eq!(
        world.who(NOWHERE, "api.facebook.com"),
        "facebook api.facebook.com"
    );
}

#[test]
fn http_ports_are_routed_by_the_host_header() {
    let sandbox = Sandbox::new("http-host");
    sandbox.add_hosts(&["198.18.2.1", "198.18.2.2", "198.18.2.3"]);
    let _a = TestServer::start("a", "198.18.2.1:8080");
    let _b = TestServer::start("b", "198.18.2.2:8080");
    let _origin = TestServer::start("origin", "198.18.2.3:80");
    let _daemon = sandbox.start_daemon(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a}
spec:
  hosts: [a.http.test]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 198.18.2.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b}
spec:
  hosts: ["*.b.http.test"]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 198.18.2.2}]
"#,
        &[],
    );
    assert_eq!(
        http_get("198.18.9.9:80", "a.http.test").unwrap(),
        ("a".into(), true)
    );
    assert_eq!(
        http_get("198.18.9.9:80", "A.HTTP.TEST:80").unwrap(),
        ("a".into(), true)
    );
    assert_eq!(
        http_get("198.18.9.9:80", "x.b.http.test").unwrap(),
        ("b".into(), true)
    );
    // No host matches: ALLOW_ANY sends it where it was going.
    assert_eq!(
        http_get("198.18.2.3:80", "other.test").unwrap(),
        ("origin".into(), true)
    );
}
