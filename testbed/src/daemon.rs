//! The real interceptor binary, run as a child process: started, waited for until
//! ready, signalled, stopped, and its log read.

use std::{
    path::Path,
    process::{Command, ExitStatus},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::process::{Proc, SpawnOptions, bail_if_interrupted};

/// How a daemon lives; the tests and the bench differ only here.
pub struct DaemonOptions {
    /// How long [`Daemon::wait_ready`] waits for the `ready` log line.
    pub ready_timeout: Duration,
    /// Signal sent when the handle drops: SIGKILL stops at once (a test's daemon),
    /// SIGTERM drains first (the bench's).
    pub stop_signal: libc::c_int,
    /// See [`SpawnOptions::die_with_harness`].
    pub die_with_harness: bool,
    /// See [`SpawnOptions::keep_stderr_lines`].
    pub keep_log_lines: usize,
}

pub struct Daemon {
    process: Proc,
    spawned: Instant,
    ready: mpsc::Receiver<Instant>,
    ready_timeout: Duration,
}

impl Daemon {
    /// `binary run --config config --cgroup cgroup`, for the caller to add flags and
    /// environment to.
    pub fn run_command(binary: &Path, config: &Path, cgroup: &Path) -> Command {
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--cgroup")
            .arg(cgroup);
        command
    }

    /// Starts `command` and returns at once, without waiting for it to be ready.
    pub fn spawn(mut command: Command, options: DaemonOptions) -> Result<Self> {
        let (ready_sender, ready) = mpsc::channel();
        let on_stderr = move |line: &str| {
            if line.split_whitespace().any(|word| word == "ready") {
                let _ = ready_sender.send(Instant::now());
            }
        };
        let spawned = Instant::now();
        let process = Proc::spawn(
            "interceptor",
            &mut command,
            SpawnOptions {
                stop_signal: options.stop_signal,
                die_with_harness: options.die_with_harness,
                cgroup_procs: None,
                pipe_stdin: false,
                pipe_stdout: false,
                on_stderr: Some(Box::new(on_stderr)),
                keep_stderr_lines: options.keep_log_lines,
            },
        )?;
        Ok(Self {
            process,
            spawned,
            ready,
            ready_timeout: options.ready_timeout,
        })
    }

    /// Waits for the daemon's `ready` log line and returns how long after spawning it
    /// came. The error carries the daemon's log.
    pub fn wait_ready(&mut self) -> Result<Duration> {
        let deadline = self.spawned + self.ready_timeout;
        loop {
            bail_if_interrupted()?;
            match self.ready.recv_timeout(Duration::from_millis(20)) {
                Ok(at) => return Ok(at.duration_since(self.spawned)),
                Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Some(status) = self.process.try_wait()? {
                // Lets the reader thread collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "interceptor exited with {status} before ready:\n{}",
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "interceptor not ready after {:?}:\n{}",
                    self.ready_timeout,
                    self.logs()
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The kept log lines (stderr), each ending in a newline.
    pub fn logs(&self) -> String {
        self.process.stderr()
    }

    /// Waits until the logs contain `needle` `count` times, for log lines written after a
    /// connection closes on the client side but before the daemon has finished with it.
    /// Panics with the logs after 10 s.
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
        matches!(self.process.try_wait(), Ok(Some(_)))
    }

    pub fn signal(&self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    /// Waits for the daemon to exit on its own and returns its exit code (None if a
    /// signal killed it). Panics with the logs, after killing it, if it has not exited
    /// within 20 s.
    pub fn wait(&mut self) -> Option<i32> {
        match self.process.wait(Duration::from_secs(20)) {
            Ok(status) => {
                // Lets the reader thread collect the last lines.
                std::thread::sleep(Duration::from_millis(50));
                status.code()
            }
            Err(_) => {
                self.process.kill();
                panic!("daemon did not exit:\n{}", self.logs());
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process.signal(libc::SIGTERM);
        self.process
            .wait(timeout)
            .inspect_err(|_| self.process.kill())
    }

    /// The last log lines, for an error message: empty, or `; its stderr ends with: …`.
    pub fn log_tail(&self) -> String {
        self.process.stderr_tail()
    }
}
