//! The foundation: connect4 + sockops redirect, NONE and STATIC resolution, and the
//! guarantees around them (no loops, no open relay, no stale redirects).

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::Shutdown,
};

use integration_tests::{
    Container, NO_NETNS_COOKIE, PROXY, Sandbox, TestServer, enter_container_network_namespace,
    kernel_has_netns_cookies,
    server::{Checksum, assert_refused_by_proxy, connect, pattern_checksum, who, write_pattern},
    vip_entry,
};
use testbed::bpf::{BPF_CGROUP_INET4_CONNECT, attached_programs};

const NONE_RANGE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: test-hosts
  namespace: egress
spec:
  hosts: [hosts.test.example]
  addresses: [198.18.0.0/24]
  ports:
  - number: 7000
    name: tcp
    protocol: TCP
  resolution: NONE
"#;

#[test]
fn none_resolution_forwards_an_address_range_to_the_original_destination() {
    let sandbox = Sandbox::new("none-range");
    sandbox.add_hosts(&["198.18.0.10", "198.18.0.11"]);
    let first = TestServer::start("first", "198.18.0.10:7000");
    let second = TestServer::start("second", "198.18.0.11:7000");
    let daemon = sandbox.start_daemon(NONE_RANGE, &[]);

    for (addr, expected) in [
        ("198.18.0.10:7000", "first"),
        ("198.18.0.11:7000", "second"),
    ] {
        let seen = who(addr).expect("connect through the proxy");
        assert_eq!(seen.server, expected);
        assert!(
            seen.went_through_proxy(),
            "{addr} was not redirected: {seen:?}"
        );
        // getpeername4 shows the application where it connected, not the proxy.
        assert_eq!(seen.client_peer.to_string(), addr);
    }
    assert_eq!((first.accepted(), second.accepted()), (1, 1));
    let logs = daemon.wait_for_log("connection closed", 2);
    assert!(logs.contains("original_dst=198.18.0.10:7000"), "{logs}");
    assert!(
        logs.contains("service=\"ServiceEntry/egress/test-hosts\""),
        "{logs}"
    );
    assert!(logs.contains("endpoint=198.18.0.11:7000"), "{logs}");
}

#[test]
fn connects_from_another_network_namespace_go_direct() {
    let sandbox = Sandbox::new("other-netns");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _here = TestServer::start("here", "198.18.0.10:7000");
    let daemon = sandbox.start_daemon(
        &format!(
            "{NONE_RANGE}---\n{}",
            vip_entry("egress", "vip", "240.240.3.1", "198.18.0.10")
        ),
        &[],
    );
    assert!(
        who("198.18.0.10:7000")
            .expect("connect in the daemon's namespace")
            .went_through_proxy()
    );
    let without_cookies = daemon.logs().contains(NO_NETNS_COOKIE);
    assert_eq!(
        without_cookies,
        !kernel_has_netns_cookies(),
        "the daemon's probe disagrees with the kernel:\n{}",
        daemon.logs()
    );

    // A container: in the cgroup the programs watch, but in a network namespace of its
    // own, where the proxy's 127.0.0.1:15001 is nobody. Its connects must go where
    // they were going, never to its own loopback.
    let (seen, vip) = std::thread::spawn(|| {
        enter_container_network_namespace(&["198.18.0.10".parse().unwrap()]);
        let _container = TestServer::start("container", "198.18.0.10:7000");
        (who("198.18.0.10:7000"), connect("240.240.3.1:7000"))
    })
    .join()
    .expect("the container thread");
    if without_cookies {
        // The degradation docs/kernels.md describes for kernels before 5.14, which the
        // daemon warned of: the container's connects are redirected too, to the
        // proxy's loopback address, which in its namespace is nobody.
        for (connect, what) in [
            (seen.map(drop), "to a redirected host"),
            (vip.map(drop), "to the VIP"),
        ] {
            let error = connect.expect_err(what);
            assert_eq!(
                error.kind(),
                ErrorKind::ConnectionRefused,
                "{what}: {error}"
            );
        }
        return;
    }
    let seen = seen.expect("a connect from the container's namespace");
    assert_eq!(seen.server, "container");
    assert!(!seen.went_through_proxy(), "{seen:?}");
    // The VIP exists nowhere in the container, so only a redirect could have reached it.
    let error = vip.expect_err("a VIP connect from the container went somewhere");
    assert_eq!(error.kind(), ErrorKind::NetworkUnreachable, "{error}");
}

#[test]
fn a_container_is_redirected_to_the_proxy_address_it_can_reach() {
    let sandbox = Sandbox::new("container-proxy");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _endpoint = TestServer::start("endpoint", "198.18.0.10:7000");
    // The container is joined to the sandbox by a veth pair; the sandbox's end is
    // 198.18.5.1 and fd00:5::1, the container's 198.18.5.2 and fd00:5::2.
    let container = Container::start(|| {
        let seen = who("240.240.5.1:7000");
        let seen_v6 = who("[2001:2::5]:7000");
        let unclaimed = connect("240.240.5.1:7001").map(|_| ());
        (seen, seen_v6, unclaimed)
    });
    // Before Linux 5.14 the programs cannot tell the container from the daemon's
    // own namespace, and the daemon refuses the flag.
    let Some(daemon) = sandbox.start_container_daemon(
        &vip_entry(
            "egress",
            "vip",
            r#"240.240.5.1, "2001:2::5""#,
            "198.18.0.10",
        ),
        &[
            "--container-proxy-addr",
            "198.18.5.1:15001",
            "--container-proxy-addr-v6",
            "[fd00:5::1]:15001",
        ],
    ) else {
        return;
    };
    let (seen, seen_v6, unclaimed) = container.run();

    let seen = seen.expect("the container reaches the VIP through the proxy");
    assert_eq!(seen.server, "endpoint");
    assert!(seen.went_through_proxy(), "{seen:?}");
    // getpeername shows the container the VIP, not the proxy's address.
    assert_eq!(seen.client_peer.to_string(), "240.240.5.1:7000");
    let seen_v6 = seen_v6.expect("the container reaches the IPv6 VIP through the proxy");
    assert_eq!(seen_v6.server, "endpoint");
    assert_eq!(seen_v6.client_peer.to_string(), "[2001:2::5]:7000");
    let logs = daemon.wait_for_log("connection closed", 2);
    assert!(logs.contains("client=198.18.5.2:"), "{logs}");
    assert!(logs.contains("original_dst=240.240.5.1:7000"), "{logs}");
    assert!(logs.contains("client=[fd00:5::2]:"), "{logs}");
    assert!(logs.contains("original_dst=[2001:2::5]:7000"), "{logs}");
    // Port 7001 is not the entry's: nothing redirects it, and the VIP routes nowhere.
    assert_eq!(
        unclaimed
            .expect_err("an unclaimed port reached something")
            .kind(),
        ErrorKind::NetworkUnreachable
    );
}

#[test]
fn the_daemons_own_upstream_connects_are_not_redirected() {
    let sandbox = Sandbox::new("no-loop");
    sandbox.add_hosts(&["198.18.0.10"]);
    let server = TestServer::start("upstream", "198.18.0.10:7000");
    let daemon = sandbox.start_daemon(NONE_RANGE, &[]);
    // The daemon runs inside the cgroup its programs are attached to, as it does at a
    // host's cgroup root, and NONE makes it connect to the very address it intercepts.
    assert!(sandbox.cgroup_pids().contains(&daemon.pid()));

    for _ in 0..5 {
        let seen = who("198.18.0.10:7000").expect("connect through the proxy");
        assert!(seen.went_through_proxy());
        assert_eq!(seen.server, "upstream");
    }
    let logs = daemon.wait_for_log("connection closed", 5);
    assert_eq!(
        server.accepted(),
        5,
        "one upstream connection per client connection"
    );
    assert!(
        !logs.contains("refused"),
        "a proxy connection looped back:\n{logs}"
    );
}

#[test]
fn static_resolution_spreads_by_weight_and_maps_ports_by_name() {
    let sandbox = Sandbox::new("static");
    sandbox.add_hosts(&["198.18.0.20", "198.18.0.21"]);
    // heavy maps the "http" port to 9001; light has no mapping, so targetPort 8000
    // applies. Servers on the other ports would reveal a wrong mapping.
    let _heavy = TestServer::start("heavy", "198.18.0.20:9001");
    let _light = TestServer::start("light", "198.18.0.21:8000");
    let _heavy_wrong = TestServer::start("heavy-on-target-port", "198.18.0.20:8000");
    let _light_wrong = TestServer::start("light-on-service-port", "198.18.0.21:80");
    // The "plain" port has neither a mapping nor a targetPort: its number is used.
    let _heavy_plain = TestServer::start("heavy-plain", "198.18.0.20:81");
    let _light_plain = TestServer::start("light-plain", "198.18.0.21:81");
    let _daemon = sandbox.start_daemon(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: api
  namespace: egress
spec:
  hosts: [api.test.example]
  addresses: [240.240.1.1]
  ports:
  - number: 80
    name: http
    protocol: HTTP
    targetPort: 8000
  - number: 81
    name: plain
    protocol: TCP
  resolution: STATIC
  endpoints:
  - address: 198.18.0.20
    weight: 3
    ports:
      http: 9001
  - address: 198.18.0.21
    weight: 1
"#,
        &[],
    );

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let seen = who("240.240.1.1:80").expect("connect to the VIP");
        assert!(seen.went_through_proxy());
        *counts.entry(seen.server).or_default() += 1;
    }
    let heavy = counts.get("heavy").copied().unwrap_or(0);
    let light = counts.get("light").copied().unwrap_or(0);
    assert_eq!(
        heavy + light,
        400,
        "some connections reached a wrong port: {counts:?}"
    );
    // Weight 3:1 gives 300 expected; ±40 is more than four standard deviations.
    assert!(
        (260..=340).contains(&heavy),
        "weights not honoured: {counts:?}"
    );

    let mut plain: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        *plain
            .entry(who("240.240.1.1:81").expect("port 81").server)
            .or_default() += 1;
    }
    assert_eq!(
        plain
            .keys()
            .filter(|name| !name.ends_with("-plain"))
            .count(),
        0,
        "port 81 must map to 81 on each endpoint: {plain:?}"
    );
}

#[test]
fn an_entry_without_addresses_intercepts_its_port_for_every_destination() {
    let sandbox = Sandbox::new("port-only");
    sandbox.add_hosts(&["198.18.0.31"]);
    let _database = TestServer::start("database", "198.18.0.31:5432");
    let _daemon = sandbox.start_daemon(
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: database
spec:
  hosts: [db.test.example]
  ports:
  - number: 5432
    name: postgres
    protocol: TCP
  resolution: STATIC
  endpoints:
  - address: 198.18.0.31
"#,
        &[],
    );
    // Neither destination exists in the namespace: only the redirect can reach the server.
    for destination in ["198.18.0.99:5432", "240.240.9.9:5432"] {
        let seen = who(destination).expect("port-only redirect");
        assert_eq!(seen.server, "database");
        assert!(seen.went_through_proxy());
    }
    let unroutable = connect("198.18.0.99:5433").expect_err("other ports are not intercepted");
    assert_eq!(
        unroutable.kind(),
        ErrorKind::NetworkUnreachable,
        "{unroutable}"
    );
}

#[test]
fn non_matching_destinations_are_left_untouched() {
    let sandbox = Sandbox::new("untouched");
    sandbox.add_hosts(&["198.18.0.40", "198.18.0.41"]);
    let _other_host = TestServer::start("other-host", "198.18.0.41:7000");
    let _other_port = TestServer::start("other-port", "198.18.0.40:7001");
    let daemon = sandbox.start_daemon(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: one-host
spec:
  hosts: [one.test.example]
  addresses: [198.18.0.40/32]
  ports:
  - number: 7000
    name: tcp
    protocol: TCP
  resolution: NONE
"#,
        &[],
    );
    for (destination, server) in [
        ("198.18.0.41:7000", "other-host"),
        ("198.18.0.40:7001", "other-port"),
    ] {
        let seen = who(destination).expect("direct connection");
        assert_eq!(seen.server, server);
        assert!(
            !seen.went_through_proxy(),
            "{destination} was redirected: {seen:?}"
        );
        assert_eq!(seen.client_peer.to_string(), destination);
        assert_eq!(
            seen.server_peer, seen.client_local,
            "the connection was proxied"
        );
    }
    assert!(!daemon.logs().contains("connection closed"));
}

#[test]
fn a_direct_connection_to_the_proxy_port_is_refused() {
    let sandbox = Sandbox::new("no-open-relay");
    let daemon = sandbox.start_daemon(NONE_RANGE, &[]);
    assert_refused_by_proxy(PROXY, b"WHO\n");
    daemon.wait_for_log("refused: no redirect record", 1);
}

#[test]
fn sigkill_leaves_no_program_attached_and_no_redirect() {
    let sandbox = Sandbox::new("sigkill");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _server = TestServer::start("upstream", "198.18.0.10:7000");
    let mut daemon = sandbox.start_daemon(
        &format!(
            "{NONE_RANGE}---\n{}",
            vip_entry("egress", "vip", "240.240.2.2", "198.18.0.10")
        ),
        &[],
    );
    sandbox.assert_programs_attached(1);
    assert!(
        who("240.240.2.2:7000")
            .expect("redirect works")
            .went_through_proxy()
    );

    daemon.signal(libc::SIGKILL);
    assert_eq!(daemon.wait(), None, "killed by a signal");

    sandbox.assert_programs_attached(0);
    // A redirect to the dead proxy port would be "connection refused"; the VIP has no
    // route in the namespace, so an untouched connect is "network unreachable".
    let error = connect("240.240.2.2:7000").expect_err("nothing serves the VIP now");
    assert_eq!(error.kind(), ErrorKind::NetworkUnreachable, "{error}");
    let seen = who("198.18.0.10:7000").expect("direct connection");
    assert!(!seen.went_through_proxy());
}

#[test]
fn sigterm_detaches_and_exits_zero() {
    let sandbox = Sandbox::new("sigterm");
    let mut daemon = sandbox.start_daemon(NONE_RANGE, &[]);
    sandbox.assert_programs_attached(1);
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(), Some(0));
    sandbox.assert_programs_attached(0);
}

/// Java and anything else that opens AF_INET6 sockets reach IPv4 services as
/// ::ffff:a.b.c.d, through connect6; those connects must be intercepted like IPv4
/// ones, and native IPv6 destinations left alone.
#[test]
fn dual_stack_sockets_reaching_ipv4_mapped_addresses_are_intercepted() {
    let sandbox = Sandbox::new("v4-mapped");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _vip_backend = TestServer::start("vip-backend", "198.18.0.10:7000");
    let _port_backend = TestServer::start("port-backend", "198.18.0.10:7001");
    let _native = TestServer::start("native-v6", "[::1]:7001");
    let config = vip_entry("egress", "vip", "240.240.3.3", "198.18.0.10")
        + r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: any-address
spec:
  hosts: [any.test.example]
  ports:
  - number: 7001
    name: tcp
    protocol: TCP
  resolution: NONE
"#;
    let daemon = sandbox.start_daemon(&config, &[]);
    // getpeername shows each socket the address it connected to, not the proxy.
    let seen = who("[::ffff:240.240.3.3]:7000").expect("VIP through a dual-stack socket");
    assert_eq!(seen.server, "vip-backend");
    assert!(seen.went_through_proxy(), "{seen:?}");
    assert_eq!(seen.client_peer.to_string(), "[::ffff:240.240.3.3]:7000");

    let seen = who("[::ffff:198.18.0.10]:7001").expect("port-only entry, dual-stack socket");
    assert_eq!(seen.server, "port-backend");
    assert!(seen.went_through_proxy(), "{seen:?}");
    assert_eq!(seen.client_peer.to_string(), "[::ffff:198.18.0.10]:7001");

    let logs = daemon.wait_for_log("connection closed", 2);
    assert!(logs.contains("original_dst=240.240.3.3:7000"), "{logs}");
    assert!(logs.contains("original_dst=198.18.0.10:7001"), "{logs}");

    // Native IPv6 on the port-only entry's port goes through the IPv6 listener.
    let seen = who("[::1]:7001").expect("native IPv6 on a port-only port");
    assert_eq!(seen.server, "native-v6");
    assert!(seen.went_through_proxy(), "{seen:?}");
    assert_eq!(seen.client_peer.to_string(), "[::1]:7001");
}

/// Istio allocates IPv6 VIPs from 2001:2::/48; like 240.240.0.0/16 here, nothing in
/// the namespace routes there, so only a redirect reaches them.
const IPV6_ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: v6-vip
  namespace: egress
spec:
  hosts: [v6-vip.egress.test]
  addresses: ["2001:2::a"]
  ports:
  - number: 7000
    name: tcp
  resolution: STATIC
  endpoints:
  - address: "fd00:18::10"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: dual-vip
  namespace: egress
spec:
  hosts: [dual-vip.egress.test]
  addresses: [240.240.6.6, "2001:2::6"]
  ports:
  - number: 7000
    name: tcp
  resolution: STATIC
  endpoints:
  - address: 198.18.0.10
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: v6-range
  namespace: egress
spec:
  hosts: [v6-range.egress.test]
  addresses: ["fd00:18::/64"]
  ports:
  - number: 7002
    name: tcp
  resolution: NONE
"#;

#[test]
fn native_ipv6_vips_and_cidrs_are_intercepted_through_the_ipv6_listener() {
    let sandbox = Sandbox::new("ipv6");
    sandbox.add_hosts(&["198.18.0.10", "fd00:18::10"]);
    let _v6_backend = TestServer::start("v6-backend", "[fd00:18::10]:7000");
    let _v4_backend = TestServer::start("v4-backend", "198.18.0.10:7000");
    let _range_backend = TestServer::start("range-backend", "[fd00:18::10]:7002");
    let _untouched = TestServer::start("untouched", "[fd00:18::10]:7003");
    let daemon = sandbox.start_daemon(IPV6_ENTRIES, &[]);

    let seen = who("[2001:2::a]:7000").expect("IPv6 VIP");
    assert_eq!(seen.server, "v6-backend");
    assert!(seen.went_through_proxy(), "{seen:?}");
    assert_eq!(seen.client_peer.to_string(), "[2001:2::a]:7000");

    // One entry with a VIP of each family; the IPv6 client reaches an IPv4 endpoint.
    for vip in ["240.240.6.6:7000", "[2001:2::6]:7000"] {
        let seen = who(vip).expect(vip);
        assert_eq!(seen.server, "v4-backend", "{vip}");
        assert!(seen.went_through_proxy(), "{vip}: {seen:?}");
        assert_eq!(seen.client_peer.to_string(), vip);
    }

    // NONE over an IPv6 CIDR: forwarded to the address the client asked for.
    let seen = who("[fd00:18::10]:7002").expect("IPv6 CIDR, NONE");
    assert_eq!(seen.server, "range-backend");
    assert!(seen.went_through_proxy(), "{seen:?}");

    let seen = who("[fd00:18::10]:7003").expect("a port no entry claims");
    assert_eq!(seen.server, "untouched");
    assert!(!seen.went_through_proxy(), "{seen:?}");

    let logs = daemon.wait_for_log("connection closed", 4);
    for original in [
        "original_dst=[2001:2::a]:7000",
        "original_dst=[2001:2::6]:7000",
        "original_dst=240.240.6.6:7000",
        "original_dst=[fd00:18::10]:7002",
    ] {
        assert!(logs.contains(original), "{original} missing from:\n{logs}");
    }
}

#[test]
fn with_the_ipv6_listener_off_ipv6_destinations_go_direct() {
    let sandbox = Sandbox::new("ipv6-off");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _v4_backend = TestServer::start("v4-backend", "198.18.0.10:7000");
    let _daemon = sandbox.start_daemon(IPV6_ENTRIES, &["--proxy-addr-v6", "off"]);

    let error = connect("[2001:2::6]:7000").expect_err("IPv6 is not intercepted");
    assert_eq!(error.kind(), ErrorKind::NetworkUnreachable, "{error}");
    let seen = who("240.240.6.6:7000").expect("the entry's IPv4 VIP still is");
    assert_eq!(seen.server, "v4-backend");
    assert!(seen.went_through_proxy(), "{seen:?}");
}

#[test]
fn ten_mib_each_way_arrive_intact() {
    ten_mib_each_way("userspace");
}

#[test]
fn ten_mib_each_way_arrive_intact_through_splice() {
    ten_mib_each_way("splice");
}

fn ten_mib_each_way(copy_mode: &str) {
    const TEN_MIB: usize = 10 * 1024 * 1024;
    let sandbox = Sandbox::new(&format!("bulk-{copy_mode}"));
    sandbox.add_hosts(&["198.18.0.10"]);
    let _server = TestServer::start("bulk", "198.18.0.10:7000");
    let _daemon = sandbox.start_daemon(NONE_RANGE, &["--copy-mode", copy_mode]);

    let mut stream = connect("198.18.0.10:7000").expect("connect");
    stream
        .write_all(format!("BULK {TEN_MIB}\n").as_bytes())
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    // Write and read at once: with both directions in flight, a proxy that serialises
    // them or loses a half-close would deadlock or truncate.
    let upload = std::thread::spawn(move || {
        write_pattern(&mut writer, TEN_MIB).expect("upload");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut reader = BufReader::new(stream);
    let mut summary = String::new();
    reader.read_line(&mut summary).expect("server summary");
    let mut downloaded = Checksum::default();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = reader.read(&mut buffer).expect("download");
        if read == 0 {
            break;
        }
        downloaded.update(&buffer[..read]);
    }
    upload.join().unwrap();

    let expected = pattern_checksum(TEN_MIB);
    assert_eq!(
        summary.trim(),
        format!("{TEN_MIB} {:016x}", expected.value()),
        "the upload arrived damaged"
    );
    assert_eq!(downloaded.length, TEN_MIB);
    assert_eq!(
        downloaded.value(),
        expected.value(),
        "the download arrived damaged"
    );
}

#[test]
fn an_invalid_config_is_refused_whole_and_nothing_is_attached() {
    let sandbox = Sandbox::new("invalid");
    let config = sandbox.workdir.join("invalid.yaml");
    // The first document is fine; the second has an error. Nothing may be applied.
    std::fs::write(
        &config,
        format!(
            "{NONE_RANGE}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: broken}}\nspec:\n  hosts: [broken.test.example]\n  addresses: [240.240.9.0/24]\n  ports: [{{number: 7000, name: tcp, targetPort: 70000}}]\n  resolution: DNS\n"
        ),
    )
    .unwrap();
    let error = integration_tests::daemon::start(&config, &sandbox.cgroup, &[])
        .err()
        .expect("the daemon must refuse an invalid config");
    let message = format!("{error:#}");
    assert!(message.contains("document 1"), "{message}");
    assert!(message.contains("ServiceEntry/default/broken"), "{message}");
    assert!(message.contains("spec.ports[0].targetPort"), "{message}");
    assert!(
        message.contains("CIDR addresses are allowed only for NONE/STATIC"),
        "{message}"
    );
    assert_eq!(
        attached_programs(&sandbox.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap(),
        0
    );

    let (code, stdout) = integration_tests::daemon::validate(&config);
    assert_eq!(code, Some(1));
    assert_eq!(
        stdout
            .lines()
            .filter(|line| line.starts_with("error:"))
            .count(),
        2,
        "{stdout}"
    );
}

#[test]
fn an_upstream_that_refuses_resets_the_client_promptly() {
    let sandbox = Sandbox::new("upstream-refuses");
    sandbox.add_hosts(&["198.18.0.10"]);
    // Nothing listens on 198.18.0.10:7000.
    let daemon = sandbox.start_daemon(NONE_RANGE, &[]);
    let started = std::time::Instant::now();
    assert_refused_by_proxy("198.18.0.10:7000", b"WHO\n");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    daemon.wait_for_log("upstream connect failed; resetting the client", 1);
}
