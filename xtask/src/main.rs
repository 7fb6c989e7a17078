//! Project tasks: `cargo xtask setup | build | test | run | bench`.
//!
//! Every task bootstraps what it needs first, so each works on a fresh Debian machine
//! run as root, with no prompts (CI has no stdin).

mod bench;
mod setup;
mod soak;
mod vm;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "interceptor project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the eBPF toolchain and system packages that are missing (idempotent).
    Setup,
    /// Build the daemon (debug) with its kernel programs.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, check formatting and lints, build, and run every test (needs root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Fuzz the parsers that read untrusted bytes (ClientHello, HTTP request head,
    /// configuration files) with cargo fuzz, each for a bounded time. Not part of CI.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Set up, build (release) and run the daemon on the bundled examples/ config,
    /// attached to a dedicated cgroup. Arguments after `--` go to `interceptor run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        daemon_args: Vec<String>,
    },
    /// Measure what the proxy costs against direct connections and HAProxy, in a
    /// network namespace of its own (needs root). Writes target/bench/*.json and,
    /// after a full default run, BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Mixed traffic through the daemon for minutes while faults are injected on a
    /// schedule; fails on a lost byte, an unexplained failure or a leak (needs root).
    Soak(soak::SoakArgs),
    /// Internal: the benchmark's load generator, started by `bench` in its cgroup.
    #[command(name = "bench-client", hide = true)]
    BenchClient,
    /// Boot Debian's kernels (5.10, 6.1, 6.12, 7.x) in qemu and run the root integration
    /// tests inside each (needs root); image and kernels are cached under target/vm/.
    Vm(vm::VmArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup::ensure_toolchain(),
        Task::Build { release } => {
            setup::ensure_toolchain()?;
            build_daemon(release)
        }
        Task::Test { cargo_test_args } => test(&root, &cargo_test_args),
        Task::Run { daemon_args } => run(&root, &daemon_args),
        Task::Fuzz { seconds, targets } => fuzz(&root, seconds, &targets),
        Task::Bench(args) => bench::run(&root, args),
        Task::Soak(args) => soak::run(args),
        Task::BenchClient => bench::client_main(),
        Task::Vm(args) => vm::run(&root, args),
    }
}

fn workspace_root() -> PathBuf {
    // A release xtask carried to another machine (xtask/device-bench.sh) runs from
    // that machine's copy of the workspace, not from where it was built.
    if let Some(root) = env::var_os("XTASK_WORKSPACE_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A cargo command with the toolchain's bin directory on PATH, where `cargo install`
/// put bpf-linker.
pub fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.env("PATH", setup::path_with_cargo_bin());
    command
}

pub fn check(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("spawning {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn build_daemon(release: bool) -> Result<()> {
    let mut build = cargo();
    build.args(["build", "--package", "interceptor"]);
    if release {
        build.arg("--release");
    }
    check(&mut build)
}

fn test(root: &Path, cargo_test_args: &[String]) -> Result<()> {
    setup::ensure_toolchain()?;
    setup::ensure_debian_packages(setup::TEST_PACKAGES)?;
    // Left by a test process that was killed before its cleanup ran.
    testbed::remove_stale_cgroups(testbed::TEST_CGROUP_PREFIX)?;
    check(cargo().args(["fmt", "--all", "--", "--check"]))?;
    check(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build_daemon(false)?;
    // The benchmark's smoke mode: every path must work, whatever the figures say.
    check(cargo().args(["xtask", "bench", "--quick"]))?;
    check(cargo().args(["xtask", "bench", "--quick", "--family", "ipv6"]))?;
    // Every fault once, under traffic: nothing lost, nothing unexplained, nothing left.
    check(cargo().args(["xtask", "soak", "--quick"]))?;
    check(
        cargo()
            .args(["test", "--workspace"])
            .args(cargo_test_args)
            .env("INTERCEPTOR_BIN", root.join("target/debug/interceptor")),
    )
}

fn run(root: &Path, daemon_args: &[String]) -> Result<()> {
    setup::ensure_toolchain()?;
    build_daemon(true)?;
    let mut daemon = Command::new(root.join("target/release/interceptor"));
    daemon.args(["run", "--config"]).arg(root.join("examples"));
    let chose_cgroup = daemon_args.iter().any(|arg| arg.starts_with("--cgroup"));
    let demo_cgroup = if chose_cgroup {
        None
    } else {
        let cgroup = interceptor_common::host::cgroup2_root()?.join("interceptor-demo");
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating {}", cgroup.display()))?;
        println!(
            "xtask: intercepting the cgroup {0}\nxtask: route a shell through it with: echo $$ > {0}/cgroup.procs",
            cgroup.display()
        );
        daemon.arg("--cgroup").arg(&cgroup);
        Some(cgroup)
    };
    daemon.args(daemon_args);
    // Ctrl-C reaches the whole process group: the daemon shuts down on it, and xtask
    // must outlive the daemon to remove the demo cgroup. The daemon installs its own
    // handlers, so it does not inherit the ignored disposition.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let result = check(&mut daemon);
    if let Some(cgroup) = demo_cgroup {
        // Fails harmlessly while a shell still lives in it.
        let _ = std::fs::remove_dir(&cgroup);
    }
    result
}

const FUZZ_TARGETS: &[&str] = &[
    "client_hello",
    "http_request_head",
    "config_load",
    "dns_query",
];

fn fuzz(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    setup::ensure_toolchain()?;
    setup::ensure_cargo_tool("fuzz", "cargo-fuzz")?;
    let targets: Vec<&str> = if targets.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for target in targets {
        println!("xtask: fuzzing {target} for {seconds} s");
        check(
            cargo()
                .current_dir(root.join("fuzz"))
                .args(["fuzz", "run", target, "--"])
                .arg(format!("-max_total_time={seconds}"))
                // cargo fuzz passes -Z flags; this allows them on the stable toolchain.
                .env("RUSTC_BOOTSTRAP", "1"),
        )?;
    }
    Ok(())
}
