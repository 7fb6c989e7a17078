//! `cargo xtask bench`: what does the proxy cost?
//!
//! Every figure is measured in one run on each path of [`paths::all`], from a client in
//! the bench cgroup to a backend in the bench network namespace: direct (no proxy),
//! the interceptor with and without busy polling, HAProxy tuned for TCP with and
//! without busy polling, and nginx's stream proxy. Only the measured path's proxy runs.
//!
//! The debug `cargo xtask` builds the daemon and xtask in release mode, then re-executes
//! the release xtask (`--prebuilt`), so the backends and the load generator are
//! optimised builds too. `--bin-dir` and `--peers-dir` run binaries built elsewhere,
//! on a machine without cargo or the peers installed (`xtask/device-bench.sh`).

mod bpf_cost;
mod client;
mod paths;
mod proto;
mod proxies;
mod report;
mod sandbox;
mod scenarios;
mod servers;

use std::{
    env,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

pub use client::main as client_main;

use testbed::process;

use crate::{cargo, check, setup};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Tiny sizes, a few seconds in all: fails if any path does not work, never on
    /// the figures.
    #[arg(long)]
    quick: bool,
    /// Every scenario at reduced sizes, a few minutes in all on a 16-CPU machine:
    /// for a borrowed machine with little time.
    #[arg(long, conflicts_with = "quick")]
    short: bool,
    /// Run only this scenario; repeat for several. Default: all.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Write the JSON here instead of target/bench/<UTC timestamp>.json and
    /// target/bench/latest.json.
    #[arg(long)]
    json: Option<PathBuf>,
    /// An extra flag for every interceptor path's daemon, e.g.
    /// `--daemon-arg=--copy-mode=userspace`, to compare its data paths; repeat for
    /// several. Not one a path sets itself (`--busy-poll-us`).
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    pub daemon_args: Vec<String>,
    /// The address family of every path: IPv6 puts the backend on 2001:2:0:1::1, the
    /// VIPs in 2001:2::/64 (through the daemon's IPv6 listener on [::1]:15001) and
    /// HAProxy on [::1].
    #[arg(long, value_enum, default_value_t = proto::Family::Ipv4)]
    family: proto::Family,
    /// Internal: this is the release build, already built; skip setup and build.
    #[arg(long, hide = true)]
    prebuilt: bool,
    /// Run the `interceptor` binary in this directory instead of building one; this
    /// xtask, which must be a release build, is the load generator. Nothing is
    /// installed or built.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The peers and tools from another machine: `bin/` (haproxy, nginx, ip) goes
    /// first on PATH, `lib/` on LD_LIBRARY_PATH, and nginx loads
    /// `modules/ngx_stream_module.so`. Nothing is installed.
    #[arg(long)]
    peers_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One and eight bulk streams: Gbit/s.
    Bulk,
    /// 1 KiB request/response on a persistent connection: p50, p99, p99.9.
    Latency,
    /// Connect, one request, one response, close: at concurrency 64, and one by one.
    ConnRate,
    /// Proxy RSS per idle connection.
    Memory,
    /// Load time and per-connection cost with 10 and with 10,000 ServiceEntries.
    ConfigScale,
    /// connect4's run time per connect (kernel BPF statistics), with no tracer and
    /// with `interceptor trace` attached.
    BpfCost,
}

impl Scenario {
    const ALL: [Self; 6] = [
        Self::Bulk,
        Self::Latency,
        Self::ConnRate,
        Self::Memory,
        Self::ConfigScale,
        Self::BpfCost,
    ];
}

/// How much each scenario does.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    /// Each path-comparison figure is the median of this many rounds, the routes'
    /// order rotating each round.
    pub rounds: usize,
    pub bulk_bytes_per_stream: u64,
    pub rr_warmup: u64,
    pub rr_round_trips: u64,
    pub rr_size: usize,
    pub conn_concurrency: usize,
    pub conn_millis: u64,
    pub conn_size: usize,
    pub sequential_connections: u64,
    pub sequential_millis: u64,
    pub idle_connections: u64,
    pub scale_small: u32,
    pub scale_large: u32,
    pub scale_repeats: usize,
}

impl Sizes {
    fn new(quick: bool, short: bool) -> Self {
        if short {
            return Self {
                rounds: 3,
                bulk_bytes_per_stream: 256 << 20,
                rr_warmup: 2_000,
                rr_round_trips: 20_000,
                rr_size: 1024,
                conn_concurrency: 64,
                conn_millis: 2_000,
                conn_size: 128,
                sequential_connections: 3_000,
                sequential_millis: 2_000,
                idle_connections: 10_000,
                scale_small: 10,
                scale_large: 10_000,
                scale_repeats: 1,
            };
        }
        if quick {
            Self {
                // Two, so that CI also runs the restart of the proxies between rounds.
                rounds: 2,
                bulk_bytes_per_stream: 16 << 20,
                rr_warmup: 100,
                rr_round_trips: 2_000,
                rr_size: 1024,
                conn_concurrency: 64,
                conn_millis: 500,
                conn_size: 128,
                sequential_connections: 300,
                sequential_millis: 2_000,
                idle_connections: 300,
                scale_small: 10,
                scale_large: 1_000,
                scale_repeats: 1,
            }
        } else {
            Self {
                rounds: 5,
                bulk_bytes_per_stream: 1 << 30,
                rr_warmup: 5_000,
                rr_round_trips: 100_000,
                rr_size: 1024,
                conn_concurrency: 64,
                conn_millis: 10_000,
                conn_size: 128,
                sequential_connections: 10_000,
                sequential_millis: 10_000,
                idle_connections: 10_000,
                scale_small: 10,
                scale_large: 10_000,
                scale_repeats: 3,
            }
        }
    }
}

pub fn run(root: &Path, args: BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "cargo xtask bench needs root: it creates a network namespace and a cgroup and loads BPF programs"
    );
    if let Some(peers) = &args.peers_dir {
        use_peers_dir(&user_path(peers))?;
    }
    if let Some(bin_dir) = &args.bin_dir {
        ensure!(
            !cfg!(debug_assertions),
            "--bin-dir needs a release xtask: it is the load generator"
        );
        ensure!(
            user_path(bin_dir).join("interceptor").exists(),
            "{} has no interceptor binary",
            bin_dir.display()
        );
    } else if !args.prebuilt {
        setup::ensure_toolchain()?;
        if args.peers_dir.is_none() {
            setup::ensure_debian_packages(setup::BENCH_PACKAGES)?;
        }
        check(cargo().args([
            "build",
            "--release",
            "--package",
            "interceptor",
            "--package",
            "xtask",
        ]))?;
        let release = target_dir(root).join("release/xtask");
        let error = Command::new(&release)
            .args(env::args_os().skip(1))
            .arg("--prebuilt")
            .exec();
        return Err(error).with_context(|| format!("executing {}", release.display()));
    }

    if !args.daemon_args.is_empty() {
        // SAFETY: single-threaded here; children inherit the variable.
        unsafe { env::set_var(proxies::DAEMON_ARGS_ENV, args.daemon_args.join("\x1f")) };
        println!(
            "xtask bench: interceptor runs with {}",
            args.daemon_args.join(" ")
        );
    }
    proto::set_family(args.family);
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|scenario| args.scenarios.is_empty() || args.scenarios.contains(scenario))
        .collect();
    let sizes = Sizes::new(args.quick, args.short);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default();
    let interceptor = match &args.bin_dir {
        Some(bin_dir) => user_path(bin_dir).join("interceptor"),
        None => target_dir(root).join("release/interceptor"),
    };
    ensure!(
        interceptor.exists(),
        "{} is missing: run `cargo xtask bench` (without --prebuilt)",
        interceptor.display()
    );
    let nginx_stream_module = match &args.peers_dir {
        Some(peers) => user_path(peers).join("modules/ngx_stream_module.so"),
        None => Path::new("/").join(proxies::NGINX_STREAM_MODULE),
    };

    // Must come first: the namespace is entered by this thread before any other exists.
    let sandbox = sandbox::Sandbox::create()?;
    process::install_signal_handlers()?;
    let _backends = servers::start()?;
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let paths = paths::all();
    let peer_configs = proxies::configs_text(threads, sandbox.open_files, &nginx_stream_module);
    let mut bench = scenarios::Bench {
        sandbox: &sandbox,
        interceptor,
        nginx_stream_module,
        client: env::current_exe()?,
        paths: paths.clone(),
        sizes: sizes.clone(),
        threads,
        report: report::Report {
            paths: paths.iter().map(|path| path.name).collect(),
            ..Default::default()
        },
    };
    let mode = if args.quick {
        "quick"
    } else if args.short {
        "short"
    } else {
        "full"
    };
    println!(
        "xtask bench: {mode} run of {} in a fresh network namespace, clients in {}",
        scenarios
            .iter()
            .map(|scenario| format!("{scenario:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        sandbox.cgroup.display()
    );
    for scenario in &scenarios {
        if process::interrupted() {
            break;
        }
        bench.run(*scenario);
    }
    let report = bench.report;
    drop(sandbox);

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let peers = proxies::peer_versions();
    let family = match args.family {
        proto::Family::Ipv4 => "IPv4",
        proto::Family::Ipv6 => "IPv6",
    };
    let title = format!(
        "interceptor bench ({mode}, {family}, {threads} CPUs, kernel {kernel}, {peers}; every proxy with {threads} threads or workers, one path alive at a time; each figure is the median of {} round(s))",
        sizes.rounds
    );
    let table = report.table(&title);
    println!("\n{table}");
    let document = serde_json::json!({
        "version": 1,
        "timestamp": report::utc_stamp(started),
        "mode": mode,
        "family": args.family,
        "scenarios": scenarios,
        "host": { "cpus": threads, "kernel": kernel, "peers": peers },
        "paths": paths.iter().map(|path| serde_json::json!({
            "name": path.name,
            "kind": format!("{:?}", path.kind),
        })).collect::<Vec<_>>(),
        "peer_configs": peer_configs,
        "sizes": sizes,
        "rows": report.rows,
        "config_scale": {
            "entries": [report.scale_entries.0, report.scale_entries.1],
            "rows": report.scale_rows,
        },
        "bpf_cost": report.bpf_rows,
        "failures": report.failures,
        "details": report.details,
    });
    let text = serde_json::to_string_pretty(&document)? + "\n";
    let written = match args.json.as_deref().map(user_path) {
        Some(path) => {
            write_file(&path, &text)?;
            vec![path]
        }
        None => {
            let directory = target_dir(root).join("bench");
            let stamped = directory.join(format!("{}.json", report::utc_stamp(started)));
            let latest = directory.join("latest.json");
            write_file(&stamped, &text)?;
            write_file(&latest, &text)?;
            vec![stamped, latest]
        }
    };
    for path in written {
        println!("xtask bench: wrote {}", path.display());
    }
    let reference_run = !args.quick
        && scenarios.len() == Scenario::ALL.len()
        && args.family == proto::Family::Ipv4
        && args.daemon_args.is_empty();
    if reference_run && report.failures.is_empty() && !process::interrupted() {
        let command = if args.short {
            "cargo xtask bench --short"
        } else {
            report::REFERENCE_COMMAND
        };
        let path = report::write_benchmarks(root, command, &table, &peer_configs)
            .with_context(|| format!("writing {}", report::BENCHMARKS_FILE))?;
        println!("xtask bench: wrote {}", path.display());
    }
    if process::interrupted() {
        bail!("interrupted");
    }
    if !report.failures.is_empty() {
        bail!(
            "{} benchmark path(s) failed (see above)",
            report.failures.len()
        );
    }
    Ok(())
}

/// Puts a carried directory of peers and tools first: `bin/` on PATH, `lib/` on
/// LD_LIBRARY_PATH. Must run before any thread exists; children inherit both.
fn use_peers_dir(peers: &Path) -> Result<()> {
    ensure!(
        peers.join("bin").is_dir(),
        "{} has no bin/ directory",
        peers.display()
    );
    let prepend = |variable: &str, dir: PathBuf| -> Result<()> {
        let mut dirs = vec![dir];
        if let Some(existing) = env::var_os(variable) {
            dirs.extend(env::split_paths(&existing));
        }
        let joined = env::join_paths(dirs).with_context(|| format!("building {variable}"))?;
        // SAFETY: called before the harness starts any thread.
        unsafe { env::set_var(variable, joined) };
        Ok(())
    };
    prepend("PATH", peers.join("bin"))?;
    prepend("LD_LIBRARY_PATH", peers.join("lib"))
}

/// xtask runs from the workspace root; a relative path the user typed means the
/// directory they ran cargo in, which the shell left in PWD.
fn user_path(path: &Path) -> PathBuf {
    match env::var_os("PWD").map(PathBuf::from) {
        Some(pwd) if path.is_relative() && pwd.is_absolute() => pwd.join(path),
        _ => path.to_path_buf(),
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `CARGO_TARGET_DIR` (relative to the workspace) or the workspace's `target/`.
fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
