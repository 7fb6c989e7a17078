//! The tests' way to run the [`Daemon`]: the workspace's binary, info logs kept whole,
//! killed outright when the test drops it.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
pub use testbed::Daemon;
use testbed::DaemonOptions;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The binary under test: `INTERCEPTOR_BIN`, or the workspace's debug build, which
/// `cargo xtask test` builds before running the tests.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("INTERCEPTOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/interceptor");
    if !path.exists() {
        bail!(
            "{} does not exist: build it with `cargo build -p interceptor` (cargo xtask test does) or set INTERCEPTOR_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `interceptor validate` on `path`: its exit code and what it printed on
/// standard output.
pub fn validate(path: &Path) -> (Option<i32>, String) {
    let output = Command::new(binary().expect("the binary under test"))
        .arg("validate")
        .arg(path)
        .output()
        .expect("run interceptor validate");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Starts the daemon on `config`, attached to `cgroup`, and waits until it is ready.
pub fn start(config: &Path, cgroup: &Path, extra_args: &[&str]) -> Result<Daemon> {
    let mut daemon = spawn(config, cgroup, extra_args, &[])?;
    daemon.wait_ready()?;
    Ok(daemon)
}

/// Starts the daemon with extra environment variables and returns at once,
/// without waiting for it to be ready.
pub fn spawn(
    config: &Path,
    cgroup: &Path,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> Result<Daemon> {
    spawn_command(command(&run_args(config, cgroup, extra_args), env)?)
}

/// `run` on `config`, attached to `cgroup`, with `extra_args`: the arguments for
/// [`command`].
pub fn run_args(config: &Path, cgroup: &Path, extra_args: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "run".into(),
        "--config".into(),
        config.into(),
        "--cgroup".into(),
        cgroup.into(),
    ];
    args.extend(extra_args.iter().map(OsString::from));
    args
}

/// The command that starts the daemon with these arguments, for a test to adjust
/// (limits, capabilities) before [`spawn_command`]. A `run` also gets the suite's
/// defaults where the test sets none: the proxy path, and a state directory in the
/// sandbox.
pub fn command(args: &[OsString], env: &[(&str, &str)]) -> Result<Command> {
    let mut command = Command::new(binary()?);
    command.args(args);
    if args.first().is_some_and(|arg| arg == "run") {
        command.args(run_defaults(args));
    }
    command.env("RUST_LOG", "info").envs(env.iter().copied());
    Ok(command)
}

/// Starts `command` and returns at once.
pub fn spawn_command(command: Command) -> Result<Daemon> {
    Daemon::spawn(
        command,
        DaemonOptions {
            ready_timeout: READY_TIMEOUT,
            stop_signal: libc::SIGKILL,
            // A test may hand its daemon to another thread; the sandbox's cgroup
            // catches what a killed test leaves.
            die_with_harness: false,
            keep_log_lines: usize::MAX,
        },
    )
}

/// A handover as an operator runs it: SIGTERM to `old` from another thread after
/// `delay`, while `connect` runs here in a loop (the sandbox's network namespace
/// belongs to this thread) until `linger` after `old` has exited. `connect` gets the
/// number of connects so far and panics if one fails. Returns `old`'s exit code and
/// logs.
pub fn stop_while_connecting(
    mut old: Daemon,
    delay: Duration,
    linger: Duration,
    mut connect: impl FnMut(usize),
) -> (Option<i32>, String) {
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(delay);
        old.signal(libc::SIGTERM);
        (old.wait(), old.logs())
    });
    let mut stopped_at = None;
    for connections in 0.. {
        connect(connections);
        if stopper.is_finished() && stopped_at.get_or_insert_with(Instant::now).elapsed() > linger {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    stopper.join().unwrap()
}

/// What a `run` with `args` needs besides them. The suite tests the proxy path unless
/// a test picks a datapath: with the default (auto) eligible entries would go straight
/// to their backends. VIP allocations go to the sandbox's own directory (removed with
/// it), never to the host's /var/lib/interceptor, so no test sees another's addresses.
fn run_defaults(args: &[OsString]) -> Vec<OsString> {
    let has = |flag: &str| args.iter().any(|arg| arg == flag);
    let mut defaults = Vec::new();
    if !has("--datapath") {
        defaults.extend(["--datapath".into(), "proxy".into()]);
    }
    let cgroup = args
        .iter()
        .position(|arg| arg == "--cgroup")
        .and_then(|at| args.get(at + 1))
        .map(Path::new);
    if !has("--state-dir")
        && let Some(name) = cgroup.and_then(Path::file_name)
    {
        let state = std::env::temp_dir().join(name).join("daemon-state");
        defaults.extend(["--state-dir".into(), state.into()]);
    }
    defaults
}
