//! DNS and DNS_ROUND_ROBIN resolution against a real DNS server in the sandbox, and
//! unix socket endpoints.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixListener,
    time::{Duration, Instant},
};

use integration_tests::{
    Daemon, Sandbox, TestServer,
    dns::DnsServer,
    server::{assert_refused_by_proxy, connect, http_get, who},
};

fn start(sandbox: &Sandbox, dns: &DnsServer, yaml: &str, extra: &[&str]) -> Daemon {
    let server = dns.addr.to_string();
    let mut args = vec!["--dns-server", &server, "--dns-min-ttl", "1"];
    args.extend_from_slice(extra);
    sandbox.start_daemon(yaml, &args)
}

fn tally(destination: &str, connections: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..connections {
        let seen = who(destination).unwrap_or_else(|e| panic!("{destination}: {e}"));
        assert!(seen.went_through_proxy());
        *counts.entry(seen.server).or_default() += 1;
    }
    counts
}

#[test]
fn dns_spreads_over_every_address_and_drops_a_removed_one_after_its_ttl() {
    let sandbox = Sandbox::new("dns-spread");
    let dns = DnsServer::start();
    for (index, name) in ["a", "b", "c"].iter().enumerate() {
        let host = format!("198.18.0.{}", 60 + index);
        sandbox.add_host(host.parse().unwrap());
        std::mem::forget(TestServer::start(name, &format!("{host}:7100")));
    }
    dns.set(
        "api.dns.test",
        &["198.18.0.60", "198.18.0.61", "198.18.0.62"],
        2,
    );
    let _daemon = start(
        &sandbox,
        &dns,
        &dns_entry("api", "api.dns.test", "240.240.3.1", 7100, "DNS"),
        &[],
    );
    let counts = tally("240.240.3.1:7100", 90);
    for name in ["a", "b", "c"] {
        // 30 expected each; 12 is more than three standard deviations below.
        assert!(counts.get(name).copied().unwrap_or(0) >= 12, "{counts:?}");
    }

    dns.set("api.dns.test", &["198.18.0.60", "198.18.0.61"], 2);
    std::thread::sleep(Duration::from_millis(3_000));
    let counts = tally("240.240.3.1:7100", 40);
    assert_eq!(
        counts.get("c"),
        None,
        "a removed record is still used: {counts:?}"
    );
    assert!(
        counts.contains_key("a") && counts.contains_key("b"),
        "{counts:?}"
    );
}

#[test]
fn dns_round_robin_uses_the_first_address_and_leaves_open_connections_alone() {
    let sandbox = Sandbox::new("dns-rr");
    let dns = DnsServer::start();
    sandbox.add_hosts(&["198.18.0.70", "198.18.0.71"]);
    let _first = TestServer::start("first", "198.18.0.70:7200");
    let _second = TestServer::start("second", "198.18.0.71:7200");
    dns.set("rr.dns.test", &["198.18.0.70", "198.18.0.71"], 1);
    let _daemon = start(
        &sandbox,
        &dns,
        &dns_entry("rr", "rr.dns.test", "240.240.3.2", 7200, "DNS_ROUND_ROBIN"),
        &[],
    );
    assert_eq!(
        tally("240.240.3.2:7200", 20),
        HashMap::from([("first".to_owned(), 20)])
    );

    let mut open = connect("240.240.3.2:7200").unwrap();
    open.write_all(b"ECHO\n").unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "first");

    dns.set("rr.dns.test", &["198.18.0.71", "198.18.0.70"], 1);
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(
        tally("240.240.3.2:7200", 10),
        HashMap::from([("second".to_owned(), 10)])
    );

    // The connection opened before the change still reaches the old first address.
    open.write_all(b"still here\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
}

#[test]
fn hostname_endpoints_each_keep_their_own_port_mapping() {
    let sandbox = Sandbox::new("dns-endpoints");
    let dns = DnsServer::start();
    let endpoints = [
        ("us", "198.18.0.80", 8080),
        ("uk", "198.18.0.81", 9080),
        ("in", "198.18.0.82", 7080),
    ];
    for (name, address, port) in endpoints {
        sandbox.add_host(address.parse().unwrap());
        std::mem::forget(TestServer::start(name, &format!("{address}:{port}")));
        // A server on the service port itself would reveal an unmapped port.
        std::mem::forget(TestServer::start("unmapped", &format!("{address}:80")));
        dns.set(&format!("{name}.foo.bar.com"), &[address], 30);
    }
    // The reference's external-svc-dns example, as it is.
    let _daemon = start(
        &sandbox,
        &dns,
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: external-svc-dns
spec:
  hosts:
  - foo.bar.com
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  endpoints:
  - address: us.foo.bar.com
    ports:
      http: 8080
  - address: uk.foo.bar.com
    ports:
      http: 9080
  - address: in.foo.bar.com
    ports:
      http: 7080
"#,
        &[],
    );
    // No addresses: the entry claims port 80 for every destination, and HTTP
    // requests for foo.bar.com are spread over the three endpoints.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        let (server, through_proxy) = http_get("198.18.0.99:80", "foo.bar.com").unwrap();
        assert!(through_proxy);
        *counts.entry(server).or_default() += 1;
    }
    assert_eq!(counts.get("unmapped"), None, "{counts:?}");
    for name in ["us", "uk", "in"] {
        assert!(counts.get(name).copied().unwrap_or(0) >= 5, "{counts:?}");
    }
}

/// Reads what the proxy sends on a connection it is expected to close.
fn closed_quickly(destination: &str) -> Duration {
    let started = Instant::now();
    assert_refused_by_proxy(destination, b"WHO\n");
    started.elapsed()
}

#[test]
fn nxdomain_and_a_silent_server_close_the_client_promptly_and_log_why() {
    let sandbox = Sandbox::new("dns-failure");
    let dns = DnsServer::start();
    sandbox.add_hosts(&["198.18.0.85"]);
    let _good = TestServer::start("good", "198.18.0.85:7300");
    dns.set("good.dns.test", &["198.18.0.85"], 30);
    let entries = ["missing", "slow", "good"]
        .iter()
        .enumerate()
        .map(|(index, name)| {
            dns_entry(
                name,
                &format!("{name}.dns.test"),
                &format!("240.240.3.{}", 10 + index),
                7300,
                "DNS",
            )
        })
        .collect::<Vec<_>>()
        .join("---\n");
    let daemon = start(&sandbox, &dns, &entries, &["--dns-timeout-ms", "300"]);

    let elapsed = closed_quickly("240.240.3.10:7300");
    assert!(
        elapsed < Duration::from_secs(2),
        "NXDOMAIN took {elapsed:?}"
    );
    // Two lines: the lookup's own warning, naming the host, then the refusal with the
    // error. The logs arrive through a pipe, so each is waited for.
    let logs = daemon.wait_for_log("DNS lookup failed", 1);
    assert!(logs.contains("host=\"missing.dns.test\""), "{logs}");
    let logs = daemon.wait_for_log("refused: no upstream", 1);
    assert!(logs.contains("missing.dns.test: no such host"), "{logs}");

    dns.set_silent(true);
    let elapsed = closed_quickly("240.240.3.11:7300");
    assert!(
        elapsed < Duration::from_secs(4),
        "a silent server took {elapsed:?}"
    );
    let logs = daemon.wait_for_log("DNS lookup failed", 2);
    assert!(
        logs.contains("host=\"slow.dns.test\"") || logs.contains("host=slow.dns.test"),
        "{logs}"
    );
    dns.set_silent(false);

    // Neither failure took the daemon down.
    assert_eq!(who("240.240.3.12:7300").expect("good host").server, "good");
}

#[test]
fn a_refusing_address_fails_over_to_the_next_one() {
    let sandbox = Sandbox::new("dns-failover");
    let dns = DnsServer::start();
    sandbox.add_hosts(&["198.18.0.90", "198.18.0.91"]);
    // Nothing listens on 198.18.0.90:7400: connecting there is refused.
    let _alive = TestServer::start("alive", "198.18.0.91:7400");
    dns.set("fo.dns.test", &["198.18.0.90", "198.18.0.91"], 30);
    let daemon = start(
        &sandbox,
        &dns,
        &dns_entry("failover", "fo.dns.test", "240.240.3.20", 7400, "DNS"),
        &[],
    );
    assert_eq!(
        tally("240.240.3.20:7400", 20),
        HashMap::from([("alive".to_owned(), 20)])
    );
    let logs = daemon.wait_for_log("trying the next address", 1);
    assert!(logs.contains("198.18.0.90:7400"), "{logs}");
}

fn serve_unix(listener: UnixListener, name: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let _ = BufReader::new(stream.try_clone().unwrap()).read_line(&mut line);
            let _ = writeln!(stream, "{name} {}", line.trim());
        }
    });
}

#[test]
fn unix_socket_endpoints_receive_the_tcp_bytes() {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr};
    let sandbox = Sandbox::new("unix");
    let path = sandbox.workdir.join("app.sock");
    serve_unix(UnixListener::bind(&path).unwrap(), "path");
    let abstract_name = format!("interceptor-test-{}", std::process::id());
    serve_unix(
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap()).unwrap(),
        "abstract",
    );
    let _daemon = sandbox.start_daemon(
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: by-path}}
spec:
  hosts: [app.unix.test]
  addresses: [240.240.3.30]
  ports: [{{number: 7500, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: "unix://{}"}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: abstract}}
spec:
  hosts: [abstract.unix.test]
  addresses: [240.240.3.31]
  ports: [{{number: 7500, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: "unix://@{abstract_name}"}}]
"#,
            path.display()
        ),
        &[],
    );
    for (destination, expected) in [
        ("240.240.3.30:7500", "path hello"),
        ("240.240.3.31:7500", "abstract hello"),
    ] {
        let mut stream = connect(destination).unwrap();
        stream.write_all(b"hello\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert_eq!(answer.trim(), expected);
    }
}

#[test]
fn ipv6_answers_are_used_and_the_clients_ipv4_family_is_preferred() {
    let sandbox = Sandbox::new("dns-ipv6");
    let dns = DnsServer::start();
    sandbox.add_hosts(&["198.18.0.95", "fd00:198:18::10", "fd00:198:18::11"]);
    let _v6_only = TestServer::start("v6-only", "[fd00:198:18::10]:7600");
    let _v4 = TestServer::start("v4", "198.18.0.95:7600");
    let _v6 = TestServer::start("v6", "[fd00:198:18::11]:7600");
    dns.set("v6only.dns.test", &["fd00:198:18::10"], 30);
    // The AAAA record comes first in the answer; the IPv4 client still gets IPv4.
    dns.set("dual.dns.test", &["fd00:198:18::11", "198.18.0.95"], 30);
    let _daemon = start(
        &sandbox,
        &dns,
        &[
            dns_entry("v6-only", "v6only.dns.test", "240.240.3.40", 7600, "DNS"),
            dns_entry(
                "dual",
                "dual.dns.test",
                "240.240.3.41",
                7600,
                "DNS_ROUND_ROBIN",
            ),
        ]
        .join("---\n"),
        &[],
    );
    let seen = who("240.240.3.40:7600").expect("an IPv6-only upstream");
    assert_eq!(seen.server, "v6-only");
    assert!(seen.server_peer.is_ipv6(), "{seen:?}");
    assert_eq!(
        tally("240.240.3.41:7600", 10),
        HashMap::from([("v4".to_owned(), 10)])
    );
}

#[test]
fn answers_are_refreshed_in_the_background_while_in_use() {
    let sandbox = Sandbox::new("dns-refresh");
    let dns = DnsServer::start();
    sandbox.add_hosts(&["198.18.0.96"]);
    let _server = TestServer::start("fresh", "198.18.0.96:7700");
    dns.set("busy.dns.test", &["198.18.0.96"], 2);
    let _daemon = start(
        &sandbox,
        &dns,
        &dns_entry("busy", "busy.dns.test", "240.240.3.50", 7700, "DNS"),
        &[],
    );
    assert_eq!(who("240.240.3.50:7700").unwrap().server, "fresh");
    // From now on every answer takes 600 ms: a connection that waited for DNS would
    // show it. The 2 s TTL runs out twice during the loop.
    dns.set_delay(Duration::from_millis(600));
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let connect_started = Instant::now();
        assert_eq!(who("240.240.3.50:7700").unwrap().server, "fresh");
        slowest = slowest.max(connect_started.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dns.queries("busy.dns.test") >= 3,
        "no refresh: {} queries",
        dns.queries("busy.dns.test")
    );
    assert!(
        slowest < Duration::from_millis(550),
        "a connection waited on DNS: {slowest:?}"
    );
}

/// A TCP ServiceEntry with one host, one VIP and one port.
fn dns_entry(name: &str, host: &str, vip: &str, port: u16, resolution: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{host}]\n  addresses: [{vip}]\n  ports: [{{number: {port}, name: tcp, protocol: TCP}}]\n  resolution: {resolution}\n"
    )
}
