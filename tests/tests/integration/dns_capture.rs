//! DNS capture: real resolvers in the cgroup (glibc's `getent`, Python's
//! `getaddrinfo`, `dig`) send their queries to the nameserver in /etc/resolv.conf;
//! the programs take them to the daemon's DNS server, which answers ServiceEntry
//! hosts and relays the rest to a real DNS server on a test host's port 53.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use integration_tests::{
    Container, Daemon, Sandbox, TestServer,
    daemon::{self, stop_while_connecting},
    dns::{DnsServer, ask_tcp, ask_udp, ipv4_answers},
    server::who,
    tls::{HelloDelivery, TestCa, start_tls_server, tls_who},
};

const UPSTREAM: &str = "198.18.0.53:53";
/// A nameserver address with nothing behind it in the sandbox: a query there is
/// answered only if the programs capture it.
const NAMESERVER: &str = "198.18.0.52:53";

/// Runs a resolver in the sandbox (the calling thread's network namespace, the test's
/// cgroup) and returns its standard output.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program} (is it installed?): {error}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn getent(name: &str) -> String {
    run("getent", &["ahostsv4", name])
}

fn getaddrinfo(name: &str) -> String {
    run(
        "python3",
        &[
            "-c",
            "import socket, sys\n\
             try:\n    print(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)}))\n\
             except socket.gaierror as e:\n    print('error', e)",
            name,
        ],
    )
}

/// `dig` through the system resolver configuration, one try.
fn dig(args: &[&str]) -> String {
    let mut all = vec!["+time=6", "+tries=1"];
    all.extend_from_slice(args);
    run("dig", &all)
}

fn entry(name: &str, host: &str, vip: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{host}]\n  addresses: [{vip}]\n  ports: [{{number: 5432, name: tcp, protocol: TCP}}]\n  resolution: STATIC\n  endpoints: [{{address: 198.18.0.54}}]\n"
    )
}

fn start(sandbox: &Sandbox, upstream: &str) -> Daemon {
    sandbox.start_daemon(
        &entry("db", "db.capture.test", "240.240.7.1"),
        &["--dns-server", upstream],
    )
}

#[test]
fn resolvers_in_the_cgroup_get_local_answers_and_forwarded_ones() {
    let sandbox = Sandbox::new("dns-capture");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    let upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    upstream.set("other.capture.test", &["198.18.0.91"], 60);
    let _daemon = start(&sandbox, UPSTREAM);

    // Local answers, never asked upstream.
    assert!(
        getent("db.capture.test").contains("240.240.7.1"),
        "{}",
        getent("db.capture.test")
    );
    assert_eq!(getaddrinfo("DB.capture.test").trim(), "['240.240.7.1']");
    let udp = dig(&["db.capture.test", "A"]);
    assert!(
        udp.contains("240.240.7.1") && udp.contains("\t30\tIN\tA"),
        "{udp}"
    );
    let tcp = dig(&["+tcp", "db.capture.test", "A"]);
    assert!(tcp.contains("240.240.7.1"), "{tcp}");
    let aaaa = dig(&["db.capture.test", "AAAA"]);
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "AAAA for a v4-only host is an empty NOERROR: {aaaa}"
    );
    assert_eq!(upstream.queries("db.capture.test"), 0);

    // Forwarded: an unknown name, and MX for a known one. The daemon's own query to
    // the upstream's port 53 carries the bypass mark, so it is not captured back.
    assert!(getent("other.capture.test").contains("198.18.0.91"));
    assert_eq!(getaddrinfo("other.capture.test").trim(), "['198.18.0.91']");
    let mx = dig(&["db.capture.test", "MX"]);
    assert!(mx.contains("status: NXDOMAIN"), "{mx}");
    assert_eq!(upstream.queries("db.capture.test"), 1);
    let missing = dig(&["missing.capture.test", "A"]);
    assert!(missing.contains("status: NXDOMAIN"), "{missing}");
}

#[test]
fn a_dead_upstream_gets_servfail_within_five_seconds() {
    let sandbox = Sandbox::new("dns-dead");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    let upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    upstream.set_silent(true);
    let _daemon = start(&sandbox, UPSTREAM);
    let answer = dig(&["nowhere.capture.test", "A"]);
    assert!(answer.contains("status: SERVFAIL"), "{answer}");
    // dig's own measure, from its query to the answer: what a stub resolver waits,
    // without dig's start (which takes seconds in an emulated VM).
    let waited: u64 = answer
        .lines()
        .find_map(|line| line.strip_prefix(";; Query time: "))
        .and_then(|rest| rest.strip_suffix(" msec"))
        .and_then(|millis| millis.parse().ok())
        .unwrap_or_else(|| panic!("no query time in {answer}"));
    assert!(waited < 5_000, "SERVFAIL after {waited} ms");
    // A local name still answers at once.
    assert!(dig(&["db.capture.test"]).contains("240.240.7.1"));
}

fn static_entry(name: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}.capture.test]\n  ports: [{{number: 5432, name: tcp, protocol: TCP}}]\n  resolution: STATIC\n  endpoints: [{{address: {endpoint}}}]\n"
    )
}

/// The IPv4 address glibc resolves `name` to.
fn vip(name: &str) -> String {
    let answer = getent(name);
    let ip = answer
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{name} does not resolve: {answer:?}"));
    assert!(ip.starts_with("240.240."), "{name} → {ip}");
    ip.to_owned()
}

#[test]
fn two_tcp_entries_on_one_port_each_reach_their_backend_through_their_vip() {
    let sandbox = Sandbox::new("dns-vips");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    let _upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    for (name, host) in [
        ("a", "198.18.0.61"),
        ("b", "198.18.0.62"),
        ("c", "198.18.0.63"),
    ] {
        sandbox.add_host(host.parse().unwrap());
        std::mem::forget(TestServer::start(name, &format!("{host}:5432")));
    }
    let state_dir = sandbox.workdir.join("state");
    let state = state_dir.to_str().unwrap().to_owned();
    let args = ["--dns-server", UPSTREAM, "--state-dir", &state];
    let two = [
        static_entry("db-a", "198.18.0.61"),
        static_entry("db-b", "198.18.0.62"),
    ]
    .join("---\n");
    let daemon = sandbox.start_daemon(&two, &args);

    let (a, b) = (vip("db-a.capture.test"), vip("db-b.capture.test"));
    assert_ne!(a, b);
    for (ip, backend) in [(&a, "a"), (&b, "b")] {
        let seen = who(&format!("{ip}:5432")).unwrap();
        assert!(seen.went_through_proxy());
        assert_eq!(seen.server, backend);
    }

    // A VIP intercepts only its entries' ports: another is refused at once.
    let started = Instant::now();
    let refused = std::net::TcpStream::connect_timeout(
        &format!("{a}:5433").parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // A reload that adds a third entry moves neither, and the third gets its own.
    let three = format!("{two}---\n{}", static_entry("db-c", "198.18.0.63"));
    std::fs::write(sandbox.workdir.join("config.yaml"), &three).unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for_log("configuration reloaded", 1);
    assert_eq!(
        (vip("db-a.capture.test"), vip("db-b.capture.test")),
        (a.clone(), b.clone())
    );
    let c = vip("db-c.capture.test");
    assert_eq!(who(&format!("{c}:5432")).unwrap().server, "c");

    // So does a restart, from the state file.
    drop(daemon);
    let _daemon = sandbox.start_daemon(&three, &args);
    assert_eq!(
        (
            vip("db-a.capture.test"),
            vip("db-b.capture.test"),
            vip("db-c.capture.test")
        ),
        (a, b, c)
    );
}

#[test]
fn the_daemons_own_lookups_are_not_captured() {
    // A DNS entry without addresses: clients get its VIP from the daemon, and the
    // daemon resolves the host itself at the upstream's port 53, which its programs
    // would capture (and answer with the VIP, a loop) were its sockets not marked.
    let sandbox = Sandbox::new("dns-own");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    sandbox.add_host("198.18.0.64".parse().unwrap());
    let upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    upstream.set("db-d.capture.test", &["198.18.0.64"], 60);
    let _server = TestServer::start("d", "198.18.0.64:5432");
    let state_dir = sandbox.workdir.join("state");
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db-d}\nspec:\n  hosts: [db-d.capture.test]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: DNS\n";
    let _daemon = sandbox.start_daemon(
        yaml,
        &[
            "--dns-server",
            UPSTREAM,
            "--state-dir",
            state_dir.to_str().unwrap(),
        ],
    );
    let vip = vip("db-d.capture.test");
    let seen = who(&format!("{vip}:5432")).unwrap();
    assert!(seen.went_through_proxy());
    assert_eq!(seen.server, "d");
}

fn nameserver() -> SocketAddr {
    NAMESERVER.parse().unwrap()
}

/// TCP queries, and UDP ones from a connected socket (glibc's way), are captured at
/// connect rather than per datagram: local names are answered, and a relayed name
/// asked over TCP is relayed over TCP, so an answer too big for UDP still arrives.
#[test]
fn tcp_and_connected_udp_queries_are_captured_and_tcp_is_relayed_over_tcp() {
    let sandbox = Sandbox::new("dns-tcp");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    let upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    upstream.set("other.capture.test", &["198.18.0.91"], 60);
    let _daemon = start(&sandbox, UPSTREAM);

    let vip = Ipv4Addr::new(240, 240, 7, 1);
    for (how, reply) in [
        (
            "UDP",
            ask_udp(nameserver(), "db.capture.test", RecordType::A),
        ),
        (
            "TCP",
            ask_tcp(nameserver(), "db.capture.test", RecordType::A),
        ),
    ] {
        let reply = reply.unwrap_or_else(|error| panic!("db.capture.test over {how}: {error}"));
        assert_eq!(ipv4_answers(&reply), [vip], "over {how}: {reply:?}");
        assert!(reply.metadata.authoritative, "over {how}: {reply:?}");
    }
    assert_eq!(upstream.queries("db.capture.test"), 0);

    let relayed = ask_tcp(nameserver(), "other.capture.test", RecordType::A).unwrap();
    assert_eq!(ipv4_answers(&relayed), [Ipv4Addr::new(198, 18, 0, 91)]);
    assert_eq!(upstream.tcp_queries("other.capture.test"), 1);
    let relayed = ask_udp(nameserver(), "other.capture.test", RecordType::A).unwrap();
    assert_eq!(ipv4_answers(&relayed), [Ipv4Addr::new(198, 18, 0, 91)]);
    assert_eq!(
        (
            upstream.queries("other.capture.test"),
            upstream.tcp_queries("other.capture.test")
        ),
        (2, 1),
        "a UDP query is relayed over UDP"
    );

    // dig's own TCP client, to the resolv.conf nameserver.
    let dug = dig(&["+tcp", "other.capture.test", "A"]);
    assert!(dug.contains("198.18.0.91"), "{dug}");
    assert_eq!(upstream.tcp_queries("other.capture.test"), 2);
    let missing = ask_tcp(nameserver(), "missing.capture.test", RecordType::A).unwrap();
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.tcp_queries("missing.capture.test"), 1);
}

/// The VIP of db.capture.test, as a stub resolver asking a captured nameserver
/// gets it, or what it got instead.
fn db_vip() -> Result<Vec<Ipv4Addr>, String> {
    match ask_udp(nameserver(), "db.capture.test", RecordType::A) {
        Ok(reply) if reply.metadata.response_code == ResponseCode::NoError => {
            Ok(ipv4_answers(&reply))
        }
        Ok(reply) => Err(format!("{}", reply.metadata.response_code)),
        Err(error) => Err(error.to_string()),
    }
}

/// A restart without a gap: the new daemon's DNS socket shares the port with the
/// old one's (SO_REUSEPORT), so it gets its share of the captured queries from the
/// moment it binds, before it is ready, and the old one gets none once it stops.
/// Every answer for a ServiceEntry host, throughout, must be its VIP. (A daemon that
/// stored its registry only once its programs were attached relayed them meanwhile,
/// and stub resolvers got the upstream's NXDOMAIN.)
#[test]
fn a_daemon_started_next_to_a_running_one_answers_its_hosts_from_the_first_query() {
    let sandbox = Sandbox::new("dns-handover");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    let upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    upstream.set("slow.capture.test", &["198.18.0.55"], 60);
    // A DNS entry on the kernel path: a daemon resolves its host before it is ready,
    // after its DNS socket is bound. With the upstream silent that takes the lookup
    // timeout, which stretches the start-up window a query can fall into from
    // milliseconds to seconds.
    let slow = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: slow}\nspec:\n  hosts: [slow.capture.test]\n  addresses: [240.240.7.2]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: DNS\n";
    let config = format!(
        "{}---\n{slow}",
        entry("db", "db.capture.test", "240.240.7.1")
    );
    let args = [
        "--dns-server",
        UPSTREAM,
        "--datapath",
        "auto",
        "--dns-timeout-ms",
        "1000",
    ];
    let old = sandbox.start_daemon(&config, &args);
    let vip = vec![Ipv4Addr::new(240, 240, 7, 1)];
    assert_eq!(db_vip(), Ok(vip.clone()));

    upstream.set_silent(true);
    let config_path = sandbox.workdir.join("config.yaml");
    let mut new = daemon::spawn(&config_path, &sandbox.cgroup, &args, &[]).unwrap();
    // This thread owns the sandbox's network namespace: it asks, another waits.
    let starting = std::thread::spawn(move || {
        let ready = new.wait_ready().map_err(|error| format!("{error:#}"));
        (new, ready)
    });
    let mut asked = 0;
    while !starting.is_finished() {
        assert_eq!(
            db_vip(),
            Ok(vip.clone()),
            "query {asked}, while the new daemon started"
        );
        asked += 1;
    }
    let (new, ready) = starting.join().unwrap();
    let took = ready.unwrap();
    assert!(
        took > Duration::from_secs(1),
        "the new daemon was ready after {took:?}, before its lookup could time out: the window this test widens is gone"
    );
    let logs = new.logs();
    assert!(logs.contains("DNS server listening"), "{logs}");

    let (status, _) = stop_while_connecting(
        old,
        Duration::from_millis(100),
        Duration::from_millis(300),
        |queries| {
            assert_eq!(
                db_vip(),
                Ok(vip.clone()),
                "query {queries}, while the old daemon stopped"
            );
        },
    );
    assert_eq!(status, Some(0), "the old daemon exits cleanly");
    assert!(asked > 10, "only {asked} queries during the start");
}

/// A container or pod in a network namespace of its own cannot reach the daemon's
/// loopback: its queries go to the DNS server on the container proxy address, over
/// UDP and TCP, to IPv4 and IPv6 nameservers, and its resolvers see the nameserver
/// they asked answer.
#[test]
fn a_container_in_its_own_network_namespace_gets_answers() {
    let sandbox = Sandbox::new("dns-container");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    let upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    upstream.set("other.capture.test", &["198.18.0.91"], 60);
    let nameserver_v6: SocketAddr = "[fd00:53::53]:53".parse().unwrap();
    let container = Container::start(move || {
        let a = |reply: std::io::Result<hickory_proto::op::Message>| {
            reply.map(|reply| ipv4_answers(&reply))
        };
        (
            a(ask_udp(nameserver(), "db.capture.test", RecordType::A)),
            a(ask_tcp(nameserver(), "db.capture.test", RecordType::A)),
            a(ask_udp(nameserver_v6, "db.capture.test", RecordType::A)),
            a(ask_udp(nameserver(), "other.capture.test", RecordType::A)),
            getent("db.capture.test"),
        )
    });
    // Before Linux 5.14 the daemon refuses container proxy addresses.
    let Some(_daemon) = sandbox.start_container_daemon(
        &entry("db", "db.capture.test", "240.240.7.1"),
        &[
            "--dns-server",
            UPSTREAM,
            "--container-proxy-addr",
            "198.18.5.1:15001",
            "--container-proxy-addr-v6",
            "[fd00:5::1]:15001",
        ],
    ) else {
        return;
    };
    let (udp, tcp, udp_v6, relayed, glibc) = container.run();
    let vip = vec![Ipv4Addr::new(240, 240, 7, 1)];
    assert_eq!(udp.expect("UDP from the container"), vip);
    assert_eq!(tcp.expect("TCP from the container"), vip);
    assert_eq!(udp_v6.expect("UDP to an IPv6 nameserver"), vip);
    assert_eq!(
        relayed.expect("a relayed name from the container"),
        [Ipv4Addr::new(198, 18, 0, 91)]
    );
    assert!(glibc.contains("240.240.7.1"), "{glibc}");
}

/// A wildcard DYNAMIC_DNS entry: each name under it that a client looks up gets a
/// VIP of its own, kept in the state file like a host's, intercepting only the
/// entry's ports, and a connection to it goes to what that name resolves to
/// upstream, for any protocol, without SNI or Host.
#[test]
fn a_name_under_a_dynamic_dns_wildcard_gets_its_own_vip_on_first_lookup() {
    let sandbox = Sandbox::new("dns-wild");
    sandbox.add_host("198.18.0.53".parse().unwrap());
    let upstream = DnsServer::start_on(UPSTREAM.parse().unwrap());
    for (name, host) in [("x", "198.18.0.65"), ("y", "198.18.0.66")] {
        sandbox.add_host(host.parse().unwrap());
        upstream.set(&format!("{name}.wild.capture.test"), &[host], 60);
        std::mem::forget(TestServer::start(name, &format!("{host}:443")));
    }
    // Never looked up: reached by its SNI alone, as in Istio.
    sandbox.add_host("198.18.0.67".parse().unwrap());
    upstream.set("z.wild.capture.test", &["198.18.0.67"], 60);
    let ca = TestCa::new();
    start_tls_server(
        "z",
        "198.18.0.67:443",
        ca.server_config(&["z.wild.capture.test"]),
    );
    let wild = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: wild}\nspec:\n  hosts: [\"*.wild.capture.test\"]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DYNAMIC_DNS\n";
    let state_dir = sandbox.workdir.join("state");
    let args = [
        "--dns-server",
        UPSTREAM,
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    let daemon = sandbox.start_daemon(wild, &args);

    let x = vip("x.wild.capture.test");
    let y = dig(&["+short", "y.wild.capture.test", "A"]);
    let y = y.trim();
    assert!(y.starts_with("240.240."), "{y:?}");
    assert_ne!(x, y);
    assert_eq!(
        upstream.queries("x.wild.capture.test"),
        0,
        "answered locally"
    );
    for (ip, backend) in [(x.as_str(), "x"), (y, "y")] {
        let seen = who(&format!("{ip}:443")).unwrap();
        assert!(seen.went_through_proxy(), "{seen:?}");
        assert_eq!(seen.server, backend);
    }
    assert!(
        upstream.queries("x.wild.capture.test") > 0,
        "resolved by the daemon"
    );
    let refused = std::net::TcpStream::connect_timeout(
        &format!("{x}:444").parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let by_sni = tls_who(
        "198.18.0.99:443",
        "z.wild.capture.test",
        &ca.client_config(),
        HelloDelivery::Whole,
    )
    .unwrap();
    assert_eq!(by_sni, "z z.wild.capture.test");

    let state = std::fs::read_to_string(state_dir.join("vips.json")).unwrap();
    assert!(state.contains("\"x.wild.capture.test\""), "{state}");
    drop(daemon);
    let _daemon = sandbox.start_daemon(wild, &args);
    assert_eq!(vip("x.wild.capture.test"), x, "kept across a restart");
}

/// The state file keeps VIPs stable: one that cannot be read or written stops the
/// start, naming it, rather than handing out addresses that would move.
#[test]
fn a_state_file_that_cannot_be_used_stops_the_start_and_is_named() {
    let sandbox = Sandbox::new("dns-state");
    let config = sandbox.workdir.join("config.yaml");
    std::fs::write(&config, static_entry("db-a", "198.18.0.61")).unwrap();
    let corrupt = sandbox.workdir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("vips.json"), "{not json").unwrap();
    // A state directory that is a file: nothing can be read or written under it.
    let not_a_directory = sandbox.workdir.join("not-a-directory");
    std::fs::write(&not_a_directory, "").unwrap();
    for (dir, expected) in [(&corrupt, "is corrupt"), (&not_a_directory, "cannot read")] {
        let error = daemon::start(
            &config,
            &sandbox.cgroup,
            &["--state-dir", dir.to_str().unwrap()],
        )
        .err()
        .expect("the daemon refuses to start");
        let message = format!("{error:#}");
        let file = dir.join("vips.json").display().to_string();
        assert!(
            message.contains(&file) && message.contains(expected),
            "{message}"
        );
    }
}
