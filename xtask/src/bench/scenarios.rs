//! The scenarios. A failed path is recorded in the report and the run goes on, so one
//! broken path still leaves the other figures; the run then exits non-zero.

use std::{fs, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Result, bail, ensure};
use testbed::{Proc, SpawnOptions, process::bail_if_interrupted};

use super::{
    Scenario, Sizes,
    proto::{
        BULK_PORT, CONN_PORT, CpuTime, ECHO_PORT, Job, Outcome, Spec, Target, backend_ip, loopback,
        machine_busy_seconds, vip,
    },
    proxies::{self, BACKEND_PORTS, Daemon, Haproxy, haproxy_port, service_entries_yaml},
    report::{Check, PathRow, Report, ScaleRow},
    sandbox::Sandbox,
};

/// How long the memory scenario watches the proxies' CPU while their connections
/// sit idle; /proc counts CPU in 10 ms ticks, so this resolves 5 ms/s.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    Interceptor,
    Haproxy,
}

impl Route {
    const ALL: [Self; 3] = [Self::Direct, Self::Interceptor, Self::Haproxy];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Interceptor => "interceptor",
            Self::Haproxy => "haproxy",
        }
    }

    fn target(self, port: u16) -> Target {
        let addr = match self {
            Self::Direct => SocketAddr::new(backend_ip(), port),
            Self::Interceptor => SocketAddr::new(vip(0), port),
            Self::Haproxy => SocketAddr::new(loopback(), haproxy_port(port)),
        };
        Target { addr, vips: 0 }
    }
}

/// The proxies a scenario runs; `None` for one that failed to start.
struct Proxies {
    daemon: Option<Daemon>,
    haproxy: Option<Haproxy>,
}

pub struct Bench<'a> {
    pub sandbox: &'a Sandbox,
    pub interceptor: PathBuf,
    /// This executable, run as `bench-client`.
    pub client: PathBuf,
    pub sizes: Sizes,
    pub threads: usize,
    pub report: Report,
}

/// A figure per route, in `Route::ALL` order.
type Figures = [Option<f64>; 3];
/// Every round's outcome per route, in `Route::ALL` order.
type Outcomes = [Vec<Outcome>; 3];

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

    /// Both proxies; one that does not start is a failed path, and the routes through
    /// the other proxy and the direct route still run.
    fn start_proxies(&mut self) -> Result<Proxies> {
        let config = self.base_config()?;
        let daemon = Daemon::start(&self.interceptor, &config, self.sandbox)
            .map_err(|error| self.report.fail(format!("starting interceptor: {error:#}")))
            .ok();
        bail_if_interrupted()?;
        let haproxy = Haproxy::start(self.sandbox, self.threads)
            .map_err(|error| self.report.fail(format!("starting haproxy: {error:#}")))
            .ok();
        Ok(Proxies { daemon, haproxy })
    }

    fn stop_proxies(&mut self, proxies: Proxies) {
        if let Some(haproxy) = proxies.haproxy {
            haproxy.stop();
        }
        if let Some(daemon) = proxies.daemon
            && let Err(error) = daemon.stop()
        {
            self.report.fail(format!("{error:#}"));
        }
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

    /// Fresh proxy processes. How fast a long-lived proxy runs on this VM depends on
    /// where its threads and memory happened to land, and that holds for the life of
    /// the process: with the same processes through all rounds, a path could be faster
    /// in every round of one run and slower in every round of the next. A new
    /// pair each round makes that a round-to-round difference, which the median of the
    /// rounds evens out.
    fn restart_proxies(&mut self, proxies: &mut Proxies) -> Result<()> {
        let old = std::mem::replace(
            proxies,
            Proxies {
                daemon: None,
                haproxy: None,
            },
        );
        self.stop_proxies(old);
        *proxies = self.start_proxies()?;
        Ok(())
    }

    /// Runs `job` on each route, `sizes.rounds` times with the order rotating each
    /// round, so a change in background load spreads over all routes, and with fresh
    /// proxies each round ([`Self::restart_proxies`]): the outcomes per route (with the
    /// CPU the proxy on that route used). A route that fails is recorded and not
    /// retried.
    fn each_route(
        &mut self,
        name: &str,
        proxies: &mut Proxies,
        timeout: Duration,
        job: impl Fn(Target) -> Job,
        port: u16,
        figure: impl Fn(&Outcome) -> Option<f64>,
    ) -> Outcomes {
        let rounds = self.sizes.rounds;
        let mut outcomes: Outcomes = Default::default();
        let mut failed = [false; 3];
        for round in 0..rounds {
            if round > 0
                && let Err(error) = self.restart_proxies(proxies)
            {
                self.report
                    .fail(format!("{name}, round {}: {error:#}", round + 1));
                break;
            }
            for offset in 0..Route::ALL.len() {
                let index = (round + offset) % Route::ALL.len();
                let route = Route::ALL[index];
                if failed[index] || bail_if_interrupted().is_err() {
                    continue;
                }
                let label = if rounds > 1 {
                    format!("{name}, {}, round {}", route.name(), round + 1)
                } else {
                    format!("{name}, {}", route.name())
                };
                let proxy = match route {
                    Route::Direct => None,
                    Route::Interceptor => match &proxies.daemon {
                        Some(daemon) => Some(daemon.pid()),
                        None => continue,
                    },
                    Route::Haproxy => match &proxies.haproxy {
                        Some(haproxy) => Some(haproxy.pid()),
                        None => continue,
                    },
                };
                let cpu_before = proxy.and_then(CpuTime::of);
                let machine_before = machine_busy_seconds();
                match self.client(job(route.target(port)), timeout) {
                    Ok(mut outcome) => {
                        outcome.machine_cpu = machine_busy_seconds()
                            .zip(machine_before)
                            .map(|(after, before)| after - before);
                        outcome.proxy_cpu = proxy
                            .and_then(CpuTime::of)
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
            }
        }
        outcomes
    }

    /// A row with the proxies' CPU per unit of work (`per(outcome)` units), and the
    /// interceptor's user/system split.
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
        let split = outcomes[1]
            .iter()
            .filter_map(|outcome| outcome.proxy_cpu)
            .reduce(|sum, cpu| CpuTime {
                user: sum.user + cpu.user,
                system: sum.system + cpu.system,
            })
            .filter(|cpu| cpu.total() > 0.0)
            .map(|cpu| {
                format!(
                    "interceptor CPU: {:.0}% system, {:.0}% user",
                    100.0 * cpu.system / cpu.total(),
                    100.0 * cpu.user / cpu.total()
                )
            });
        let mut row = PathRow::new(figure, unit, values);
        if let Some(split) = split {
            row = row.check(Check::note(split));
        }
        self.report.rows.push(row);
    }

    /// What the whole machine (client, proxy, backend, kernel) spent per unit of work
    /// on each path. With every CPU busy, it caps what a path can reach here; the note
    /// says how far the interceptor's cap is from the direct path's measured figure.
    /// `cap` turns CPU seconds per unit into units per second on one CPU.
    fn machine_cpu_row(
        &mut self,
        figure: String,
        unit: &'static str,
        outcomes: &Outcomes,
        (scale, per): (f64, impl Fn(&Outcome) -> f64),
        direct_figure: Option<f64>,
        cap: impl Fn(f64) -> f64,
    ) {
        let cpu_per_unit = |outcome: &Outcome| {
            let work = per(outcome);
            outcome
                .machine_cpu
                .filter(|_| work > 0.0)
                .map(|cpu| cpu / work)
        };
        let seconds = figures(outcomes, cpu_per_unit);
        let cpus = std::thread::available_parallelism().map_or(2, usize::from) as f64;
        let note = seconds[1].zip(direct_figure).map(|(icpt, direct)| {
            let capped = cpus * cap(icpt);
            format!(
                "{cpus} busy CPUs cap the interceptor path at {capped:.1} = {:.2}× direct",
                capped / direct
            )
        });
        let mut row = PathRow::new(figure, unit, seconds.map(|value| value.map(|v| v * scale)));
        if let Some(note) = note {
            row = row.check(Check::note(note));
        }
        self.report.rows.push(row);
    }

    fn bulk(&mut self) -> Result<()> {
        let mut proxies = self.start_proxies()?;
        let bytes = self.sizes.bulk_bytes_per_stream;
        for streams in [1usize, 8] {
            let total = bytes * streams as u64;
            let timeout = Duration::from_secs(60 + total / (20 << 20));
            let name = format!(
                "bulk, {streams} stream{} × {}",
                if streams == 1 { "" } else { "s" },
                size_label(bytes)
            );
            let gbits = |outcome: &Outcome| {
                (outcome.seconds > 0.0).then(|| outcome.bytes as f64 * 8.0 / outcome.seconds / 1e9)
            };
            let outcomes = self.each_route(
                &name,
                &mut proxies,
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
            let [direct, icpt, haproxy_value] = values;
            let pass = both(icpt, direct)
                .zip(haproxy_value)
                .map(|((icpt, direct), haproxy)| icpt >= 0.8 * direct && icpt > haproxy);
            self.report
                .rows
                .push(PathRow::new(name, "Gbit/s", values).check(Check::new(
                    "≥ 0.8× direct and > haproxy",
                    pass,
                    None,
                )));
            self.cpu_row(
                format!(
                    "  proxy CPU, {streams} stream{}",
                    if streams == 1 { "" } else { "s" }
                ),
                "ms/GiB",
                &outcomes,
                1000.0,
                |outcome| outcome.bytes as f64 / f64::from(1u32 << 30),
            );
            self.machine_cpu_row(
                format!(
                    "  machine CPU, {streams} stream{}",
                    if streams == 1 { "" } else { "s" }
                ),
                "ms/GiB",
                &outcomes,
                (1000.0, |outcome: &Outcome| {
                    outcome.bytes as f64 / f64::from(1u32 << 30)
                }),
                direct,
                // CPU s per GiB → Gbit/s on one CPU.
                |seconds_per_gib| 8.0 * 1.073_741_824 / seconds_per_gib,
            );
        }
        self.stop_proxies(proxies);
        Ok(())
    }

    fn latency(&mut self) -> Result<()> {
        let mut proxies = self.start_proxies()?;
        let sizes = self.sizes.clone();
        let timeout = Duration::from_secs(60 + sizes.rr_round_trips / 2_000);
        let name = format!(
            "rr {} B, {} round trips",
            sizes.rr_size, sizes.rr_round_trips
        );
        let outcomes = self.each_route(
            &name,
            &mut proxies,
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
        let added = both(p50[1], p50[0]).map(|(icpt, direct)| icpt - direct);
        self.report.rows.push(
            PathRow::new("rr 1 KiB each way: p50", "µs", p50).check(Check::new(
                "added ≤ 15 µs over direct",
                added.map(|added| added <= 15.0),
                added.map(|added| format!("{added:+.1} µs")),
            )),
        );
        self.report.rows.push(
            PathRow::new("rr 1 KiB each way: p99", "µs", p99).check(Check::new(
                "≤ haproxy",
                both(p99[1], p99[2]).map(|(icpt, haproxy)| icpt <= haproxy),
                None,
            )),
        );
        self.report
            .rows
            .push(PathRow::new("rr 1 KiB each way: p99.9", "µs", p999));
        self.cpu_row(
            "  proxy CPU per round trip".into(),
            "µs",
            &outcomes,
            1e6,
            |outcome| outcome.ok as f64,
        );
        self.stop_proxies(proxies);
        Ok(())
    }

    fn conn_rate(&mut self) -> Result<()> {
        let mut proxies = self.start_proxies()?;
        let sizes = self.sizes.clone();
        let rate = |outcome: &Outcome| {
            (outcome.seconds > 0.0).then(|| outcome.ok as f64 / outcome.seconds)
        };
        let name = format!(
            "new conns, concurrency {}, {} s",
            sizes.conn_concurrency,
            sizes.conn_millis as f64 / 1000.0
        );
        let outcomes = self.each_route(
            &name,
            &mut proxies,
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
        self.report.rows.push(
            PathRow::new(
                format!("new conns/s, concurrency {}", sizes.conn_concurrency),
                "conn/s",
                values,
            )
            .check(Check::new(
                "≥ haproxy",
                both(values[1], values[2]).map(|(icpt, haproxy)| icpt >= haproxy),
                None,
            )),
        );
        self.cpu_row(
            "  proxy CPU per connection".into(),
            "µs",
            &outcomes,
            1e6,
            |outcome| outcome.ok as f64,
        );
        self.machine_cpu_row(
            "  machine CPU per connection".into(),
            "µs",
            &outcomes,
            (1e6, |outcome: &Outcome| outcome.ok as f64),
            values[0],
            |seconds_per_connection| 1.0 / seconds_per_connection,
        );

        // The same exchange one connection at a time: the per-connection latency.
        let outcomes = self.each_route(
            "connect + 1 RTT + close, sequential",
            &mut proxies,
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
        let added = both(p50[1], p50[0]).map(|(icpt, direct)| icpt - direct);
        self.report.rows.push(
            PathRow::new("connect+RTT+close, one by one: p50", "µs", p50).check(Check::note(
                added.map_or_else(String::new, |added| {
                    format!("interceptor {added:+.1} µs over direct")
                }),
            )),
        );
        self.report.rows.push(PathRow::new(
            "connect+RTT+close, one by one: p99",
            "µs",
            p99,
        ));
        self.stop_proxies(proxies);
        Ok(())
    }

    fn memory(&mut self) -> Result<()> {
        // A proxy holds two descriptors per connection.
        let affordable = self.sandbox.open_files.saturating_sub(200) / 2;
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
        let mut per_connection: Figures = [None; 3];
        let mut idle_cpu: Figures = [None; 3];

        // Sized for the connections held, as HAProxy's maxconn is: by default the
        // daemon keeps a quarter of its descriptors for splice pipes, which idle
        // connections never use.
        let limit = ["--max-connections".to_owned(), connections.to_string()];
        match Daemon::start_with(
            &self.interceptor,
            &self.base_config()?,
            self.sandbox,
            &limit,
        ) {
            Ok(daemon) => {
                match self.idle_rss(Route::Interceptor, connections, daemon.pid()) {
                    Ok((kib, cpu)) => (per_connection[1], idle_cpu[1]) = (Some(kib), cpu),
                    Err(error) => self.report.fail(format!("memory, interceptor: {error:#}")),
                }
                if let Err(error) = daemon.stop() {
                    self.report.fail(format!("{error:#}"));
                }
            }
            Err(error) => self.report.fail(format!("starting interceptor: {error:#}")),
        }
        bail_if_interrupted()?;
        match Haproxy::start(self.sandbox, self.threads) {
            Ok(haproxy) => {
                match self.idle_rss(Route::Haproxy, connections, haproxy.pid()) {
                    Ok((kib, cpu)) => (per_connection[2], idle_cpu[2]) = (Some(kib), cpu),
                    Err(error) => self.report.fail(format!("memory, haproxy: {error:#}")),
                }
                haproxy.stop();
            }
            Err(error) => self.report.fail(format!("starting haproxy: {error:#}")),
        }

        self.report.rows.push(
            PathRow::new(
                format!("RSS per idle conn ({connections} open)"),
                "KiB/conn",
                per_connection,
            )
            .check(Check::new(
                "≤ 8 KiB per connection",
                per_connection[1].map(|kib| kib <= 8.0),
                None,
            )),
        );
        // What the connections cost while nothing moves on them: busy polling must
        // not spin here, and neither proxy has timers per connection.
        self.report.rows.push(PathRow::new(
            format!(
                "  proxy CPU holding them, idle {:.0} s",
                IDLE_CPU_WINDOW.as_secs_f64()
            ),
            "ms/s",
            idle_cpu,
        ));
        Ok(())
    }

    /// Opens `connections` through `route` (one small round trip each, so the proxy
    /// has connected upstream), and returns the proxy's RSS growth per connection in
    /// KiB and the CPU it used while they stayed idle, in ms per second.
    fn idle_rss(&mut self, route: Route, connections: u64, pid: u32) -> Result<(f64, Option<f64>)> {
        let rss = || proxies::rss_bytes(pid);
        let before = rss()?;
        let mut client = self.spawn_client(Job::Hold {
            target: route.target(CONN_PORT),
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
        let cpu_before = CpuTime::of(pid);
        std::thread::sleep(IDLE_CPU_WINDOW);
        let idle_cpu = CpuTime::of(pid).zip(cpu_before).map(|(now, before)| {
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
            route.name(),
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        self.report.detail(
            format!("memory, {}", route.name()),
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
        let mut ready_ms = [Vec::new(), Vec::new()];
        let mut latencies = [Vec::new(), Vec::new()];
        // The two configurations alternate, so background load hits both alike.
        for repeat in 0..sizes.scale_repeats {
            for (slot, (entries, config)) in configs.iter().enumerate() {
                bail_if_interrupted()?;
                let daemon = Daemon::start(&self.interceptor, config, self.sandbox)?;
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

/// Per route, the median over its rounds.
fn figures(outcomes: &Outcomes, figure: impl Fn(&Outcome) -> Option<f64>) -> Figures {
    [0, 1, 2].map(|index| median(outcomes[index].iter().filter_map(&figure).collect()))
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
