//! `cargo xtask soak`: hours of mixed traffic and scheduled faults, with nothing lost
//! and nothing leaked.
//!
//! It runs in a throwaway network namespace and cgroup ([`testbed::Sandbox`], the
//! harness inside both, as the integration tests are), drives every traffic class in
//! [`model::Class`] through the real daemon, and injects the faults of
//! [`model::Fault`] on a schedule. At the end it prints a table and fails on any
//! violation: a lost or corrupted byte, a failure no fault explains, a hang, a
//! panic or unexplained error line, a resource that grows, or anything left attached
//! or behind.

mod backends;
mod config;
mod daemons;
mod model;
mod report;
mod traffic;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use interceptor_common::host::raise_open_files_limit;
use testbed::process;

use self::{
    backends::{Backends, Flaky},
    daemons::{DRAIN_SECONDS, Exited, Instance, Launcher},
    model::{Fault, Window},
    report::{Report, Sample},
    traffic::{Sizes, Traffic},
};

#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// How long the traffic runs, in minutes.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// A 60-second run with smaller sizes, for CI: every fault once.
    #[arg(long)]
    quick: bool,
}

const CGROUP_PREFIX: &str = "interceptor-soak-";

/// The faults that come one after another, with quiet between them. Reloads run on
/// a timer of their own throughout.
const SCHEDULE: [Fault; 8] = [
    Fault::DnsChange,
    Fault::BackendRefuse,
    Fault::BackendReset,
    Fault::BackendStall,
    Fault::DnsDown,
    Fault::LowFdLimit,
    Fault::Handover,
    Fault::Kill,
];

/// Every third reload is invalid.
const RELOAD_EVERY: Duration = Duration::from_secs(3);

struct Plan {
    duration: Duration,
    warm_up: Duration,
    quiet: Duration,
    fault_length: Duration,
    sample_every: Duration,
    sizes: Sizes,
}

impl Plan {
    fn new(args: &SoakArgs, open_files: u64) -> Self {
        // Per idle connection: two sockets in the harness (client and backend) and
        // two in the daemon, which shares this limit; a handover doubles the daemon's.
        let idle_ceiling = (open_files.saturating_sub(2_000) / 4) as usize;
        if args.quick {
            Self {
                duration: Duration::from_secs(60),
                warm_up: Duration::from_secs(5),
                quiet: Duration::from_secs(2),
                fault_length: Duration::from_secs(3),
                sample_every: Duration::from_secs(1),
                sizes: Sizes {
                    bulk_bytes: 4 << 20,
                    bulk_streams: 1,
                    idle_connections: 500.min(idle_ceiling),
                    idle_threads: 1,
                    idle_lifetime: Duration::from_secs(8),
                    churn_threads: 1,
                },
            }
        } else {
            Self {
                duration: Duration::from_secs(args.minutes.max(1) * 60),
                warm_up: Duration::from_secs(20),
                // Long enough that a daemon serves for minutes between restarts, so
                // its resource samples show a trend.
                quiet: Duration::from_secs(20),
                fault_length: Duration::from_secs(4),
                sample_every: Duration::from_secs(2),
                sizes: Sizes {
                    bulk_bytes: 32 << 20,
                    bulk_streams: 2,
                    idle_connections: 10_000.min(idle_ceiling),
                    idle_threads: 4,
                    idle_lifetime: Duration::from_secs(12),
                    churn_threads: 2,
                },
            }
        }
    }
}

pub fn run(args: SoakArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "cargo xtask soak needs root: it creates a network namespace and a cgroup and loads BPF programs"
    );
    crate::setup::ensure_toolchain()?;
    crate::build_daemon(false)?;
    let binary = crate::workspace_root().join("target/debug/interceptor");
    let open_files = raise_open_files_limit(262_144).context("raising RLIMIT_NOFILE")?;
    let plan = Plan::new(&args, open_files);
    let pinned_before = pinned_objects();
    testbed::remove_stale_cgroups(CGROUP_PREFIX)?;
    // Before the sandbox, so that the watcher thread stays outside its namespace and
    // the namespace can go when the soak ends.
    process::install_signal_handlers()?;

    // The namespace is entered by this thread; every thread the soak starts after
    // this lives in it.
    let sandbox = testbed::Sandbox::create(
        &format!("{CGROUP_PREFIX}{}", std::process::id()),
        testbed::Placement::Harness,
    )?;
    for host in [backends::HOST_A, backends::HOST_B, backends::DNS_HOST] {
        sandbox.add_address(host.into())?;
    }
    // TIME_WAIT reuse for the 198.18/15 hosts too, and a wide ephemeral range: churn
    // opens many connections.
    fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").context("setting tcp_tw_reuse")?;
    fs::write("/proc/sys/net/ipv4/ip_local_port_range", "16000 65000")
        .context("setting ip_local_port_range")?;
    let netns = fs::read_link("/proc/thread-self/ns/net").context("reading the namespace")?;

    // Through which each daemon takes over its predecessor's kernel-path storage.
    let bpf_fs = testbed::bpf::BpfFs::mount(sandbox.workdir.join("bpffs"))?;

    let mut report = Report::new(args.quick, &plan.sizes, plan.duration);
    let outcome = soak(&sandbox, &binary, &bpf_fs.path, &plan, &mut report);
    let cgroup = sandbox.cgroup.clone();
    if let Err(error) = &outcome {
        report.violation(format!("the soak could not finish: {error:#}"));
    }
    // Programs must be gone from the cgroup once every daemon has exited, and the
    // storage a daemon stages for its successor unpinned.
    report.attached = attached_programs(&cgroup);
    let staged = bpf_fs.pinned();
    drop(bpf_fs);
    drop(sandbox);
    report.leftovers = leftovers(&cgroup, &netns, &pinned_before);
    if !staged.is_empty() {
        report.leftovers.push(format!(
            "pinned on the daemons' --bpf-fs: {}",
            staged.join(", ")
        ));
    }
    let table = report.table();
    println!("\n{table}");
    let directory = crate::workspace_root().join("target/soak");
    if fs::create_dir_all(&directory).is_ok() {
        let _ = fs::write(directory.join("latest.md"), &table);
        let _ = fs::write(directory.join("latest-samples.csv"), report.samples_csv());
        println!(
            "xtask soak: wrote {0}/latest.md and {0}/latest-samples.csv",
            directory.display()
        );
    }
    let violations = report.violations();
    if process::interrupted() {
        bail!("interrupted");
    }
    if !violations.is_empty() {
        bail!(
            "the soak found {} violation(s):\n  {}",
            violations.len(),
            violations.join("\n  ")
        );
    }
    println!("xtask soak: clean");
    Ok(())
}

/// Everything that runs inside the sandbox; the backends and the clients are gone when
/// it returns, whatever happened.
fn soak(
    sandbox: &testbed::Sandbox,
    binary: &Path,
    bpf_fs: &Path,
    plan: &Plan,
    report: &mut Report,
) -> Result<()> {
    let config_dir = sandbox.workdir.join("config");
    fs::create_dir_all(&config_dir)?;
    // First: the config names the CA file the TLS origin writes.
    let backends = Backends::start(&sandbox.workdir)?;
    config::write(&config_dir, 0, false)?;
    let launcher = Launcher {
        binary: binary.to_path_buf(),
        config: config_dir.clone(),
        cgroup: sandbox.cgroup.clone(),
        workdir: sandbox.workdir.clone(),
        bpf_fs: bpf_fs.to_path_buf(),
    };
    let origin = Instant::now();
    report.origin_unix = unix_seconds();
    let first = launcher.start(0)?;
    println!(
        "xtask soak: {} s of traffic and faults in {}, {} idle connections",
        plan.duration.as_secs(),
        sandbox.cgroup.display(),
        plan.sizes.idle_connections
    );
    let traffic = Traffic::start(origin, &plan.sizes);
    let mut run = Run {
        origin,
        plan,
        backends: &backends,
        launcher: &launcher,
        config_dir,
        serving: Some(first),
        draining: None,
        reloads: 0,
        next_reload: origin + RELOAD_EVERY,
        next_sample: origin,
        report,
        traffic_idle: std::sync::Arc::clone(&traffic.idle_open),
    };
    let result = run.schedule();
    let tallies = traffic.finish();
    let stopped = run.stop_all();
    run.report.tallies = tallies;
    result.and(stopped)
}

struct Run<'a> {
    origin: Instant,
    plan: &'a Plan,
    backends: &'a Backends,
    launcher: &'a Launcher,
    config_dir: PathBuf,
    serving: Option<Instance>,
    draining: Option<Instance>,
    reloads: u64,
    next_reload: Instant,
    next_sample: Instant,
    report: &'a mut Report,
    traffic_idle: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Run<'_> {
    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    fn window(&mut self, fault: Fault, start: f64, end: f64) {
        self.report.windows.push(Window { fault, start, end });
    }

    fn schedule(&mut self) -> Result<()> {
        self.idle(self.plan.warm_up)?;
        let mut cycle = 0;
        loop {
            for fault in SCHEDULE {
                let over = self.origin.elapsed() >= self.plan.duration;
                // The first cycle always completes, so that a short run still sees
                // every fault.
                if (over && cycle > 0) || process::interrupted() {
                    return Ok(());
                }
                self.inject(fault)?;
                self.idle(self.plan.quiet)?;
            }
            cycle += 1;
        }
    }

    fn inject(&mut self, fault: Fault) -> Result<()> {
        let start = self.now();
        let length = self.plan.fault_length;
        match fault {
            Fault::DnsChange => {
                self.backends.move_dns();
                let end = self.now() + 2.0 * f64::from(backends::DNS_TTL);
                self.window(fault, start, end);
            }
            Fault::DnsDown => {
                self.backends.set_dns_down(true);
                let result = self.idle(length);
                self.backends.set_dns_down(false);
                // Cached failures and queries in flight outlast the outage by their
                // TTL and timeouts.
                let end = self.now() + 3.0;
                self.window(fault, start, end);
                result?;
            }
            Fault::BackendRefuse | Fault::BackendReset | Fault::BackendStall => {
                self.backends.set_flaky(match fault {
                    Fault::BackendRefuse => Flaky::Refuse,
                    Fault::BackendReset => Flaky::Reset,
                    _ => Flaky::Stall,
                });
                let result = self.idle(length);
                self.backends.set_flaky(Flaky::Serve);
                let end = self.now();
                self.window(fault, start, end);
                result?;
            }
            Fault::LowFdLimit => {
                let pid = self.serving()?.pid();
                let held = daemons::open_fds(pid).unwrap_or(0.0) as u64;
                let previous = process::set_open_files_soft_limit(pid, held + 16)?;
                let result = self.idle(length);
                process::set_open_files_soft_limit(pid, previous)?;
                let end = self.now() + 1.0;
                self.window(fault, start, end);
                result?;
            }
            Fault::Handover => {
                self.wait_for_drain()?;
                // A daemon refuses to start on an invalid config, as it should; a
                // restart during an invalid spell would only test that.
                self.reload(false)?;
                let start = self.now();
                let generation = self.serving()?.generation + 1;
                let next = self.launcher.start(generation)?;
                let mut old = self.serving.replace(next).expect("a daemon serves");
                old.signal(libc::SIGTERM);
                self.draining = Some(old);
                // The window lasts until the old daemon has exited: see wait_for_drain.
                self.report.handover_started.push(start);
            }
            Fault::Kill => {
                self.wait_for_drain()?;
                // From the kill itself: a window that began while the previous
                // handover drained could pass that handover's failures as the kill's.
                self.reload(false)?;
                let start = self.now();
                let mut killed = self.serving.take().context("no daemon serves")?;
                let generation = killed.generation + 1;
                killed.signal(libc::SIGKILL);
                self.exited(killed.reap(Duration::from_secs(5)));
                let next = self.launcher.start(generation);
                // Also when the restart failed: until then, the kill explains failures.
                let end = self.now();
                self.window(fault, start, end);
                self.serving = Some(next?);
            }
            Fault::Reload | Fault::InvalidReload => unreachable!("reloads run on a timer"),
        }
        self.report.injected(fault);
        Ok(())
    }

    fn serving(&self) -> Result<&Instance> {
        self.serving.as_ref().context("no daemon serves")
    }

    /// Reloads, samples and reaps for `duration`.
    fn idle(&mut self, duration: Duration) -> Result<()> {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            process::bail_if_interrupted()?;
            self.tick()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        let now = Instant::now();
        if now >= self.next_reload {
            self.next_reload += RELOAD_EVERY;
            let invalid = (self.reloads + 1).is_multiple_of(3);
            self.reload(invalid)?;
        }
        if now >= self.next_sample {
            self.next_sample += self.plan.sample_every;
            if let Some(serving) = &self.serving {
                let pid = serving.pid();
                let fds = daemons::open_fds(pid);
                let (map_entries, connections) = serving.metrics();
                self.report.samples.push(Sample {
                    at: self.now(),
                    generation: serving.generation,
                    rss: daemons::rss(pid),
                    fds,
                    connections,
                    map_entries,
                    idle_connections: self.traffic_idle.load(std::sync::atomic::Ordering::Relaxed),
                });
            }
        }
        if let Some(serving) = &mut self.serving
            && serving.has_exited()
        {
            let died = self.serving.take().expect("checked");
            let exited = died.reap(Duration::ZERO);
            let message = format!(
                "daemon {} exited on its own ({:?}){}",
                exited.generation,
                exited.code,
                log_tail(&exited.logs)
            );
            self.exited(exited);
            bail!(message);
        }
        if let Some(draining) = &mut self.draining
            && draining.has_exited()
        {
            self.finish_drain();
        }
        Ok(())
    }

    fn reload(&mut self, invalid: bool) -> Result<()> {
        self.reloads += 1;
        config::write(&self.config_dir, self.reloads, invalid)?;
        let fault = if invalid {
            Fault::InvalidReload
        } else {
            Fault::Reload
        };
        let start = self.now();
        // The daemon applies a change shortly after the last write.
        self.window(fault, start, start + 3.0);
        self.report.injected(fault);
        Ok(())
    }

    fn finish_drain(&mut self) {
        if let Some(old) = self.draining.take() {
            let exited = old.reap(Duration::from_secs(1));
            let start = self.report.handover_started.last().copied().unwrap_or(0.0);
            let end = self.now();
            self.window(Fault::Handover, start, end);
            self.exited(exited);
        }
    }

    /// The previous handover's daemon must be gone before the next restart: a third
    /// daemon next to two would be refused.
    fn wait_for_drain(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(DRAIN_SECONDS + 10);
        while self.draining.is_some() {
            if Instant::now() > deadline {
                let old = self.draining.take().expect("checked");
                let exited = old.reap(Duration::ZERO);
                self.exited(exited);
                break;
            }
            self.idle(Duration::from_millis(100))?;
        }
        Ok(())
    }

    fn exited(&mut self, exited: Exited) {
        self.report.exited(exited);
    }

    fn stop_all(&mut self) -> Result<()> {
        if let Some(mut serving) = self.serving.take() {
            serving.signal(libc::SIGTERM);
            let exited = serving.reap(Duration::from_secs(DRAIN_SECONDS + 10));
            self.exited(exited);
        }
        if let Some(old) = self.draining.take() {
            let exited = old.reap(Duration::from_secs(DRAIN_SECONDS + 10));
            self.exited(exited);
        }
        Ok(())
    }
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

fn log_tail(logs: &str) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    format!("; its log ends with:\n  {tail}")
}

/// `name: count` for each attach type with programs on `cgroup`.
fn attached_programs(cgroup: &Path) -> Vec<String> {
    testbed::bpf::every_attached(cgroup)
        .into_iter()
        .map(|(name, count)| format!("{name}: {count}"))
        .collect()
}

/// Paths under the BPF filesystem; the daemon pins nothing, so none may appear.
fn pinned_objects() -> BTreeSet<PathBuf> {
    fn walk(directory: &Path, found: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = fs::read_dir(directory) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            }
            found.insert(path);
        }
    }
    let mut found = BTreeSet::new();
    walk(Path::new("/sys/fs/bpf"), &mut found);
    found
}

/// What the run left behind, after the sandbox is gone.
fn leftovers(cgroup: &Path, netns: &Path, pinned_before: &BTreeSet<PathBuf>) -> Vec<String> {
    let mut left = Vec::new();
    if cgroup.exists() {
        left.push(format!("the cgroup {}", cgroup.display()));
    }
    let pinned: Vec<String> = pinned_objects()
        .difference(pinned_before)
        .map(|path| path.display().to_string())
        .collect();
    if !pinned.is_empty() {
        left.push(format!("pinned objects: {}", pinned.join(", ")));
    }
    // Threads and processes still in the sandbox's network namespace.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let holders = netns_holders(netns);
        if holders.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            left.push(format!(
                "tasks still in the network namespace {}: {}",
                netns.display(),
                holders.join(", ")
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    left
}

fn netns_holders(netns: &Path) -> Vec<String> {
    let mut holders = Vec::new();
    let Ok(processes) = fs::read_dir("/proc") else {
        return holders;
    };
    for process in processes.flatten() {
        let name = process.file_name();
        let Some(pid) = name.to_str().filter(|name| name.parse::<u32>().is_ok()) else {
            continue;
        };
        let Ok(tasks) = fs::read_dir(process.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if fs::read_link(task.path().join("ns/net")).is_ok_and(|link| link == netns) {
                holders.push(format!("{pid}/{}", task.file_name().to_string_lossy()));
            }
        }
    }
    holders
}
