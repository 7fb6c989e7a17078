//! Operating the daemon: live reload (SIGHUP and file changes), the admin server
//! (readiness, config dump, live connections, metrics), graceful shutdown, and the
//! systemd notify protocol.

use std::{
    fs,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    os::linux::net::SocketAddrExt as _,
    os::unix::net::{SocketAddr as UnixAddr, UnixDatagram},
    os::unix::process::CommandExt as _,
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    Daemon, PROXY, Sandbox, TestServer,
    admin::{ADMIN, get, get_from, get_ok, scrape, scrape_until},
    daemon::{self, stop_while_connecting},
    server::{assert_refused_by_proxy, connect, who},
    vip_entry,
};
use testbed::{
    bpf::{BPF_CGROUP_INET4_CONNECT, attached_programs},
    process,
};

const ADMIN_ARGS: [&str; 2] = ["--admin-addr", ADMIN];

/// An ECHO session: the server's name, then every line back.
struct Echo {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    server: String,
}

impl Echo {
    fn open(addr: &str) -> Self {
        let mut echo = Self::begin(addr);
        echo.answer(Duration::from_secs(10)).expect("server name");
        echo
    }

    /// Connects and asks for an echo, without waiting for the answer.
    fn begin(addr: &str) -> Self {
        let mut writer = connect(addr).unwrap_or_else(|error| panic!("connect {addr}: {error}"));
        writer.write_all(b"ECHO\n").expect("send ECHO");
        let reader = BufReader::new(writer.try_clone().expect("clone"));
        Self {
            reader,
            writer,
            server: String::new(),
        }
    }

    /// Waits up to `timeout` for the server's name.
    fn answer(&mut self, timeout: Duration) -> std::io::Result<()> {
        let stream = self.reader.get_ref();
        stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut server = String::new();
        self.reader.read_line(&mut server)?;
        self.server = server.trim().to_owned();
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
    }

    fn round_trip(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("send a line");
        let mut echoed = String::new();
        self.reader.read_line(&mut echoed).expect("read the echo");
        assert_eq!(echoed, format!("{line}\n"), "the echo came back wrong");
    }

    /// Half-closes and reads to the server's EOF.
    fn finish(mut self) {
        self.writer.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = String::new();
        self.reader.read_to_string(&mut rest).expect("read to EOF");
        assert!(rest.is_empty(), "unexpected bytes {rest:?}");
    }
}

fn reloads(result: &str) -> f64 {
    scrape().must("interceptor_config_reloads_total", &[("result", result)])
}

fn wait_for_reloads(result: &str, count: f64) {
    scrape_until(Duration::from_secs(10), |scrape| {
        scrape.value("interceptor_config_reloads_total", &[("result", result)]) >= Some(count)
    });
}

#[test]
fn a_reload_keeps_open_connections_and_new_connections_follow_the_new_config() {
    let sandbox = Sandbox::new("ops-reload");
    sandbox.add_hosts(&["198.18.10.1", "198.18.10.2"]);
    let _old = TestServer::start("old", "198.18.10.1:7000");
    let _new = TestServer::start("new", "198.18.10.2:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"),
        &ADMIN_ARGS,
    );
    let mut open = Echo::open("240.240.10.1:7000");
    assert_eq!(open.server, "old");
    open.round_trip("before the reload");

    sandbox.write_config(&vip_entry("ops", "echo", "240.240.10.1", "198.18.10.2"));
    wait_for_reloads("ok", 1.0);
    assert!(
        get_ok("/config_dump").contains("198.18.10.2"),
        "the dump shows the new endpoint"
    );

    // The connection opened under the old config still flows, to the old server.
    open.round_trip("after the reload");
    let seen = who("240.240.10.1:7000").expect("connect after the reload");
    assert!(seen.went_through_proxy());
    assert_eq!(seen.server, "new", "a new connection uses the new config");
    open.round_trip("still there");
    open.finish();
    assert_eq!(reloads("failed"), 0.0);
    assert!(daemon.logs().contains("configuration reloaded"));
}

#[test]
fn an_invalid_reload_changes_nothing_and_is_counted() {
    let sandbox = Sandbox::new("ops-invalid-reload");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _old = TestServer::start("old", "198.18.10.1:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"),
        &ADMIN_ARGS,
    );
    let dump_before = get_ok("/config_dump");

    // Valid YAML, invalid config: a second entry with a port out of range.
    let invalid = format!(
        "{}---\n{}",
        vip_entry("ops", "echo", "240.240.10.1", "198.18.10.2"),
        vip_entry("ops", "broken", "240.240.10.9", "198.18.10.1")
            .replace("number: 7000", "number: 70000")
    );
    sandbox.write_config(&invalid);
    wait_for_reloads("failed", 1.0);

    assert_eq!(reloads("ok"), 0.0);
    assert_eq!(
        get_ok("/config_dump"),
        dump_before,
        "the running config changed"
    );
    let seen = who("240.240.10.1:7000").expect("the old routing still works");
    assert_eq!(seen.server, "old");
    assert!(seen.went_through_proxy());
    // Nothing of the new config reached the kernel either: its VIP is not intercepted.
    let error = connect("240.240.10.9:7000").expect_err("240.240.10.9 was never applied");
    assert_eq!(error.kind(), ErrorKind::NetworkUnreachable, "{error}");
    let logs = daemon.logs();
    assert!(logs.contains("reload failed"), "{logs}");
    assert!(logs.contains("ServiceEntry/ops/broken"), "{logs}");
}

#[test]
fn a_reload_short_of_descriptors_is_not_called_invalid_and_is_tried_again() {
    let sandbox = Sandbox::new("ops-reload-shortage");
    sandbox.add_hosts(&["198.18.10.1", "198.18.10.2"]);
    let _old = TestServer::start("old", "198.18.10.1:7000");
    let _new = TestServer::start("new", "198.18.10.2:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"),
        &ADMIN_ARGS,
    );
    // No descriptor left to open the config file with: the idle daemon holds its
    // listeners and nothing that comes and goes.
    let pid = daemon.pid();
    let free = process::lowest_free_descriptor(pid).unwrap();
    let previous = process::set_open_files_soft_limit(pid, free).unwrap();
    sandbox.write_config(&vip_entry("ops", "echo", "240.240.10.1", "198.18.10.2"));
    let logs = daemon.wait_for_log("could not be read for want of descriptors or memory", 1);
    process::set_open_files_soft_limit(pid, previous).unwrap();
    assert!(logs.contains("Too many open files"), "{logs}");
    assert!(
        !logs.contains("configuration is invalid"),
        "a shortage is no invalid config:\n{logs}"
    );

    // Nothing changes the file again: the retry applies it.
    wait_for_reloads("ok", 1.0);
    assert!(
        daemon.logs().contains("retry after a shortage"),
        "{}",
        daemon.logs()
    );
    let seen = who("240.240.10.1:7000").expect("connect after the retry");
    assert_eq!(seen.server, "new");
}

/// A ServiceEntry for a database on VMs, its endpoints chosen by label, and the
/// WorkloadEntries of `vms` (name, address, labels).
fn selected_workloads(vms: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: db
  namespace: data
spec:
  hosts: [db.vms.example]
  addresses: [240.240.11.1]
  ports:
  - number: 5432
    name: pg
    protocol: TCP
  resolution: STATIC
  workloadSelector:
    labels: {app: db}
"#,
    );
    for (name, address, labels) in vms {
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: data\nspec:\n  address: {address}\n  labels: {labels}\n  ports: {{pg: 7000}}\n"
        ));
    }
    yaml
}

/// Which servers 60 connections to the VIP reached.
fn servers_behind(addr: &str) -> std::collections::BTreeSet<String> {
    (0..60)
        .map(|_| {
            let seen = who(addr).unwrap_or_else(|error| panic!("connect {addr}: {error}"));
            assert!(seen.went_through_proxy(), "{seen:?}");
            seen.server
        })
        .collect()
}

#[test]
fn a_workload_selector_follows_the_workload_entries_across_a_reload() {
    let sandbox = Sandbox::new("ops-selector");
    sandbox.add_hosts(&["198.18.11.1", "198.18.11.2", "198.18.11.3"]);
    let _a = TestServer::start("vm-a", "198.18.11.1:7000");
    let _b = TestServer::start("vm-b", "198.18.11.2:7000");
    let _c = TestServer::start("vm-c", "198.18.11.3:7000");
    let daemon = sandbox.start_daemon(
        &selected_workloads(&[
            ("vm-a", "198.18.11.1", "{app: db}"),
            ("vm-b", "198.18.11.2", "{app: db, version: v2}"),
            ("vm-c", "198.18.11.3", "{app: web}"),
        ]),
        &ADMIN_ARGS,
    );
    assert_eq!(
        servers_behind("240.240.11.1:5432"),
        ["vm-a", "vm-b"].map(String::from).into(),
        "the selector chooses app=db only, on the mapped port"
    );
    assert!(
        get_ok("/config_dump").contains("WorkloadEntry/data/vm-b"),
        "the dump names the WorkloadEntry behind each endpoint"
    );

    // vm-a is retired and vm-c relabelled: only the WorkloadEntries change.
    sandbox.write_config(&selected_workloads(&[
        ("vm-b", "198.18.11.2", "{app: db, version: v2}"),
        ("vm-c", "198.18.11.3", "{app: db}"),
    ]));
    wait_for_reloads("ok", 1.0);
    assert_eq!(
        servers_behind("240.240.11.1:5432"),
        ["vm-b", "vm-c"].map(String::from).into()
    );

    // With nothing selected, connections are refused rather than sent anywhere.
    sandbox.write_config(&selected_workloads(&[(
        "vm-c",
        "198.18.11.3",
        "{app: web}",
    )]));
    wait_for_reloads("ok", 2.0);
    assert_refused_by_proxy("240.240.11.1:5432", b"WHO\n");
    daemon.wait_for_log("selects no usable WorkloadEntry in namespace data", 1);
}

/// The thread of `pid` named `name`, as /proc/<pid>/task/<tid>. A Rust thread names
/// itself once it runs, which may be after the daemon logged that it is ready.
fn thread_named(pid: u32, name: &str) -> std::path::PathBuf {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("list the daemon's threads")
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|task| {
                std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == name)
            });
        if let Some(task) = found {
            return task;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon has no thread named {name}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGSTOP reaches a process's threads one by one; a worker still running could
/// drain records meant to pile up.
fn wait_until_every_thread_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("list the daemon's threads")
            .filter_map(Result::ok)
            .filter(|task| {
                // The state follows the parenthesised command name.
                std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| !rest.starts_with('T'))
                })
            })
            .count();
        if running == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{running} threads still run after SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Nanoseconds a thread has run, from the scheduler's own accounting.
fn run_nanos(task: &Path) -> u64 {
    let schedstat = std::fs::read_to_string(task.join("schedstat")).expect("read schedstat");
    schedstat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .expect("schedstat starts with the run time")
}

/// How long `task` ran while `during` ran and for `settle` afterwards, in µs.
fn ran_micros(task: &Path, during: impl FnOnce(), settle: Duration) -> u64 {
    let before = run_nanos(task);
    during();
    std::thread::sleep(settle);
    (run_nanos(task) - before) / 1000
}

#[test]
fn busy_polling_spins_while_events_come_close_together_and_stops_when_idle() {
    let sandbox = Sandbox::new("ops-busy-poll");
    sandbox.add_hosts(&["198.18.12.1"]);
    let _server = TestServer::start("polled", "198.18.12.1:7000");
    // The longest budget, 10 ms, so the spin stands out from the work itself.
    let daemon = sandbox.start_daemon(
        &vip_entry("ops", "polled", "240.240.12.1", "198.18.12.1"),
        &["--busy-poll-us", "10000", "--workers", "1"],
    );
    let worker = thread_named(daemon.pid(), "proxy-0");
    let mut echo = Echo::open("240.240.12.1:7000");
    assert_eq!(echo.server, "polled");
    // Requests `apart` from each other on one connection, for 240 ms.
    let mut session = |apart: Duration| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(240) {
            echo.round_trip("ping");
            std::thread::sleep(apart);
        }
    };
    let settle = Duration::from_millis(100);
    // The connection's own events opened the window; the spin after them ends well
    // within this.
    std::thread::sleep(settle);

    let idle = ran_micros(&worker, || {}, Duration::from_millis(300));
    // Gaps of 6 ms, within the budget: the window opens to 2.5, 5, then 10 ms, and
    // from then on the worker spins through every gap.
    let spun = || scrape().must("interceptor_busy_poll_spin_seconds_total", &[]);
    let spun_before = spun();
    let close_gaps = ran_micros(&worker, || session(Duration::from_millis(6)), settle);
    let spun_close = spun() - spun_before;
    // Gaps of 30 ms, past the budget: each one closes the window again, so the worker
    // spins a quarter of the budget after each reply (about 20 ms in all), where a
    // fixed spin would take the whole budget each time (about 80 ms).
    let far_gaps = ran_micros(&worker, || session(Duration::from_millis(30)), settle);
    let spun_far = spun() - spun_before - spun_close;
    let idle_again = ran_micros(&worker, || {}, Duration::from_millis(300));

    // The thread's run time shows a spin on the CPU, but only while the machine has
    // CPU to spare: the spin yields to any other runnable thread, so under tests
    // running alongside it can drop to the forwarding work alone. The metric counts
    // the spin's wall time, which they do not change.
    assert!(
        far_gaps <= 50_000,
        "the worker kept spinning through 30 ms gaps with a 10 ms budget: it ran {far_gaps} µs of 340 ms"
    );
    assert!(
        idle < 1_000 && idle_again < 1_000,
        "an idle worker kept running: {idle} µs and {idle_again} µs in 300 ms"
    );
    // The close gaps keep the window open and the far ones keep closing it, so the
    // first spin is many times the second (both are 0 with busy polling off). A yield
    // can stretch a spin past its window while other tests run, hence the room.
    assert!(
        spun_close >= 0.1 && spun_far < 0.06 && spun_close > 3.0 * spun_far,
        "interceptor_busy_poll_spin_seconds_total rose {spun_close} s over 6 ms gaps and \
         {spun_far} s over 30 ms gaps (the worker ran {close_gaps} µs and {far_gaps} µs)"
    );
    assert!(
        !daemon.logs().contains("busy polling is off"),
        "{}",
        daemon.logs()
    );
}

#[test]
fn busy_polling_spins_every_worker_while_one_is_busy() {
    let sandbox = Sandbox::new("ops-busy-group");
    sandbox.add_hosts(&["198.18.12.2"]);
    let _server = TestServer::start("polled", "198.18.12.2:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("ops", "polled", "240.240.12.2", "198.18.12.2"),
        &["--busy-poll-us", "10000", "--workers", "2"],
    );
    let workers = [
        thread_named(daemon.pid(), "proxy-0"),
        thread_named(daemon.pid(), "proxy-1"),
    ];
    let mut echo = Echo::open("240.240.12.2:7000");
    assert_eq!(echo.server, "polled");
    let spun = || scrape().must("interceptor_busy_poll_spin_seconds_total", &[]);
    // One connection, so one worker has events: requests 6 ms apart open its window
    // to the whole budget within a few (as in the test above), and from then on it
    // spins through every gap.
    let spun_before = spun();
    let session = Duration::from_millis(300);
    let started = Instant::now();
    while started.elapsed() < session {
        echo.round_trip("ping");
        std::thread::sleep(Duration::from_millis(6));
    }
    let took = started.elapsed();
    // The spin after the last request ends within a budget.
    std::thread::sleep(Duration::from_millis(100));
    let spun_busy = spun() - spun_before;
    let idle: Vec<u64> = (workers.iter())
        .map(|worker| ran_micros(worker, || {}, Duration::from_millis(300)))
        .collect();

    // The metric adds up wall time spun, which a worker alone cannot make longer
    // than the session; the other, which had no events, spun through it too.
    assert!(
        spun_busy > took.as_secs_f64() * 1.3,
        "the workers spun {spun_busy} s in all during {took:?} of requests on one of them"
    );
    // The worker that had no events stops with the busy one. (The busy one's window
    // closes only as the test above shows: with a budget this long, the wakes of its
    // own timers can hold it open.)
    assert!(
        idle.iter().min().is_some_and(|ran| *ran < 1_000),
        "the worker without events kept running when the other fell idle: {idle:?} µs \
         in 300 ms each"
    );
}

#[test]
fn sighup_reloads() {
    let sandbox = Sandbox::new("ops-sighup");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"),
        &ADMIN_ARGS,
    );
    assert_eq!(reloads("ok"), 0.0);

    // The files did not change, so only the signal can cause this reload.
    daemon.signal(libc::SIGHUP);
    wait_for_reloads("ok", 1.0);
    daemon.wait_for_log("trigger=\"SIGHUP\"", 1);
    assert!(who("240.240.10.1:7000").unwrap().went_through_proxy());
    assert_eq!(reloads("failed"), 0.0);
}

#[test]
fn a_file_change_reloads_once_per_burst() {
    let sandbox = Sandbox::new("ops-inotify");
    sandbox.add_hosts(&["198.18.10.1", "198.18.10.2"]);
    let _old = TestServer::start("old", "198.18.10.1:7000");
    let _new = TestServer::start("new", "198.18.10.2:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"),
        &ADMIN_ARGS,
    );
    assert_eq!(who("240.240.10.1:7000").unwrap().server, "old");

    // An in-place write (truncate, write, close) is a burst of events.
    std::fs::write(
        sandbox.workdir.join("config.yaml"),
        vip_entry("ops", "echo", "240.240.10.1", "198.18.10.2"),
    )
    .unwrap();
    wait_for_reloads("ok", 1.0);
    daemon.wait_for_log("trigger=\"file change\"", 1);
    assert_eq!(who("240.240.10.1:7000").unwrap().server, "new");

    // Well past the debounce: the burst was one reload.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(reloads("ok"), 1.0);

    // A second file in the same directory is not the config: no reload.
    std::fs::write(sandbox.workdir.join("unrelated.txt"), "x").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(reloads("ok"), 1.0);
}

#[test]
fn when_the_ring_is_full_records_fall_back_to_the_map_and_every_connection_is_served() {
    let sandbox = Sandbox::new("ops-ring-full");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    let config = vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1");
    // One page holds 64 records of 64 bytes.
    let daemon = sandbox.start_daemon(
        &config,
        &[
            ADMIN_ARGS[0],
            ADMIN_ARGS[1],
            "--redirect-ring-bytes",
            "4096",
        ],
    );

    const CONNECTIONS: usize = 200;
    const RING_RECORDS: f64 = 64.0;
    // A stopped daemon reads nothing: the kernel still completes each handshake into
    // the accept queue, and sockops writes each record, until the ring is full.
    daemon.signal(libc::SIGSTOP);
    wait_until_every_thread_stopped(daemon.pid());
    let streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|index| {
            connect("240.240.10.1:7000")
                .unwrap_or_else(|error| panic!("connect {index} while stopped: {error}"))
        })
        .collect();
    daemon.signal(libc::SIGCONT);

    for (index, mut stream) in streams.into_iter().enumerate() {
        stream.write_all(b"WHO\n").unwrap();
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .unwrap_or_else(|error| panic!("connection {index}: {error}"));
        assert!(
            answer.starts_with("server "),
            "connection {index}: {answer:?}"
        );
    }
    let records = |scrape: &integration_tests::admin::Scrape, source| {
        scrape
            .value("interceptor_redirect_records_total", &[("source", source)])
            .unwrap_or(0.0)
    };
    let metrics = scrape_until(Duration::from_secs(10), |scrape| {
        records(scrape, "ring") + records(scrape, "map") == CONNECTIONS as f64
    });
    let from_ring = records(&metrics, "ring");
    assert!(
        (1.0..=RING_RECORDS).contains(&from_ring),
        "{from_ring} records from a ring of {RING_RECORDS}"
    );
    assert_eq!(records(&metrics, "map"), CONNECTIONS as f64 - from_ring);
    assert_eq!(
        metrics.value("interceptor_connections_failed_total", &[]),
        Some(0.0)
    );
}

#[test]
fn metrics_parse_and_match_the_traffic() {
    let sandbox = Sandbox::new("ops-metrics");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    // Nothing listens on 198.18.10.1:7001: the second entry's connects are refused.
    // No route leads to 198.18.10.99: the third entry's are unreachable.
    let config = format!(
        "{}---\n{}---\n{}",
        vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"),
        vip_entry("ops", "dead", "240.240.10.2", "198.18.10.1").replace(
            "  - address: 198.18.10.1\n",
            "  - address: 198.18.10.1\n    ports: {tcp: 7001}\n"
        ),
        vip_entry("ops", "gone", "240.240.10.3", "198.18.10.99"),
    );
    let _daemon = sandbox.start_daemon(&config, &ADMIN_ARGS);

    const CONNECTIONS: usize = 4;
    let (mut sent, mut received) = (0, 0);
    for index in 0..CONNECTIONS {
        let mut echo = Echo::open("240.240.10.1:7000");
        let payload = "x".repeat(100 * (index + 1));
        echo.round_trip(&payload);
        echo.finish();
        sent += "ECHO\n".len() + payload.len() + 1;
        received += "server\n".len() + payload.len() + 1;
    }
    // A direct connection to the proxy port has no redirect record.
    assert_refused_by_proxy(PROXY, b"");
    // The dead entry's endpoint refuses, and the gone entry's has no route.
    assert_refused_by_proxy("240.240.10.2:7000", b"");
    assert_refused_by_proxy("240.240.10.3:7000", b"");

    let metrics = scrape_until(Duration::from_secs(10), |scrape| {
        scrape.value("interceptor_connections_closed_total", &[]) == Some(CONNECTIONS as f64)
            && scrape.value("interceptor_connections_failed_total", &[]) == Some(3.0)
    });
    let entry = [
        ("service_entry", "ServiceEntry/ops/echo"),
        ("host", "echo.ops.test"),
    ];
    let expectations = [
        (
            "interceptor_connections_opened_total",
            &[][..],
            CONNECTIONS as f64 + 3.0,
        ),
        ("interceptor_connections_open", &[], 0.0),
        (
            "interceptor_connections_failed_total",
            &[("reason", "no_redirect_record")],
            1.0,
        ),
        (
            "interceptor_connections_failed_total",
            &[("reason", "upstream_refused")],
            1.0,
        ),
        (
            "interceptor_connections_failed_total",
            &[("reason", "upstream_unreachable")],
            1.0,
        ),
        (
            "interceptor_connections_failed_total",
            &[("reason", "upstream_connect")],
            0.0,
        ),
        (
            "interceptor_connections_failed_total",
            &[("reason", "dns")],
            0.0,
        ),
        // Every redirected connection's record came through the ring buffer, with no
        // system call; the fallback map was never needed.
        (
            "interceptor_redirect_records_total",
            &[("source", "ring")],
            CONNECTIONS as f64 + 2.0,
        ),
        (
            "interceptor_redirect_records_total",
            &[("source", "map")],
            0.0,
        ),
        ("interceptor_sent_bytes_total", &entry, sent as f64),
        ("interceptor_received_bytes_total", &entry, received as f64),
        (
            "interceptor_upstream_connect_duration_seconds_count",
            &[],
            CONNECTIONS as f64,
        ),
        (
            "interceptor_upstream_connect_duration_seconds_bucket",
            &[("le", "+Inf")],
            CONNECTIONS as f64,
        ),
        (
            "interceptor_bpf_map_entries",
            &[("map", "SERVICE_ADDRS")],
            3.0,
        ),
        (
            "interceptor_bpf_map_entries",
            &[("map", "SERVICE_PORTS")],
            0.0,
        ),
        (
            "interceptor_bpf_map_entries",
            &[("map", "ORIG_BY_CLIENT")],
            0.0,
        ),
        (
            "interceptor_bpf_map_max_entries",
            &[("map", "SERVICE_ADDRS")],
            65536.0,
        ),
        (
            "interceptor_bpf_map_max_entries",
            &[("map", "ORIG_BY_CLIENT")],
            262144.0,
        ),
        (
            "interceptor_kernel_events_total",
            &[("event", "storage_unavailable")],
            0.0,
        ),
        (
            "interceptor_kernel_events_total",
            &[("event", "record_lost")],
            0.0,
        ),
        ("interceptor_config_reloads_total", &[("result", "ok")], 0.0),
        ("interceptor_dns_lookups_total", &[], 0.0),
    ];
    for (name, labels, expected) in expectations {
        assert_eq!(metrics.must(name, labels), expected, "{name} {labels:?}");
    }
    assert!(metrics.must("interceptor_upstream_connect_duration_seconds_sum", &[]) > 0.0);
    assert!(
        metrics.must(
            "interceptor_config_last_reload_success_timestamp_seconds",
            &[]
        ) > 1.0e9
    );
    assert_eq!(metrics.types["interceptor_connections_opened"], "counter");
    assert_eq!(
        metrics.types["interceptor_upstream_connect_duration_seconds"],
        "histogram"
    );
    // No client address ever becomes a label (clients here connect from 127.0.0.1).
    assert!(
        metrics
            .samples
            .iter()
            .flat_map(|sample| sample.labels.values())
            .all(|value| !value.contains("127.0.0.1")),
        "{:#?}",
        metrics.samples
    );
}

#[test]
fn connections_and_config_dump_show_what_the_daemon_is_doing() {
    let sandbox = Sandbox::new("ops-connections");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    let _daemon = sandbox.start_daemon(
        &format!(
            "{}---\n{}",
            vip_entry("ops", "first", "240.240.10.3", "198.18.10.1"),
            vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1")
        ),
        &ADMIN_ARGS,
    );

    let dump: serde_json::Value = serde_json::from_str(&get_ok("/config_dump")).unwrap();
    let services = dump["services"].as_array().expect("services");
    let echo = services
        .iter()
        .find(|service| service["name"] == "ServiceEntry/ops/echo")
        .expect("the echo entry");
    let config = sandbox.workdir.join("config.yaml");
    assert_eq!(echo["source"]["file"], config.to_str().unwrap());
    assert_eq!(echo["source"]["document"], 1);
    assert_eq!(echo["endpoints"][0]["address"]["ip"], "198.18.10.1");

    let mut open = Echo::open("240.240.10.1:7000");
    open.round_trip("hello");
    let client = open.writer.local_addr().unwrap().to_string();
    let listed: serde_json::Value = serde_json::from_str(&get_ok("/connections")).unwrap();
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let connection = &listed[0];
    assert_eq!(connection["client"], client.as_str());
    assert_eq!(connection["original_destination"], "240.240.10.1:7000");
    assert_eq!(connection["service_entry"], "ServiceEntry/ops/echo");
    assert_eq!(connection["host"], "echo.ops.test");
    assert_eq!(connection["endpoint"], "198.18.10.1:7000");
    assert_eq!(connection["state"], "forwarding");
    // Live bytes, as the kernel counts them on the client socket: "ECHO\n" and
    // "hello\n" from the client; "server\n" and the echo back to it.
    let expected = ("ECHO\nhello\n".len() as u64, "server\nhello\n".len() as u64);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed: serde_json::Value = serde_json::from_str(&get_ok("/connections")).unwrap();
        let bytes = (
            listed[0]["sent_bytes"].as_u64(),
            listed[0]["received_bytes"].as_u64(),
        );
        if bytes == (Some(expected.0), Some(expected.1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "live bytes {bytes:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    open.finish();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_ok("/connections").trim() != "[]" {
        assert!(
            Instant::now() < deadline,
            "the closed connection is still listed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn readiness_is_503_while_starting_200_when_serving_and_503_when_draining() {
    let sandbox = Sandbox::new("ops-ready");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    // Enough entries that loading and checking them keeps the daemon starting for a
    // while after the admin server is up.
    let mut config = vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1");
    for index in 0..2000 {
        config.push_str("---\n");
        config.push_str(&vip_entry(
            "ops",
            &format!("filler-{index}"),
            &format!("240.240.{}.{}", 100 + index / 250, 1 + index % 250),
            "198.18.10.1",
        ));
    }
    let path = sandbox.write_config(&config);
    let mut daemon = daemon::spawn(
        &path,
        &sandbox.cgroup,
        &[&ADMIN_ARGS[..], &["--drain-timeout", "20"]].concat(),
        &[],
    )
    .unwrap();

    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((status, _)) = get("/healthz/ready") {
            if statuses.last() != Some(&status) {
                statuses.push(status);
            }
            if status == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "never ready: {}", daemon.logs());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(statuses, [503, 200], "readiness while starting");
    // Ready means intercepting.
    assert!(who("240.240.10.1:7000").unwrap().went_through_proxy());

    let mut open = Echo::open("240.240.10.1:7000");
    daemon.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get("/healthz/ready") {
            Ok((503, body)) => {
                assert_eq!(body.trim(), "draining");
                break;
            }
            Ok((200, _)) => {}
            other => panic!("readiness during the drain: {other:?}"),
        }
        assert!(Instant::now() < deadline, "readiness never went 503");
        std::thread::sleep(Duration::from_millis(10));
    }
    open.round_trip("draining");
    open.finish();
    assert_eq!(daemon.wait(), Some(0));
}

/// NONE over the test hosts: the destination is real, so a connect that is not
/// redirected still works and shows where it went.
const NONE_RANGE: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: range, namespace: ops}
spec:
  hosts: [range.ops.test]
  addresses: [198.18.10.0/24]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: NONE
"#;

/// Connects racing the shutdown each end up somewhere, through the proxy or direct:
/// none is redirected and then left without a record or a listener.
#[test]
fn sigterm_resets_no_connect_in_flight() {
    let sandbox = Sandbox::new("ops-stop-race");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    let mut daemon = sandbox.start_daemon(NONE_RANGE, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Threads made here share this thread's (the sandbox's) network namespace.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut proxied, mut direct, mut failures) = (0, 0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match who("198.18.10.1:7000") {
                        Ok(seen) if seen.went_through_proxy() => proxied += 1,
                        Ok(_) => direct += 1,
                        Err(error) => failures.push(error.to_string()),
                    }
                }
                (proxied, direct, failures)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut proxied, mut direct, mut failures) = (0, 0, Vec::new());
    for client in clients {
        let (p, d, f) = client.join().unwrap();
        proxied += p;
        direct += d;
        failures.extend(f);
    }
    assert!(
        proxied > 0 && direct > 0,
        "{proxied} proxied, {direct} direct"
    );
    assert!(
        failures.is_empty(),
        "{} of {} connects failed: {failures:?}",
        failures.len(),
        proxied + direct + failures.len()
    );
}

#[test]
fn sigterm_lets_open_connections_finish_while_new_ones_go_direct() {
    let sandbox = Sandbox::new("ops-drain");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    let mut daemon = sandbox.start_daemon(
        NONE_RANGE,
        &[&ADMIN_ARGS[..], &["--drain-timeout", "20"]].concat(),
    );
    assert!(who("198.18.10.1:7000").unwrap().went_through_proxy());

    let mut open = Echo::open("198.18.10.1:7000");
    // getpeername shows the original destination, not the proxy.
    assert_eq!(
        open.writer.peer_addr().unwrap().to_string(),
        "198.18.10.1:7000"
    );
    open.round_trip("before SIGTERM");
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    // Detached, by the kernel's own account.
    let deadline = Instant::now() + Duration::from_secs(10);
    while attached_programs(&sandbox.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap() != 0 {
        assert!(Instant::now() < deadline, "still attached after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }

    let seen = who("198.18.10.1:7000").expect("a direct connection");
    assert!(
        !seen.went_through_proxy(),
        "redirected after SIGTERM: {seen:?}"
    );
    assert_eq!(seen.server_peer, seen.client_local);

    // The proxied connection keeps working through the drain.
    for line in ["during the drain", "still draining"] {
        open.round_trip(line);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get_ok("/connections").matches("\"client\"").count(), 1);
    open.finish();
    assert_eq!(daemon.wait(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exit waited for the drain timeout instead of the last connection"
    );
}

/// Starts one more daemon on the sandbox's config, which must refuse to start
/// (`expected` says why it should); its error, with every cause.
fn refused_start(sandbox: &Sandbox, expected: &str) -> String {
    let config_path = sandbox.workdir.join("config.yaml");
    let error = daemon::start(&config_path, &sandbox.cgroup, &ADMIN_ARGS)
        .err()
        .expect(expected);
    format!("{error:#}")
}

/// A restart without a gap: start the new daemon next to the running one, then stop
/// the old one. The new one takes the port after the old one's, stays behind its programs
/// while both are attached, and redirects from the moment the old one detaches; no
/// connection in between fails.
#[test]
fn a_new_daemon_started_next_to_the_old_one_takes_over_without_a_gap() {
    let sandbox = Sandbox::new("ops-handover");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    let config = vip_entry("ops", "handover", "240.240.10.9", "198.18.10.1");
    let old = sandbox.start_daemon(&config, &ADMIN_ARGS);
    let new = sandbox.start_daemon(&config, &ADMIN_ARGS);
    let logs = new.logs();
    assert!(logs.contains("the proxy address is in use"), "{logs}");
    assert!(logs.contains("the admin address is in use"), "{logs}");
    // A third one would need a third port, which a firewall that allows the two
    // would not: it refuses to start, and attaches nothing.
    let message = refused_start(&sandbox, "a third daemon is refused");
    assert!(
        message.contains("cannot listen on 127.0.0.1:15001")
            && message.contains("the port after it are both in use"),
        "{message}"
    );
    assert_eq!(
        attached_programs(&sandbox.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap(),
        2
    );

    let seen = who("240.240.10.9:7000").expect("through the old daemon");
    assert!(seen.went_through_proxy(), "{seen:?}");
    old.wait_for_log("connection closed", 1);
    assert!(
        !new.logs().contains("connection closed"),
        "the older daemon redirects first"
    );

    let (status, old_logs) = stop_while_connecting(
        old,
        Duration::from_millis(150),
        Duration::from_millis(200),
        |connections| match who("240.240.10.9:7000") {
            Ok(seen) => {
                assert_eq!(seen.server, "server");
                assert!(seen.went_through_proxy(), "{seen:?}");
            }
            Err(error) => panic!("connection {connections} failed during the handover: {error}"),
        },
    );
    assert_eq!(status, Some(0), "the old daemon exits cleanly");
    // Both served in turn: the old one until it stopped, the new one after.
    let by_old = old_logs.matches("connection closed").count();
    assert!(
        by_old > 1,
        "the old daemon served until it stopped ({by_old})"
    );
    new.wait_for_log("connection closed", 1);
}

/// What a daemon holds for each proxy address it listens on, from before it binds.
fn proxy_port_claim(addr: &str) -> std::io::Result<UnixDatagram> {
    let name = format!("interceptor/proxy/{addr}");
    UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)
}

/// Two daemons starting at the same instant could both find the proxy port free and
/// both bind it (SO_REUSEPORT lets them), and then each would accept connections
/// whose records are in the other's maps. The port goes to the daemon that claims it
/// first, so one that has claimed it but not bound it yet keeps it.
#[test]
fn a_proxy_port_claimed_by_a_daemon_not_yet_listening_is_left_to_it() {
    let sandbox = Sandbox::new("ops-claim");
    sandbox.add_hosts(&["198.18.10.2"]);
    let _server = TestServer::start("server", "198.18.10.2:7000");
    let config = vip_entry("ops", "claim", "240.240.10.10", "198.18.10.2");
    let starting = proxy_port_claim(PROXY).expect("nothing claims the port yet");

    let mut daemon = sandbox.start_daemon(&config, &ADMIN_ARGS);
    let logs = daemon.logs();
    assert!(
        logs.contains("the proxy address is in use") && logs.contains("127.0.0.1:15002"),
        "{logs}"
    );
    assert_eq!(
        TcpStream::connect(PROXY)
            .map_err(|error| error.kind())
            .err(),
        Some(ErrorKind::ConnectionRefused),
        "nothing listens on the claimed port"
    );
    let seen = who("240.240.10.10:7000").expect("through the daemon on the port after");
    assert!(seen.went_through_proxy(), "{seen:?}");
    assert_eq!(
        proxy_port_claim("127.0.0.1:15002")
            .map_err(|error| error.kind())
            .err(),
        Some(ErrorKind::AddrInUse),
        "the daemon claims the port it listens on"
    );

    // The claimed port is free to bind, so only the claim keeps a second daemon off it.
    let message = refused_start(&sandbox, "with both ports claimed a daemon is refused");
    assert!(
        message.contains("the port after it are both in use"),
        "{message}"
    );

    // A daemon gives up its claims once it stops accepting, not when it exits, so
    // one started while it drains may take its port.
    drop(starting);
    let mut open = Echo::open("240.240.10.10:7000");
    daemon.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy_port_claim("127.0.0.1:15002").is_err() {
        assert!(
            Instant::now() < deadline,
            "still claimed 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !daemon.has_exited(),
        "the claim went before the drain ended"
    );
    open.round_trip("while draining");
    open.finish();
    assert_eq!(daemon.wait(), Some(0));
}

#[test]
fn the_drain_timeout_bounds_shutdown() {
    let sandbox = Sandbox::new("ops-drain-timeout");
    sandbox.add_hosts(&["198.18.10.1"]);
    let _server = TestServer::start("server", "198.18.10.1:7000");
    let mut daemon = sandbox.start_daemon(
        &vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"),
        &[&ADMIN_ARGS[..], &["--drain-timeout", "1"]].concat(),
    );
    let mut open = Echo::open("240.240.10.1:7000");
    open.round_trip("idle from here on");
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(), Some(0));
    let took = signalled.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&took),
        "shutdown took {took:?} with a 1 s drain timeout"
    );
    assert!(daemon.logs().contains("drain timeout reached"));
}

#[test]
fn systemd_is_notified_of_ready_reload_and_stopping() {
    let sandbox = Sandbox::new("ops-sd-notify");
    let name = format!("interceptor-ops-notify-{}", std::process::id());
    let notify =
        UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let path = sandbox.write_config(&vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"));
    let notify_socket = format!("@{name}");
    let mut daemon = daemon::spawn(
        &path,
        &sandbox.cgroup,
        &ADMIN_ARGS,
        &[("NOTIFY_SOCKET", notify_socket.as_str())],
    )
    .unwrap();
    let receive = || {
        let mut buffer = [0u8; 512];
        let length = notify.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..length]).into_owned()
    };

    let ready = receive();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    // READY=1 comes only when serving.
    assert_eq!(get("/healthz/ready").unwrap().0, 200);

    daemon.signal(libc::SIGHUP);
    let reloading = receive();
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    assert!(receive().starts_with("READY=1\n"));

    daemon.signal(libc::SIGTERM);
    let stopping = receive();
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
    assert_eq!(daemon.wait(), Some(0));
}

#[test]
fn the_admin_server_refuses_a_non_loopback_address_unless_allowed() {
    let sandbox = Sandbox::new("ops-admin-addr");
    sandbox.add_hosts(&["198.18.10.5"]);
    let path = sandbox.write_config(&vip_entry("ops", "echo", "240.240.10.1", "198.18.10.1"));
    let exposed = ["--admin-addr", "198.18.10.5:15000"];

    let error = daemon::start(&path, &sandbox.cgroup, &exposed)
        .err()
        .expect("a non-loopback admin address is refused");
    let message = format!("{error:#}");
    assert!(message.contains("--admin-allow-non-loopback"), "{message}");
    assert_eq!(
        attached_programs(&sandbox.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap(),
        0
    );

    let _daemon = daemon::start(
        &path,
        &sandbox.cgroup,
        &[&exposed[..], &["--admin-allow-non-loopback"]].concat(),
    )
    .unwrap();
    let (status, body) = get_from("198.18.10.5:15000", "/healthz/ready").unwrap();
    assert_eq!((status, body.trim()), (200, "ready"));
}

/// Containers and services often start with a soft limit of 1024 descriptors, which
/// would cap the proxy near 500 connections; the daemon raises it to the hard limit.
#[test]
fn a_low_soft_open_files_limit_is_raised_to_the_hard_limit() {
    let sandbox = Sandbox::new("nofile");
    let daemon = daemon_with_open_files_limit(&sandbox, (256, 4096), &[]);

    let limits = fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files, ["4096", "4096"], "{limits}");
    let logs = daemon.logs();
    assert!(logs.contains("raised the open files limit"), "{logs}");
    // 4096 is still few for a node's worth of connections: the operator hears of it.
    assert!(logs.contains("caps the proxy"), "{logs}");
}

/// Starts a daemon for one VIP whose open-files limit is `(soft, hard)`.
fn daemon_with_open_files_limit(
    sandbox: &Sandbox,
    (soft, hard): (u64, u64),
    extra_args: &[&str],
) -> Daemon {
    let config = sandbox.write_config(&vip_entry("egress", "vip", "240.240.0.1", "198.18.0.10"));
    // The connection limit is the proxy's: daemon::command keeps these tests on the
    // proxy path, where the connections reach it.
    let args = daemon::run_args(&config, &sandbox.cgroup, extra_args);
    let mut command = daemon::command(&args, &[]).unwrap();
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut daemon = daemon::spawn_command(command).unwrap();
    daemon.wait_ready().unwrap();
    daemon
}

/// The number the daemon logged as `field=N`.
fn logged_number(logs: &str, field: &str) -> usize {
    logs.split(&format!("{field}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in the logs:\n{logs}"))
}

/// Opens `count` echo sessions through the VIP; returns those answered within `wait`
/// and those still waiting (none may fail).
fn open_echoes(count: usize, wait: Duration) -> (Vec<Echo>, Vec<Echo>) {
    let sessions: Vec<Echo> = (0..count)
        .map(|_| Echo::begin("240.240.0.1:7000"))
        .collect();
    let deadline = Instant::now() + wait;
    let mut answered = Vec::new();
    let mut waiting = Vec::new();
    for (index, mut echo) in sessions.into_iter().enumerate() {
        match echo.answer(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) => {
                assert_eq!(echo.server, "echo", "connection {index}");
                answered.push(echo);
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => waiting.push(echo),
            Err(error) => panic!("connection {index} failed instead of waiting: {error}"),
        }
    }
    (answered, waiting)
}

/// `limit` connections are served, the rest wait in the accept queue (not reset),
/// and they are served as the first ones end.
fn assert_connection_limit(daemon: &Daemon, limit: usize) {
    let (answered, waiting) = open_echoes(limit + 5, Duration::from_secs(2));
    assert_eq!((answered.len(), waiting.len()), (limit, 5));
    daemon.wait_for_log("connection limit reached", 1);
    let metrics = scrape();
    assert_eq!(
        metrics.value("interceptor_connections_limit", &[]),
        Some(limit as f64)
    );
    assert!(metrics.must("interceptor_connection_limit_reached_total", &[]) >= 1.0);
    drop(answered);
    for (index, mut echo) in waiting.into_iter().enumerate() {
        echo.answer(Duration::from_secs(10))
            .unwrap_or_else(|error| panic!("waiting connection {index}: {error}"));
        assert_eq!(echo.server, "echo", "waiting connection {index}");
        echo.round_trip("still echoing");
        echo.finish();
    }
    assert_eq!(
        scrape().value("interceptor_connections_failed_total", &[]),
        Some(0.0)
    );
}

#[test]
fn at_the_connection_limit_clients_wait_and_are_served_when_others_end() {
    let sandbox = Sandbox::new("max-connections");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _server = TestServer::start("echo", "198.18.0.10:7000");
    let daemon = sandbox.start_daemon(
        &vip_entry("egress", "vip", "240.240.0.1", "198.18.0.10"),
        &[ADMIN_ARGS[0], ADMIN_ARGS[1], "--max-connections", "5"],
    );
    assert_connection_limit(&daemon, 5);
}

/// With a low open-files limit and no --max-connections, the limit is what the
/// descriptors allow: no client is accepted only to be reset for want of one.
#[test]
fn the_default_connection_limit_keeps_within_the_open_files_limit() {
    let sandbox = Sandbox::new("nofile-limit");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _server = TestServer::start("echo", "198.18.0.10:7000");
    let daemon = daemon_with_open_files_limit(&sandbox, (192, 192), &ADMIN_ARGS);
    let logs = daemon.wait_for_log("max_connections=", 1);
    let limit = logged_number(&logs, "max_connections");
    assert!(
        !logs.contains("connection limit reached"),
        "an idle daemon reported the limit reached:\n{logs}"
    );
    let open = open_descriptors(&daemon).len();
    assert!(
        open + 2 * limit <= 192,
        "{open} descriptors open and {limit} connections allowed within 192"
    );
    assert!(
        limit >= 10,
        "a limit of {limit} leaves the test nothing to check"
    );
    assert_connection_limit(&daemon, limit);
    assert_no_accept_failed(&daemon);
}

/// What each of the daemon's open descriptors leads to: `socket:[…]`, `pipe:[…]`, a
/// path.
fn open_descriptors(daemon: &Daemon) -> Vec<String> {
    fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .map(|fd| {
            fs::read_link(fd.unwrap().path()).map_or_else(
                |_| "closed".to_owned(),
                |target| target.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// Running out of descriptors shows as a failed accept.
fn assert_no_accept_failed(daemon: &Daemon) {
    let logs = daemon.logs();
    assert!(!logs.contains("accept failed"), "{logs}");
}

/// Bulk transfers switch to splice pipes, two descriptors each. At the default limit
/// every connection may be busy with bulk traffic both ways and the pipes still fit
/// beside the sockets: the daemon keeps descriptors for its admin server and takes
/// no more pipes than it said it would.
#[test]
fn bulk_transfers_at_the_connection_limit_leave_descriptors_to_spare() {
    const BULK: usize = 256 * 1024;
    const OPEN_FILES: usize = 160;
    let sandbox = Sandbox::new("nofile-pipes");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _server = TestServer::start("echo", "198.18.0.10:7000");
    let daemon = daemon_with_open_files_limit(
        &sandbox,
        (OPEN_FILES as u64, OPEN_FILES as u64),
        &ADMIN_ARGS,
    );
    let logs = daemon.wait_for_log("splice_pipes=", 1);
    let (limit, pipes) = (
        logged_number(&logs, "max_connections"),
        logged_number(&logs, "splice_pipes"),
    );
    assert!(
        pipes > 0 && pipes < 2 * limit,
        "{limit} connections and {pipes} pipes leave the test nothing to check"
    );
    let pipe_descriptors = || {
        open_descriptors(&daemon)
            .iter()
            .filter(|target| target.starts_with("pipe:"))
            .count()
    };
    let idle_pipes = pipe_descriptors();

    // Every connection sends and receives a bulk burst, so both of its directions
    // want a pipe, and stays open with them.
    let payload: Vec<u8> = (0..BULK).map(|index| (index % 253) as u8).collect();
    let busy: Vec<TcpStream> = (0..limit)
        .map(|index| {
            let mut stream = connect("240.240.0.1:7000")
                .unwrap_or_else(|error| panic!("connection {index}: {error}"));
            stream.write_all(b"ECHO\n").unwrap();
            stream.write_all(&payload).unwrap();
            let mut echoed = vec![0; "echo\n".len() + BULK];
            stream.read_exact(&mut echoed).unwrap();
            assert!(
                echoed[5..] == payload[..],
                "connection {index} echoed damage"
            );
            stream
        })
        .collect();
    let in_pipes = pipe_descriptors() - idle_pipes;
    assert!(
        in_pipes > 0 && in_pipes <= 2 * pipes,
        "{in_pipes} pipe descriptors open for a budget of {pipes} pipes"
    );
    let open = open_descriptors(&daemon).len();
    assert!(
        open + 16 <= OPEN_FILES,
        "{open} of {OPEN_FILES} descriptors in use with every connection busy"
    );
    // The admin server still has a descriptor for a scrape.
    assert_eq!(
        scrape().value("interceptor_connections_failed_total", &[]),
        Some(0.0)
    );
    drop(busy);
    assert_no_accept_failed(&daemon);
}

/// A listener that accepted a client just as another took the last permit waits for
/// one; SIGTERM must still end that wait, or the drain never starts.
#[test]
fn sigterm_at_the_connection_limit_still_drains_and_exits() {
    let sandbox = Sandbox::new("limit-stop");
    sandbox.add_hosts(&["198.18.0.10"]);
    let _server = TestServer::start("echo", "198.18.0.10:7000");
    let mut daemon = sandbox.start_daemon(
        &vip_entry("egress", "vip", "240.240.0.1", "198.18.0.10"),
        &[
            "--max-connections",
            "1",
            "--workers",
            "2",
            "--drain-timeout",
            "2",
        ],
    );
    let _served = Echo::open("240.240.0.1:7000");
    // SO_REUSEPORT spreads these over both workers' listeners: the one that did not
    // take the permit has accepted a client and waits for a permit.
    let _waiting: Vec<Echo> = (0..6).map(|_| Echo::begin("240.240.0.1:7000")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(), Some(0), "{}", daemon.logs());
    assert!(
        stopping.elapsed() < Duration::from_secs(6),
        "took {:?} to stop with a drain timeout of 2 s",
        stopping.elapsed()
    );
}
