//! The scenarios. A failed path is recorded in the report and the run goes on, so one
//! broken path still leaves the other figures; the run then exits non-zero.
//!
//! Only the path being measured has a proxy running: each path's proxy is started
//! for its measurement and stopped (and waited for) before the next path starts, so
//! no proxy, spinning or idle, warms or starves the CPUs of another path's figure.

use std::{fs, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Result, bail, ensure};
use testbed::{Proc, SpawnOptions, process::bail_if_interrupted};

use super::{
    Scenario, Sizes,
    bpf_cost::{BpfStats, Tracing, connect_program, connect_stats},
    paths::{self, Kind, PathSpec},
    proto::{
        BULK_PORT, CONN_PORT, CpuTime, ECHO_PORT, Job, Outcome, Spec, Target, backend_ip, loopback,
        machine_busy_seconds, vip,
    },
    proxies::{
        self, BACKEND_PORTS, Daemon, Peer, Sizing, haproxy_port, nginx_port, service_entries_yaml,
    },
    report::{Better, Check, PathRow, Report, ScaleRow},
    sandbox::Sandbox,
};

/// How long the memory scenario watches the proxies' CPU while their connections
/// sit idle; /proc counts CPU in 10 ms ticks, so this resolves 5 ms/s.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(2);

fn target(path: &PathSpec, port: u16) -> Target {
    let addr = match path.kind {
        Kind::Direct => SocketAddr::new(backend_ip(), port),
        Kind::Interceptor { .. } => SocketAddr::new(vip(0), port),
        Kind::Haproxy { .. } => SocketAddr::new(loopback(), haproxy_port(port)),
        Kind::Nginx => SocketAddr::new(loopback(), nginx_port(port)),
    };
    Target { addr, vips: 0 }
}

/// The proxy of the path being measured.
enum Running {
    Daemon(Daemon),
    Peer(Peer),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Self::Daemon(daemon) => daemon.pid(),
            Self::Peer(peer) => peer.pid(),
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Self::Daemon(daemon) => daemon.stop(),
            Self::Peer(peer) => peer.stop(),
        }
    }
}

pub struct Bench<'a> {
    pub sandbox: &'a Sandbox,
    pub interceptor: PathBuf,
    /// nginx's `ngx_stream_module.so`.
    pub nginx_stream_module: PathBuf,
    /// This executable, run as `bench-client`.
    pub client: PathBuf,
    pub paths: Vec<PathSpec>,
    pub sizes: Sizes,
    pub threads: usize,
    pub report: Report,
}

/// A figure per path, in `paths` order.
type Figures = Vec<Option<f64>>;
/// Every round's outcome per path, in `paths` order.
type Outcomes = Vec<Vec<Outcome>>;

impl Bench<'_> {
    pub fn run(&mut self, scenario: Scenario) {
        println!("xtask bench: {scenario:?}");
        let failures_before = self.report.failures.len();
        let result = match scenario {
            Scenario::Bulk => self.bulk(),
            Scenario::Latency => self.latency(),
            Scenario::ConnRate => self.conn_rate(),
            Scenario::Memory => self.memory(),
            Scenario::ConfigScale => self.config_scale(),
            Scenario::BpfCost => self.bpf_cost(),
        };
        if let Err(error) = result {
            self.report.fail(format!("{error:#}"));
        }
        for failure in &mut self.report.failures[failures_before..] {
            *failure = format!("{scenario:?}: {failure}");
        }
    }

    fn base_config(&self) -> Result<PathBuf> {
        let path = self.sandbox.workdir.join("base.yaml");
        fs::write(&path, service_entries_yaml(1, &BACKEND_PORTS))?;
        Ok(path)
    }

    /// The path's proxy, fresh and sized for `sizing`, or `None` for the direct path.
    fn start_path(&self, path: &PathSpec, sizing: Sizing) -> Result<Option<Running>> {
        Ok(Some(match &path.kind {
            Kind::Direct => return Ok(None),
            Kind::Interceptor { args } => {
                // By default the daemon keeps a quarter of its descriptors for splice
                // pipes, which idle connections never use.
                let limit = match sizing {
                    Sizing::Traffic => vec![],
                    Sizing::Idle(connections) => {
                        vec!["--max-connections".to_owned(), connections.to_string()]
                    }
                };
                let args: Vec<String> = args.iter().chain(&limit).cloned().collect();
                Running::Daemon(Daemon::start_with(
                    &self.interceptor,
                    &self.base_config()?,
                    self.sandbox,
                    &args,
                )?)
            }
            Kind::Haproxy { busy_polling } => Running::Peer(Peer::haproxy(
                self.sandbox,
                self.threads,
                *busy_polling,
                sizing,
            )?),
            Kind::Nginx => Running::Peer(Peer::nginx(
                self.sandbox,
                self.threads,
                &self.nginx_stream_module,
            )?),
        }))
    }

    fn spawn_client(&self, job: Job) -> Result<Proc> {
        let mut command = Command::new(&self.client);
        command.arg("bench-client");
        let mut process = Proc::spawn(
            "bench-client",
            &mut command,
            SpawnOptions {
                stop_signal: libc::SIGKILL,
                die_with_harness: true,
                cgroup_procs: Some(self.sandbox.cgroup_procs_fd()),
                pipe_stdin: true,
                pipe_stdout: true,
                on_stderr: None,
                keep_stderr_lines: 200,
            },
        )?;
        let spec = Spec {
            cgroup: self.sandbox.cgroup_relative.clone(),
            job,
        };
        process.write_line(&serde_json::to_string(&spec)?)?;
        Ok(process)
    }

    /// Runs one client job to completion; any error in it fails the path.
    fn client(&self, job: Job, timeout: Duration) -> Result<Outcome> {
        let mut process = self.spawn_client(job)?;
        let outcome = read_outcome(&mut process, timeout)?;
        let status = process.wait(Duration::from_secs(10))?;
        ensure!(status.success(), "bench-client exited with {status}");
        Ok(outcome)
    }

    /// Runs `job` on each path, `sizes.rounds` times with the order rotating each
    /// round, so a change in background load spreads over all paths: the outcomes per
    /// path, with the CPU its proxy and the whole machine used.
    ///
    /// Each measurement gets a fresh proxy, stopped before the next starts. How fast
    /// a long-lived proxy runs on a VM depends on where its threads and memory
    /// happened to land, and that holds for the life of the process: a fresh one per
    /// round makes that round-to-round spread, which the median evens out. A path
    /// that fails is recorded and not retried.
    fn each_path(
        &mut self,
        name: &str,
        timeout: Duration,
        job: impl Fn(Target) -> Job,
        port: u16,
        figure: impl Fn(&Outcome) -> Option<f64>,
    ) -> Outcomes {
        let rounds = self.sizes.rounds;
        let count = self.paths.len();
        let mut outcomes: Outcomes = vec![Vec::new(); count];
        let mut failed = vec![false; count];
        for round in 0..rounds {
            for offset in 0..count {
                let index = (round + offset) % count;
                if failed[index] || bail_if_interrupted().is_err() {
                    continue;
                }
                let path = self.paths[index].clone();
                let label = if rounds > 1 {
                    format!("{name}, {}, round {}", path.name, round + 1)
                } else {
                    format!("{name}, {}", path.name)
                };
                let running = match self.start_path(&path, Sizing::Traffic) {
                    Ok(running) => running,
                    Err(error) => {
                        failed[index] = true;
                        self.report
                            .fail(format!("{label}: starting {}: {error:#}", path.name));
                        continue;
                    }
                };
                let proxy = running.as_ref().map(Running::pid);
                let cpu_before = proxy.and_then(CpuTime::of_tree);
                let machine_before = machine_busy_seconds();
                let result = self.client(job(target(&path, port)), timeout);
                let machine_after = machine_busy_seconds();
                let cpu_after = proxy.and_then(CpuTime::of_tree);
                match result {
                    Ok(mut outcome) => {
                        outcome.machine_cpu = machine_after
                            .zip(machine_before)
                            .map(|(after, before)| after - before);
                        outcome.proxy_cpu = cpu_after
                            .zip(cpu_before)
                            .map(|(after, before)| after.since(before));
                        if let Some(value) = figure(&outcome) {
                            println!("  {label}: {value:.2}");
                        }
                        self.report.detail(&label, &outcome);
                        outcomes[index].push(outcome);
                    }
                    Err(error) => {
                        failed[index] = true;
                        self.report.fail(format!("{label}: {error:#}"));
                    }
                }
                if let Some(running) = running
                    && let Err(error) = running.stop()
                {
                    failed[index] = true;
                    self.report.fail(format!("{label}: {error:#}"));
                }
            }
        }
        outcomes
    }

    fn row(
        &self,
        figure: impl Into<String>,
        unit: &'static str,
        better: Better,
        values: Figures,
    ) -> PathRow {
        PathRow::new(figure, unit, better, &self.paths, values)
    }

    /// A row with the proxies' CPU per unit of work (`per(outcome)` units), spinning
    /// included, and the interceptor paths' user/system split.
    fn cpu_row(
        &mut self,
        figure: String,
        unit: &'static str,
        outcomes: &Outcomes,
        scale: f64,
        per: impl Fn(&Outcome) -> f64,
    ) {
        let cpu = |outcome: &Outcome| {
            let work = per(outcome);
            outcome
                .proxy_cpu
                .filter(|_| work > 0.0)
                .map(|cpu| cpu.total() * scale / work)
        };
        let values = figures(outcomes, cpu);
        let split: Vec<String> = self
            .paths
            .iter()
            .zip(outcomes)
            .filter(|(path, _)| matches!(path.kind, Kind::Interceptor { .. }))
            .filter_map(|(path, outcomes)| {
                let cpu = outcomes
                    .iter()
                    .filter_map(|outcome| outcome.proxy_cpu)
                    .reduce(|sum, cpu| CpuTime {
                        user: sum.user + cpu.user,
                        system: sum.system + cpu.system,
                    })
                    .filter(|cpu| cpu.total() > 0.0)?;
                Some(format!(
                    "{} {:.0}% sys",
                    path.name,
                    100.0 * cpu.system / cpu.total()
                ))
            })
            .collect();
        let mut row = self.row(figure, unit, Better::Lower, values).race_target();
        if let Some(check) = &mut row.check
            && !split.is_empty()
        {
            check.detail = Some(split.join(", "));
        }
        self.report.rows.push(row);
    }

    /// What the whole machine (client, proxy, backend, kernel) spent per unit of work
    /// on each path: with one proxy alive at a time, this is the path's own cost.
    fn machine_cpu_row(
        &mut self,
        figure: String,
        unit: &'static str,
        outcomes: &Outcomes,
        scale: f64,
        per: impl Fn(&Outcome) -> f64,
    ) {
        let cpu_per_unit = |outcome: &Outcome| {
            let work = per(outcome);
            outcome
                .machine_cpu
                .filter(|_| work > 0.0)
                .map(|cpu| cpu * scale / work)
        };
        let values = figures(outcomes, cpu_per_unit);
        let row = self.row(figure, unit, Better::Lower, values);
        self.report.rows.push(row);
    }

    fn bulk(&mut self) -> Result<()> {
        let bytes = self.sizes.bulk_bytes_per_stream;
        for streams in [1usize, 8] {
            let total = bytes * streams as u64;
            let timeout = Duration::from_secs(60 + total / (20 << 20));
            let plural = if streams == 1 { "" } else { "s" };
            let name = format!("bulk, {streams} stream{plural} × {}", size_label(bytes));
            let gbits = |outcome: &Outcome| {
                (outcome.seconds > 0.0).then(|| outcome.bytes as f64 * 8.0 / outcome.seconds / 1e9)
            };
            let outcomes = self.each_path(
                &name,
                timeout,
                |target| Job::Bulk {
                    target,
                    streams,
                    bytes,
                },
                BULK_PORT,
                gbits,
            );
            let values = figures(&outcomes, gbits);
            let row = self
                .row(name, "Gbit/s", Better::Higher, values)
                .race_target();
            self.report.rows.push(row);
            let gib = |outcome: &Outcome| outcome.bytes as f64 / f64::from(1u32 << 30);
            self.cpu_row(
                format!("  proxy CPU, {streams} stream{plural}"),
                "ms/GiB",
                &outcomes,
                1000.0,
                gib,
            );
            self.machine_cpu_row(
                format!("  machine CPU, {streams} stream{plural}"),
                "ms/GiB",
                &outcomes,
                1000.0,
                gib,
            );
        }
        Ok(())
    }

    fn latency(&mut self) -> Result<()> {
        let sizes = self.sizes.clone();
        let timeout = Duration::from_secs(60 + sizes.rr_round_trips / 2_000);
        let name = format!(
            "rr {} B, {} round trips",
            sizes.rr_size, sizes.rr_round_trips
        );
        let outcomes = self.each_path(
            &name,
            timeout,
            |target| Job::Latency {
                target,
                warmup: sizes.rr_warmup,
                round_trips: sizes.rr_round_trips,
                size: sizes.rr_size,
            },
            ECHO_PORT,
            |outcome| outcome.latency.map(|latency| latency.p50),
        );
        let p50 = figures(&outcomes, |outcome| outcome.latency.map(|l| l.p50));
        let p99 = figures(&outcomes, |outcome| outcome.latency.map(|l| l.p99));
        let p999 = figures(&outcomes, |outcome| outcome.latency.map(|l| l.p999));
        let row = self
            .row("rr 1 KiB each way: p50", "µs", Better::Lower, p50)
            .race_target();
        self.report.rows.push(row);
        let row = self
            .row("rr 1 KiB each way: p99", "µs", Better::Lower, p99)
            .race_target();
        self.report.rows.push(row);
        let row = self.row("rr 1 KiB each way: p99.9", "µs", Better::Lower, p999);
        self.report.rows.push(row);
        let round_trips = |outcome: &Outcome| outcome.ok as f64;
        self.cpu_row(
            "  proxy CPU per round trip".into(),
            "µs",
            &outcomes,
            1e6,
            round_trips,
        );
        self.machine_cpu_row(
            "  machine CPU per round trip".into(),
            "µs",
            &outcomes,
            1e6,
            round_trips,
        );
        Ok(())
    }

    fn conn_rate(&mut self) -> Result<()> {
        let sizes = self.sizes.clone();
        let rate = |outcome: &Outcome| {
            (outcome.seconds > 0.0).then(|| outcome.ok as f64 / outcome.seconds)
        };
        let name = format!(
            "new conns, concurrency {}, {} s",
            sizes.conn_concurrency,
            sizes.conn_millis as f64 / 1000.0
        );
        let outcomes = self.each_path(
            &name,
            Duration::from_millis(sizes.conn_millis) + Duration::from_secs(60),
            |target| Job::ConnRate {
                target,
                concurrency: sizes.conn_concurrency,
                millis: sizes.conn_millis,
                size: sizes.conn_size,
            },
            CONN_PORT,
            rate,
        );
        let values = figures(&outcomes, rate);
        let row = self
            .row(
                format!("new conns/s, concurrency {}", sizes.conn_concurrency),
                "conn/s",
                Better::Higher,
                values,
            )
            .race_target();
        self.report.rows.push(row);
        let connections = |outcome: &Outcome| outcome.ok as f64;
        self.cpu_row(
            "  proxy CPU per connection".into(),
            "µs",
            &outcomes,
            1e6,
            connections,
        );
        self.machine_cpu_row(
            "  machine CPU per connection".into(),
            "µs",
            &outcomes,
            1e6,
            connections,
        );

        // The same exchange one connection at a time: the per-connection latency.
        let outcomes = self.each_path(
            "connect + 1 RTT + close, sequential",
            Duration::from_millis(sizes.sequential_millis) + Duration::from_secs(60),
            |target| Job::ConnectLatency {
                target,
                connections: sizes.sequential_connections,
                millis: sizes.sequential_millis,
                size: sizes.conn_size,
            },
            CONN_PORT,
            |outcome| outcome.latency.map(|latency| latency.p50),
        );
        let p50 = figures(&outcomes, |outcome| outcome.latency.map(|l| l.p50));
        let p99 = figures(&outcomes, |outcome| outcome.latency.map(|l| l.p99));
        let row = self
            .row(
                "connect+RTT+close, one by one: p50",
                "µs",
                Better::Lower,
                p50,
            )
            .race_target();
        self.report.rows.push(row);
        let row = self.row(
            "connect+RTT+close, one by one: p99",
            "µs",
            Better::Lower,
            p99,
        );
        self.report.rows.push(row);
        self.cpu_row(
            "  proxy CPU per connection".into(),
            "µs",
            &outcomes,
            1e6,
            connections,
        );
        Ok(())
    }

    fn memory(&mut self) -> Result<()> {
        let affordable = proxies::connections_within(self.sandbox.open_files);
        let connections = self.sizes.idle_connections.min(affordable);
        if connections < self.sizes.idle_connections {
            println!(
                "  memory: RLIMIT_NOFILE is {} and cannot be raised (no CAP_SYS_RESOURCE): {connections} idle connections instead of {}",
                self.sandbox.open_files, self.sizes.idle_connections
            );
        }
        ensure!(
            connections > 0,
            "RLIMIT_NOFILE is too low to hold any connection"
        );
        let count = self.paths.len();
        let mut per_connection: Figures = vec![None; count];
        let mut idle_cpu: Figures = vec![None; count];

        for index in 0..count {
            bail_if_interrupted()?;
            let path = self.paths[index].clone();
            if !path.is_proxy() {
                continue;
            }
            let running = match self.start_path(&path, Sizing::Idle(connections)) {
                Ok(Some(running)) => running,
                Ok(None) => continue,
                Err(error) => {
                    self.report
                        .fail(format!("memory, starting {}: {error:#}", path.name));
                    continue;
                }
            };
            match self.idle_rss(&path, connections, running.pid()) {
                Ok((kib, cpu)) => (per_connection[index], idle_cpu[index]) = (Some(kib), cpu),
                Err(error) => self
                    .report
                    .fail(format!("memory, {}: {error:#}", path.name)),
            }
            if let Err(error) = running.stop() {
                self.report
                    .fail(format!("memory, {}: {error:#}", path.name));
            }
        }

        let row = self
            .row(
                format!("RSS per idle conn ({connections} open)"),
                "KiB/conn",
                Better::Lower,
                per_connection,
            )
            .race_target();
        self.report.rows.push(row);
        // What the connections cost while nothing moves on them: the daemon's busy
        // polling must not spin here; HAProxy's busy-polling does.
        let row = self.row(
            format!(
                "  proxy CPU holding them, idle {:.0} s",
                IDLE_CPU_WINDOW.as_secs_f64()
            ),
            "ms/s",
            Better::Lower,
            idle_cpu,
        );
        self.report.rows.push(row);
        Ok(())
    }

    /// Opens `connections` through `path` (one small round trip each, so the proxy
    /// has connected upstream), and returns the proxy's RSS growth per connection in
    /// KiB (nginx's workers included) and the CPU it used while they stayed idle, in
    /// ms per second.
    fn idle_rss(
        &mut self,
        path: &PathSpec,
        connections: u64,
        pid: u32,
    ) -> Result<(f64, Option<f64>)> {
        let rss = || proxies::rss_bytes_tree(pid);
        let before = rss()?;
        let mut client = self.spawn_client(Job::Hold {
            target: target(path, CONN_PORT),
            connections,
        })?;
        let opened = read_outcome(&mut client, Duration::from_secs(60 + connections / 100))?;
        ensure!(
            opened.ok == connections,
            "opened {} of {connections}",
            opened.ok
        );
        // Let the proxy finish its side of the last connections.
        std::thread::sleep(Duration::from_millis(500));
        let after = rss()?;
        let cpu_before = CpuTime::of_tree(pid);
        std::thread::sleep(IDLE_CPU_WINDOW);
        let idle_cpu = CpuTime::of_tree(pid).zip(cpu_before).map(|(now, before)| {
            now.since(before).total() * 1000.0 / IDLE_CPU_WINDOW.as_secs_f64()
        });
        client.write_line("close")?;
        let closed = read_outcome(&mut client, Duration::from_secs(60))?;
        let status = client.wait(Duration::from_secs(10))?;
        ensure!(status.success(), "bench-client exited with {status}");
        ensure!(
            closed.ok == connections,
            "closed {} of {connections}",
            closed.ok
        );
        let kib = (after as f64 - before as f64) / connections as f64 / 1024.0;
        println!(
            "  memory, {}: RSS {:.1} MiB → {:.1} MiB with {connections} idle connections: {kib:.2} KiB each",
            path.name,
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        self.report.detail(
            format!("memory, {}", path.name),
            serde_json::json!({
                "connections": connections,
                "rss_before_bytes": before,
                "rss_after_bytes": after,
                "kib_per_connection": kib,
                "idle_cpu_ms_per_second": idle_cpu,
                "open_seconds": opened.seconds,
            }),
        );
        Ok((kib, idle_cpu))
    }

    fn config_scale(&mut self) -> Result<()> {
        let sizes = self.sizes.clone();
        let (small, large) = (sizes.scale_small, sizes.scale_large);
        self.report.scale_entries = (small, large);
        let mut configs = Vec::new();
        for entries in [small, large] {
            let config = self.sandbox.workdir.join(format!("scale-{entries}.yaml"));
            fs::write(&config, service_entries_yaml(entries, &[CONN_PORT]))?;
            configs.push((entries, config));
        }
        let scale_args = self.poll_daemon_args();
        let mut ready_ms = [Vec::new(), Vec::new()];
        let mut latencies = [Vec::new(), Vec::new()];
        // The two configurations alternate, so background load hits both alike.
        for repeat in 0..sizes.scale_repeats {
            for (slot, (entries, config)) in configs.iter().enumerate() {
                bail_if_interrupted()?;
                let daemon =
                    Daemon::start_with(&self.interceptor, config, self.sandbox, &scale_args)?;
                let ready = daemon.ready_after.as_secs_f64() * 1000.0;
                ready_ms[slot].push(ready);
                // Every connection goes to another entry's VIP, all of them in turn.
                let target = Target {
                    addr: SocketAddr::new(vip(0), CONN_PORT),
                    vips: *entries,
                };
                let job = Job::ConnectLatency {
                    target,
                    connections: sizes.sequential_connections,
                    millis: sizes.sequential_millis,
                    size: sizes.conn_size,
                };
                let timeout =
                    Duration::from_millis(sizes.sequential_millis) + Duration::from_secs(60);
                let label = format!("config scale, {entries} entries, round {}", repeat + 1);
                match self.client(job, timeout) {
                    Ok(outcome) => {
                        if let Some(latency) = outcome.latency {
                            println!(
                                "  {label}: ready after {ready:.1} ms, connect+RTT+close p50 {:.1} µs",
                                latency.p50
                            );
                            latencies[slot].push(latency);
                        }
                        self.report.detail(&label, &outcome);
                    }
                    Err(error) => self.report.fail(format!("{label}: {error:#}")),
                }
                daemon.stop()?;
            }
        }
        for (slot, (entries, _)) in configs.iter().enumerate() {
            self.report.detail(
                format!("config scale, {entries} entries, ready ms"),
                &ready_ms[slot],
            );
        }
        let ready = ready_ms.map(median);
        let per_entry = both(ready[1], ready[0])
            .map(|(large_ms, small_ms)| (large_ms - small_ms) * 1000.0 / f64::from(large - small));
        self.report.scale_rows.push(
            ScaleRow::new("spawn → ready (median)", "ms", ready[0], ready[1]).check(Check::note(
                per_entry.map_or_else(String::new, |us| format!("{us:.1} µs per extra entry")),
            )),
        );
        let p50 = latencies
            .each_ref()
            .map(|runs| median(runs.iter().map(|latency| latency.p50).collect()));
        let p99 = latencies
            .each_ref()
            .map(|runs| median(runs.iter().map(|latency| latency.p99).collect()));
        let flat = both(p50[1], p50[0]).map(|(large, small)| large <= small * 1.10);
        self.report.scale_rows.push(
            ScaleRow::new("connect+RTT+close via VIPs: p50", "µs", p50[0], p50[1]).check(
                Check::new(&format!("flat: {large}/{small} ≤ 1.10×"), flat, None),
            ),
        );
        self.report.scale_rows.push(ScaleRow::new(
            "connect+RTT+close via VIPs: p99",
            "µs",
            p99[0],
            p99[1],
        ));
        Ok(())
    }
}

impl Bench<'_> {
    /// The daemon's flags as the `icpt-poll` path runs it.
    fn poll_daemon_args(&self) -> Vec<String> {
        self.daemon_args_of(paths::POLL_PAIR.interceptor)
    }

    /// The daemon flags of the interceptor path `name`.
    fn daemon_args_of(&self, name: &str) -> Vec<String> {
        match paths::index(&self.paths, name).map(|index| &self.paths[index].kind) {
            Some(Kind::Interceptor { args }) => args.clone(),
            _ => Vec::new(),
        }
    }

    /// connect4's run time per run, from the kernel's BPF statistics, for connects
    /// no entry intercepts (what most connects on a node are) and for connects to a
    /// VIP, sent to the proxy or (the kernel path) to a backend, with no tracer and
    /// with `/trace` open for every decision.
    fn bpf_cost(&mut self) -> Result<()> {
        let program = connect_program().trim_start_matches("egress_");
        let proxied = [
            (format!("{program}, no rule: left alone"), backend_ip()),
            (format!("{program}, VIP: to the proxy"), vip(0)),
        ];
        let kernel_path = [(format!("{program}, VIP: to a backend"), vip(0))];
        let _stats = BpfStats::enable()?;
        let mut rows = Vec::new();
        for (args, destinations) in [
            (self.poll_daemon_args(), &proxied[..]),
            (self.daemon_args_of(paths::KERNEL_PATH), &kernel_path[..]),
        ] {
            let daemon =
                Daemon::start_with(&self.interceptor, &self.base_config()?, self.sandbox, &args)?;
            for (label, per_run) in destinations
                .iter()
                .zip(self.bpf_runs(&daemon, destinations)?)
            {
                rows.push((label.0.clone(), per_run));
            }
            daemon.stop()?;
        }
        for (label, [untraced, traced]) in rows {
            self.report
                .bpf_rows
                .push(ScaleRow::new(label, "ns/run", untraced, traced));
        }
        Ok(())
    }

    /// connect4's run time per run for connects to each of `destinations` through
    /// `daemon`, with no tracer and with one.
    fn bpf_runs(
        &mut self,
        daemon: &Daemon,
        destinations: &[(String, std::net::IpAddr)],
    ) -> Result<Vec<[Option<f64>; 2]>> {
        let sizes = self.sizes.clone();
        let program = connect_program().trim_start_matches("egress_");
        let mut per_run = vec![[None; 2]; destinations.len()];
        for (traced, tracer) in [false, true].into_iter().enumerate() {
            let _tracing = if tracer {
                match Tracing::attach(proxies::ADMIN) {
                    Ok(tracing) => Some(tracing),
                    Err(error) => {
                        self.report.fail(format!("attaching a tracer: {error:#}"));
                        break;
                    }
                }
            } else {
                None
            };
            for (slot, (label, addr)) in destinations.iter().enumerate() {
                bail_if_interrupted()?;
                let before = connect_stats(daemon.pid())?;
                let job = Job::ConnectLatency {
                    target: Target {
                        addr: SocketAddr::new(*addr, CONN_PORT),
                        vips: 0,
                    },
                    connections: sizes.sequential_connections,
                    millis: sizes.sequential_millis,
                    size: sizes.conn_size,
                };
                let timeout =
                    Duration::from_millis(sizes.sequential_millis) + Duration::from_secs(60);
                let outcome = self.client(job, timeout)?;
                let after = connect_stats(daemon.pid())?;
                let runs = after.1.saturating_sub(before.1);
                ensure!(runs > 0, "{label}: {program} did not run");
                let nanos = after.0.saturating_sub(before.0).as_nanos() as f64 / runs as f64;
                let name = format!("{label}, {}", if tracer { "tracing" } else { "no tracer" });
                println!(
                    "  {name}: {nanos:.0} ns per run over {runs} runs ({} connects)",
                    outcome.ok
                );
                self.report.detail(
                    name,
                    serde_json::json!({ "runs": runs, "ns_per_run": nanos }),
                );
                per_run[slot][traced] = Some(nanos);
            }
        }
        Ok(per_run)
    }
}

fn read_outcome(process: &mut Proc, timeout: Duration) -> Result<Outcome> {
    let line = process.read_line(timeout)?;
    let outcome: Outcome = serde_json::from_str(&line)
        .map_err(|error| anyhow::anyhow!("bad client output {line:?}: {error}"))?;
    if let Some(error) = outcome.error {
        bail!("{error}");
    }
    if outcome.errors > 0 {
        bail!(
            "{} operation(s) failed ({} succeeded); the first: {}",
            outcome.errors,
            outcome.ok,
            outcome.first_error.as_deref().unwrap_or("?")
        );
    }
    ensure!(outcome.ok > 0, "no operation completed");
    Ok(outcome)
}

/// Per path, the median over its rounds.
fn figures(outcomes: &Outcomes, figure: impl Fn(&Outcome) -> Option<f64>) -> Figures {
    outcomes
        .iter()
        .map(|rounds| median(rounds.iter().filter_map(&figure).collect()))
        .collect()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

fn both(a: Option<f64>, b: Option<f64>) -> Option<(f64, f64)> {
    a.zip(b)
}

fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}
