//! The real interceptor binary, run as a child process.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Daemon {
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
}

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

impl Daemon {
    pub fn start(config: &Path, cgroup: &Path, extra_args: &[&str]) -> Result<Self> {
        let mut daemon = Self::spawn(config, cgroup, extra_args, &[])?;
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
    ) -> Result<Self> {
        let mut args: Vec<OsString> = vec![
            "run".into(),
            "--config".into(),
            config.into(),
            "--cgroup".into(),
            cgroup.into(),
        ];
        args.extend(extra_args.iter().map(OsString::from));
        Self::spawn_with_args(&args, env)
    }

    /// Starts the daemon with exactly these arguments and returns at once.
    pub fn spawn_with_args(args: &[OsString], env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_command(Self::command(args, env)?)
    }

    /// The command that starts the daemon, for a test to adjust (limits,
    /// capabilities) before [`Daemon::spawn_command`].
    pub fn command(args: &[OsString], env: &[(&str, &str)]) -> Result<Command> {
        let mut command = Command::new(binary()?);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        Ok(command)
    }

    pub fn spawn_command(mut command: Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning interceptor")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let logs = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut logs = sink.lock().unwrap_or_else(|e| e.into_inner());
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        Ok(Self {
            child: Some(child),
            logs,
        })
    }

    /// Waits for the daemon's "ready" log line.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.logs().contains(" ready ") {
                return Ok(());
            }
            if let Some(status) = self.child_mut().try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "interceptor exited with {status} before ready:\n{}",
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "interceptor not ready after {READY_TIMEOUT:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already reaped")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the logs contain `needle`, for log lines written after a connection
    /// closes on the client side but before the daemon has finished with it.
    pub fn wait_for_log(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.matches(needle).count() >= count {
                return logs;
            }
            if Instant::now() > deadline {
                panic!("expected {count}× {needle:?} in the daemon logs:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the daemon has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child_mut().try_wait(), Ok(Some(_)))
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    /// Waits for the daemon to exit and returns its exit code (None if killed by a signal).
    pub fn wait(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("daemon already reaped");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait for daemon") {
                std::thread::sleep(Duration::from_millis(50));
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
