//! The kernel path: connect4/6 send eligible connects straight to a backend, with no
//! proxy hop, and getpeername still shows the address the application connected to.

use std::{
    collections::HashMap,
    io::{ErrorKind, Write as _},
    net::Shutdown,
    time::{Duration, Instant},
};

use integration_tests::{
    Sandbox, TestServer,
    admin::{ADMIN, scrape_until},
    dns::DnsServer,
    server::{Who, connect, http_get, pattern_checksum, who, write_pattern},
    static_entry, vip_entry,
};
use testbed::{bpf::BpfFs, process};

const AUTO: [&str; 2] = ["--datapath", "auto"];
const AUTO_WITH_ADMIN: [&str; 4] = ["--datapath", "auto", "--admin-addr", ADMIN];

/// Connects to `vip` on the kernel path: straight to a backend, not through the
/// proxy, with getpeername showing the VIP.
fn who_direct(vip: &str) -> Who {
    let seen = who(vip).expect("connect on the kernel path");
    assert!(!seen.went_through_proxy(), "{seen:?}");
    assert_eq!(seen.client_peer.to_string(), vip, "{seen:?}");
    seen
}

#[test]
fn a_kernel_path_connection_is_the_only_tcp_connection_and_shows_the_vip() {
    let sandbox = Sandbox::new("kernel-one-conn");
    sandbox.add_hosts(&["198.18.20.1"]);
    let server = TestServer::start("backend", "198.18.20.1:7000");
    let _daemon = sandbox.start_daemon(
        &vip_entry("kernel", "one", "240.240.20.1", "198.18.20.1"),
        &AUTO,
    );
    let seen = who_direct("240.240.20.1:7000");
    assert_eq!(seen.server, "backend");
    // The backend's peer is the client's own socket: no proxy in between.
    assert_eq!(seen.server_peer, seen.client_local, "{seen:?}");
    assert_eq!(server.accepted(), 1);
}

#[test]
fn static_weights_hold_over_hundreds_of_connects() {
    let sandbox = Sandbox::new("kernel-weights");
    sandbox.add_hosts(&["198.18.20.1", "198.18.20.2"]);
    let _heavy = TestServer::start("heavy", "198.18.20.1:7000");
    let _light = TestServer::start("light", "198.18.20.2:7000");
    let _daemon = sandbox.start_daemon(
        &static_entry(
            "kernel",
            "weighted",
            "240.240.20.2",
            "{number: 7000, name: tcp, protocol: TCP}",
            "  - {address: 198.18.20.1, weight: 3}\n  - {address: 198.18.20.2, weight: 1}",
        ),
        &AUTO,
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let seen = who_direct("240.240.20.2:7000");
        *counts.entry(seen.server).or_default() += 1;
    }
    let heavy = counts.get("heavy").copied().unwrap_or(0);
    // 3:1 of 400 is 300; the binomial standard deviation is about 9.
    assert!((255..=345).contains(&heavy), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 400, "{counts:?}");
}

#[test]
fn endpoint_ports_map_by_name_then_target_port() {
    let sandbox = Sandbox::new("kernel-ports");
    sandbox.add_hosts(&["198.18.20.1", "198.18.20.2"]);
    let _named = TestServer::start("named", "198.18.20.1:7001");
    let _target = TestServer::start("target", "198.18.20.2:7002");
    let _daemon = sandbox.start_daemon(
        &[
            static_entry(
                "kernel",
                "named",
                "240.240.20.3",
                "{number: 7100, name: tcp, protocol: TCP, targetPort: 7002}",
                "  - {address: 198.18.20.1, ports: {tcp: 7001}}",
            ),
            static_entry(
                "kernel",
                "target",
                "240.240.20.4",
                "{number: 7100, name: tcp, protocol: TCP, targetPort: 7002}",
                "  - {address: 198.18.20.2}",
            ),
        ]
        .join("---\n"),
        &AUTO,
    );
    for (vip, server, port) in [
        ("240.240.20.3:7100", "named", 7001),
        ("240.240.20.4:7100", "target", 7002),
    ] {
        let seen = who_direct(vip);
        assert_eq!(seen.server, server);
        assert_eq!(seen.server_addr.port(), port);
    }
}

#[test]
fn none_resolution_keeps_the_address_and_takes_the_target_port() {
    let sandbox = Sandbox::new("kernel-none");
    sandbox.add_hosts(&["198.18.20.1"]);
    let _server = TestServer::start("server", "198.18.20.1:7002");
    let _daemon = sandbox.start_daemon(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: range, namespace: kernel}
spec:
  hosts: [range.kernel.test]
  addresses: [198.18.20.0/24]
  ports: [{number: 7100, name: tcp, protocol: TCP, targetPort: 7002}]
  resolution: NONE
"#,
        &AUTO,
    );
    let seen = who_direct("198.18.20.1:7100");
    assert_eq!(seen.server_addr.to_string(), "198.18.20.1:7002");
}

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    let sandbox = Sandbox::new("kernel-empty");
    let _daemon = sandbox.start_daemon(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: empty, namespace: kernel}
spec:
  hosts: [empty.kernel.test]
  addresses: [240.240.20.5]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: STATIC
"#,
        &AUTO,
    );
    let started = Instant::now();
    let error = connect("240.240.20.5:7000").expect_err("no endpoint to connect to");
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn host_routed_and_annotated_entries_still_go_through_the_proxy() {
    let sandbox = Sandbox::new("kernel-mixed");
    sandbox.add_hosts(&["198.18.20.1", "198.18.20.2"]);
    let _kernel = TestServer::start("kernel", "198.18.20.1:7000");
    let _web = TestServer::start("web", "198.18.20.2:8080");
    let annotated = vip_entry("kernel", "annotated", "240.240.20.7", "198.18.20.1").replace(
        "namespace: kernel\n",
        "namespace: kernel\n  annotations: {interceptor.dev/datapath: proxy}\n",
    );
    let _daemon = sandbox.start_daemon(
        &[
            vip_entry("kernel", "direct", "240.240.20.6", "198.18.20.1"),
            annotated,
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: kernel}
spec:
  hosts: [web.kernel.test]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.18.20.2}]
"#
            .to_owned(),
        ]
        .join("---\n"),
        &AUTO,
    );
    who_direct("240.240.20.6:7000");
    assert!(who("240.240.20.7:7000").unwrap().went_through_proxy());
    let (body, through_proxy) = http_get("198.18.20.9:8080", "web.kernel.test").unwrap();
    assert!(body.contains("web"), "{body}");
    assert!(through_proxy, "a Host-routed port needs the proxy");
}

#[test]
fn a_reload_adding_a_route_moves_the_host_to_the_proxy_and_keeps_open_connections() {
    let sandbox = Sandbox::new("kernel-reload");
    sandbox.add_hosts(&["198.18.20.1"]);
    let _server = TestServer::start("server", "198.18.20.1:7000");
    let entry = vip_entry("kernel", "moving", "240.240.20.8", "198.18.20.1");
    let daemon = sandbox.start_daemon(&entry, &AUTO);
    // Open on the kernel path; the server answers WHO only once, so keep it idle.
    let mut open = connect("240.240.20.8:7000").unwrap();
    let open_local = open.local_addr().unwrap();
    assert_eq!(open.peer_addr().unwrap().to_string(), "240.240.20.8:7000");
    who_direct("240.240.20.8:7000");

    let routed = format!(
        "{entry}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: moving, namespace: kernel}}\nspec:\n  hosts: [moving.kernel.test]\n  tcp:\n  - route: [{{destination: {{host: moving.kernel.test}}}}]\n"
    );
    sandbox.write_config(&routed);
    daemon.signal(libc::SIGHUP);
    daemon.wait_for_log("proxy_path=1", 1);
    assert!(who("240.240.20.8:7000").unwrap().went_through_proxy());

    // The connection opened before the reload still talks to its backend directly.
    open.write_all(b"WHO\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut open, &mut answer).unwrap();
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"server"), "{answer}");
    assert_eq!(
        fields.get(2),
        Some(&open_local.to_string().as_str()),
        "{answer}"
    );
}

#[test]
fn after_sigkill_nothing_stays_attached() {
    let sandbox = Sandbox::new("kernel-sigkill");
    sandbox.add_hosts(&["198.18.20.1"]);
    let _server = TestServer::start("server", "198.18.20.1:7000");
    let mut daemon = sandbox.start_daemon(
        &vip_entry("kernel", "killed", "240.240.20.9", "198.18.20.1"),
        &AUTO,
    );
    who_direct("240.240.20.9:7000");
    daemon.signal(libc::SIGKILL);
    assert_eq!(daemon.wait(), None, "killed by a signal");
    sandbox.assert_programs_attached(0);
    let error = connect("240.240.20.9:7000").expect_err("nothing rewrites the VIP now");
    assert_eq!(error.kind(), ErrorKind::NetworkUnreachable, "{error}");
}

#[test]
fn a_dns_entry_follows_a_record_change_after_its_ttl() {
    let sandbox = Sandbox::new("kernel-dns");
    sandbox.add_hosts(&["198.18.20.1", "198.18.20.2"]);
    let _old = TestServer::start("old", "198.18.20.1:7000");
    let _new = TestServer::start("new", "198.18.20.2:7000");
    let dns = DnsServer::start();
    dns.set("api.kernel.test", &["198.18.20.1"], 1);
    let server = dns.addr.to_string();
    let _daemon = sandbox.start_daemon(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: kernel}
spec:
  hosts: [api.kernel.test]
  addresses: [240.240.20.10]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: DNS
"#,
        &[
            "--datapath",
            "auto",
            "--dns-server",
            &server,
            "--dns-min-ttl",
            "1",
        ],
    );
    assert_eq!(who_direct("240.240.20.10:7000").server, "old");

    dns.set("api.kernel.test", &["198.18.20.2"], 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if who_direct("240.240.20.10:7000").server == "new" {
            break;
        }
        assert!(Instant::now() < deadline, "the old address is still used");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Connects to `vip` every 100 ms for `spell`: each must reach `server` on the
/// kernel path.
fn kernel_path_holds(vip: &str, server: &str, spell: Duration) {
    let deadline = Instant::now() + spell;
    while Instant::now() < deadline {
        let seen = who(vip).unwrap_or_else(|error| panic!("connect to {vip}: {error}"));
        assert_eq!(seen.server, server);
        assert!(!seen.went_through_proxy(), "{seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The soak found connects refused while the daemon was out of descriptors: each
/// failed lookup emptied the DNS entry's backend set once its 1 s TTL ran out.
#[test]
fn a_dns_entry_keeps_its_addresses_while_lookups_get_no_answer() {
    let sandbox = Sandbox::new("kernel-dns-stale");
    sandbox.add_host("198.18.20.3".parse().unwrap());
    let _server = TestServer::start("api", "198.18.20.3:7000");
    let dns = DnsServer::start();
    dns.set("stale.kernel.test", &["198.18.20.3"], 1);
    let server = dns.addr.to_string();
    let daemon = sandbox.start_daemon(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: stale, namespace: kernel}
spec:
  hosts: [stale.kernel.test]
  addresses: [240.240.20.11]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: DNS
"#,
        &[
            "--datapath",
            "auto",
            "--dns-server",
            &server,
            "--dns-min-ttl",
            "1",
            "--dns-max-ttl",
            "1",
            "--dns-negative-ttl",
            "1",
            "--dns-timeout-ms",
            "200",
        ],
    );
    kernel_path_holds("240.240.20.11:7000", "api", Duration::from_millis(500));

    // No descriptor for the query's socket: the lookup fails before any server sees it.
    // Set twice: a query in flight the first time frees its socket when it ends.
    let pid = daemon.pid();
    let starve = || {
        let free = process::lowest_free_descriptor(pid).unwrap();
        process::set_open_files_soft_limit(pid, free).unwrap()
    };
    let previous = starve();
    std::thread::sleep(Duration::from_millis(500));
    starve();
    let queries = dns.queries("stale.kernel.test");
    kernel_path_holds("240.240.20.11:7000", "api", Duration::from_secs(4));
    process::set_open_files_soft_limit(pid, previous).unwrap();
    assert_eq!(
        dns.queries("stale.kernel.test"),
        queries,
        "a query got out: the lookups did not fail locally"
    );
    daemon.wait_for_log("no connections available", 1);

    // A server that answers nothing, for several TTLs.
    dns.set_silent(true);
    kernel_path_holds("240.240.20.11:7000", "api", Duration::from_secs(4));
    daemon.wait_for_log("request timed out", 1);
    dns.set_silent(false);

    // The server's word that the host has no address ends the kept answer.
    dns.remove("stale.kernel.test");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match who("240.240.20.11:7000") {
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => break,
            other => assert!(
                Instant::now() < deadline,
                "still connecting after NXDOMAIN: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_close_log_and_metrics_count_a_known_transfer() {
    let sandbox = Sandbox::new("kernel-close-log");
    sandbox.add_hosts(&["198.18.20.1"]);
    let _server = TestServer::start("server", "198.18.20.1:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("kernel", "bulk", "240.240.20.11", "198.18.20.1"),
        &AUTO_WITH_ADMIN,
    );
    let upload = 300_000;
    let download = 200_000;
    let mut stream = connect("240.240.20.11:7000").unwrap();
    let command = format!("BULK {download}\n");
    stream.write_all(command.as_bytes()).unwrap();
    write_pattern(&mut stream, upload).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut answer).unwrap();
    let summary = format!("{upload} {:016x}\n", pattern_checksum(upload).value());
    assert_eq!(answer.len(), summary.len() + download);
    drop(stream);

    let logs = daemon.wait_for_log("datapath=\"kernel\"", 1);
    let line = logs
        .lines()
        .find(|line| line.contains("connection closed") && line.contains("datapath=\"kernel\""))
        .unwrap_or_else(|| panic!("no kernel-path close line: {logs}"));
    assert!(
        line.contains("service=\"ServiceEntry/kernel/bulk\""),
        "{line}"
    );
    assert!(line.contains("original_dst=240.240.20.11:7000"), "{line}");
    assert!(line.contains("endpoint=198.18.20.1:7000"), "{line}");
    assert!(
        line.contains(&format!("bytes_sent={} ", command.len() + upload)),
        "{line}"
    );
    assert!(
        line.contains(&format!("bytes_received={} ", answer.len())),
        "{line}"
    );

    // The same families as proxied connections, told apart by the datapath label.
    let kernel = [
        ("service_entry", "ServiceEntry/kernel/bulk"),
        ("host", "bulk.kernel.test"),
        ("datapath", "kernel"),
    ];
    let scrape = scrape_until(Duration::from_secs(5), |scrape| {
        scrape
            .value("interceptor_sent_bytes_total", &kernel)
            .is_some()
    });
    assert_eq!(
        scrape.must("interceptor_sent_bytes_total", &kernel),
        (command.len() + upload) as f64
    );
    assert_eq!(
        scrape.must("interceptor_received_bytes_total", &kernel),
        answer.len() as f64
    );
    let datapath = |path| [("datapath", path)];
    assert_eq!(
        scrape.must("interceptor_connections_opened_total", &datapath("kernel")),
        1.0
    );
    assert_eq!(
        scrape.must("interceptor_connections_opened_total", &datapath("proxy")),
        0.0
    );
    // The client shut its side first.
    assert_eq!(
        scrape.must(
            "interceptor_connections_closed_total",
            &[("datapath", "kernel"), ("side", "client"), ("how", "fin")]
        ),
        1.0
    );
    assert_eq!(
        scrape.must("interceptor_connections_closed_total", &datapath("kernel")),
        1.0
    );
    assert_eq!(
        scrape.must("interceptor_connections_failed_total", &datapath("kernel")),
        0.0
    );
}

#[test]
fn a_refused_connect_is_logged_against_its_endpoint() {
    let sandbox = Sandbox::new("kernel-refused");
    sandbox.add_hosts(&["198.18.20.1"]);
    let daemon = sandbox.start_daemon(
        &vip_entry("kernel", "dead", "240.240.20.12", "198.18.20.1"),
        &AUTO,
    );
    let error = connect("240.240.20.12:7000").expect_err("nothing listens");
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    let logs = daemon.wait_for_log("upstream connect failed", 1);
    assert!(logs.contains("endpoint=198.18.20.1:7000"), "{logs}");
}

#[test]
fn a_dead_endpoint_among_two_is_ejected_and_later_connects_succeed() {
    let sandbox = Sandbox::new("kernel-eject");
    sandbox.add_hosts(&["198.18.20.1", "198.18.20.2"]);
    // 198.18.20.2 answers, but nothing listens there: every connect is refused.
    let live = TestServer::start("live", "198.18.20.1:7000");
    let daemon = sandbox.start_daemon(
        &static_entry(
            "kernel",
            "ejecting",
            "240.240.20.13",
            "{number: 7000, name: tcp, protocol: TCP}",
            "  - address: 198.18.20.1\n  - address: 198.18.20.2",
        ),
        &AUTO_WITH_ADMIN,
    );
    let mut refused = 0;
    let mut tries = 0;
    while refused < 5 {
        tries += 1;
        assert!(
            tries < 500,
            "the dead endpoint was drawn {refused} times in {tries}"
        );
        match who("240.240.20.13:7000") {
            Ok(seen) => {
                assert_eq!(seen.server, "live");
                assert!(!seen.went_through_proxy(), "{seen:?}");
            }
            Err(error) => {
                assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
                refused += 1;
            }
        }
    }
    let logs = daemon.wait_for_log("endpoint ejected", 1);
    let line = logs
        .lines()
        .find(|line| line.contains("endpoint ejected"))
        .unwrap();
    assert!(line.contains("endpoint=198.18.20.2:7000"), "{line}");
    let accepted = live.accepted();
    for _ in 0..50 {
        assert_eq!(who_direct("240.240.20.13:7000").server, "live");
    }
    assert_eq!(live.accepted(), accepted + 50);
    // Every connect counts as opened when its socket closes: the five refused
    // ones as failed, the others as closed.
    let failed = [("reason", "upstream_connect"), ("datapath", "kernel")];
    let kernel = [("datapath", "kernel")];
    scrape_until(Duration::from_secs(5), |scrape| {
        let value = |name, labels: &[(&str, &str)]| scrape.value(name, labels).unwrap_or(0.0);
        value("interceptor_connections_failed_total", &failed) == 5.0
            && value("interceptor_connections_opened_total", &kernel)
                == value("interceptor_connections_closed_total", &kernel) + 5.0
            && value("interceptor_connections_closed_total", &kernel)
                == (tries - refused + 50) as f64
    });
}

#[test]
fn a_native_ipv6_vip_takes_the_kernel_path_to_an_ipv6_backend() {
    let sandbox = Sandbox::new("kernel-ipv6");
    sandbox.add_hosts(&["fd00:20::1"]);
    let _server = TestServer::start("v6-backend", "[fd00:20::1]:7000");
    let _daemon = sandbox.start_daemon(
        &vip_entry("kernel", "six", "\"2001:2::20\"", "fd00:20::1"),
        &AUTO,
    );
    let seen = who_direct("[2001:2::20]:7000");
    assert_eq!(seen.server, "v6-backend");
    assert_eq!(seen.server_peer, seen.client_local, "{seen:?}");
}

#[test]
fn a_dual_stack_socket_takes_the_kernel_path_to_an_ipv4_vip() {
    let sandbox = Sandbox::new("kernel-dual");
    sandbox.add_hosts(&["198.18.20.1"]);
    let _server = TestServer::start("backend", "198.18.20.1:7000");
    let _daemon = sandbox.start_daemon(
        &vip_entry("kernel", "dual", "240.240.20.14", "198.18.20.1"),
        &AUTO,
    );
    // An AF_INET6 socket reaches an IPv4 address as ::ffff:a.b.c.d, through connect6.
    let seen = who("[::ffff:240.240.20.14]:7000").expect("connect on the kernel path");
    assert_eq!(seen.server, "backend");
    assert_eq!(
        seen.server_peer.port(),
        seen.client_local.port(),
        "{seen:?}"
    );
    assert_eq!(
        seen.server_peer.ip().to_canonical(),
        seen.client_local.ip().to_canonical(),
        "{seen:?}"
    );
    assert_eq!(seen.client_peer.to_string(), "[::ffff:240.240.20.14]:7000");
}

#[test]
fn getpeername_keeps_showing_the_vip_after_a_handover_to_the_next_daemon() {
    let sandbox = Sandbox::new("kernel-handover");
    sandbox.add_hosts(&["198.18.20.1"]);
    let _server = TestServer::start("backend", "198.18.20.1:7000");
    let bpf_fs = BpfFs::mount(sandbox.workdir.join("bpffs")).expect("a BPF filesystem");
    let bpf_fs_path = bpf_fs.path.to_str().unwrap().to_owned();
    let args = ["--datapath", "auto", "--bpf-fs", &bpf_fs_path];
    let config = vip_entry("kernel", "handover", "240.240.20.12", "198.18.20.1");
    let vip = "240.240.20.12:7000";
    let mut old = sandbox.start_daemon(&config, &args);
    // Open through the old daemon's programs, which run first while both are attached.
    let opened_before = connect(vip).expect("connect through the old daemon");
    let new = sandbox.start_daemon(&config, &args);
    new.wait_for_log("sharing the previous daemon's kernel-path storage", 1);
    let opened_during = connect(vip).expect("connect while both are attached");
    old.signal(libc::SIGTERM);
    assert_eq!(old.wait(), Some(0), "the old daemon exits cleanly");

    // The old daemon's getpeername program is gone; the new one answers from the
    // storage they share.
    for (name, stream) in [("before", &opened_before), ("during", &opened_during)] {
        assert_eq!(
            stream.peer_addr().unwrap().to_string(),
            vip,
            "a connection opened {name} the handover"
        );
    }
    who_direct(vip);
    assert!(
        bpf_fs.pinned().is_empty(),
        "nothing stays pinned: {:?}",
        bpf_fs.pinned()
    );
    drop(new);
}
