//! Child processes (the daemon, HAProxy, the bench's clients) that are always stopped:
//! when their handle drops, when the harness is interrupted, and (through
//! PR_SET_PDEATHSIG, where asked for) when the harness itself dies.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Pids of children not yet reaped, with the signal that stops each.
static LIVE: Mutex<Vec<(u32, libc::c_int)>> = Mutex::new(Vec::new());

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Sets another process's soft RLIMIT_NOFILE (at most its hard limit) and returns
/// the previous soft limit: how the soak and the tests starve a running daemon of
/// descriptors.
pub fn set_open_files_soft_limit(pid: u32, soft: u64) -> Result<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reading the limit into a valid rlimit.
    if unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    } != 0
    {
        bail!("prlimit({pid}): {}", std::io::Error::last_os_error());
    }
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: setting the limit from a valid rlimit.
    if unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    } != 0
    {
        bail!("prlimit({pid}): {}", std::io::Error::last_os_error());
    }
    Ok(old.rlim_cur)
}

/// How many descriptors process `pid` holds open.
pub fn open_descriptors(pid: u32) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The lowest descriptor number process `pid` has free: a soft open-files limit there
/// makes its every new descriptor fail with EMFILE (the kernel compares the number
/// it would hand out, not the count held).
pub fn lowest_free_descriptor(pid: u32) -> std::io::Result<u64> {
    let held: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    Ok((0..).find(|fd| !held.contains(fd)).unwrap_or_default())
}

/// SIGINT and SIGTERM set a flag instead of killing the harness; a watcher thread
/// then stops every child, which unblocks whatever the harness waits on, and the
/// harness unwinds through its cleanup.
pub fn install_signal_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous = unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
        if previous == libc::SIG_ERR {
            bail!("installing a handler for signal {signal}");
        }
    }
    thread::Builder::new()
        .name("bench-signals".into())
        .spawn(|| {
            while !interrupted() {
                thread::sleep(Duration::from_millis(50));
            }
            stop_all();
        })?;
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn bail_if_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn stop_all() {
    let live = LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for &(pid, signal) in live.iter() {
        // SAFETY: kill on a child we spawned and have not reaped, so the pid is ours.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}

/// A running child. Its stdout and stderr lines are collected by reader threads.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    stop_signal: libc::c_int,
    stdin: Option<ChildStdin>,
    stdout: Option<mpsc::Receiver<String>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The exit status, once reaped.
    pub status: Option<ExitStatus>,
}

pub type LineCallback = Box<dyn Fn(&str) + Send>;

pub struct SpawnOptions {
    /// Signal sent on stop, on drop and (with `die_with_harness`) when the harness
    /// dies: SIGTERM for a graceful stop, SIGKILL for an immediate one.
    pub stop_signal: libc::c_int,
    /// Sends `stop_signal` when the thread that spawned the child exits. The bench
    /// spawns from its main thread, so a harness killed outright leaves nothing
    /// behind; the tests spawn from test threads and leave it off.
    pub die_with_harness: bool,
    /// An open `cgroup.procs` descriptor the child moves itself into before exec.
    pub cgroup_procs: Option<libc::c_int>,
    pub pipe_stdin: bool,
    pub pipe_stdout: bool,
    /// Called on each stderr line as it arrives.
    pub on_stderr: Option<LineCallback>,
    /// How many of the last stderr lines are kept: a test reads a daemon's whole
    /// log, a long benchmark must not hold all of it.
    pub keep_stderr_lines: usize,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command, options: SpawnOptions) -> Result<Self> {
        bail_if_interrupted()?;
        let stop_signal = options.stop_signal;
        let die_with_harness = options.die_with_harness;
        let cgroup_procs = options.cgroup_procs;
        // SAFETY: the closure makes only async-signal-safe syscalls (prctl, write).
        unsafe {
            command.pre_exec(move || {
                if die_with_harness
                    && libc::prctl(libc::PR_SET_PDEATHSIG, stop_signal as libc::c_ulong) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = cgroup_procs {
                    // "0" moves the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command
            .stdin(if options.pipe_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if options.pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        let mut child = {
            // Registered under the lock, so the signal watcher cannot miss it.
            let mut live = LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let child = command
                .spawn()
                .with_context(|| format!("spawning {name}: {command:?}"))?;
            live.push((child.id(), stop_signal));
            child
        };
        let stdout = child.stdout.take().map(|stdout| {
            let (sender, receiver) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
            receiver
        });
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&stderr_lines);
            let on_stderr = options.on_stderr;
            let keep = options.keep_stderr_lines;
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(callback) = &on_stderr {
                        callback(&line);
                    }
                    let mut lines = sink.lock().unwrap_or_else(|e| e.into_inner());
                    if keep == 0 {
                        continue;
                    }
                    if lines.len() >= keep {
                        lines.remove(0);
                    }
                    lines.push(line);
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stop_signal,
            stdin,
            stdout,
            stderr: stderr_lines,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin is not piped")?;
        stdin.write_all(line.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// The next stdout line, or an error on timeout, EOF or interruption.
    pub fn read_line(&mut self, timeout: Duration) -> Result<String> {
        let receiver = self.stdout.as_ref().context("stdout is not piped")?;
        let deadline = Instant::now() + timeout;
        loop {
            bail_if_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{} wrote nothing within {timeout:?}{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            match receiver.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => return Ok(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.wait(Duration::from_secs(5)).ok();
                    bail!(
                        "{} exited ({}) without answering{}",
                        self.name,
                        status.map_or("still running".into(), |status| status.to_string()),
                        self.stderr_tail()
                    );
                }
            }
        }
    }

    /// The kept stderr lines, each ending in a newline.
    pub fn stderr(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().fold(String::new(), |mut text, line| {
            text.push_str(line);
            text.push('\n');
            text
        })
    }

    pub fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if lines.is_empty() {
            return String::new();
        }
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        format!("; its stderr ends with:\n  {tail}")
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let child = self.child.as_mut().context("no child")?;
        if let Some(status) = child.try_wait()? {
            self.reaped(status);
            return Ok(Some(status));
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends the stop signal and waits; kills it if it does not exit in `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(self.stop_signal);
        match self.wait(timeout) {
            Ok(status) => Ok(status),
            Err(error) => {
                self.kill();
                Err(error)
            }
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        if self.status.is_none()
            && let Some(child) = &self.child
        {
            // SAFETY: kill on our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.reaped(status);
            }
        }
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.status = Some(status);
        let pid = self.pid();
        LIVE.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|&(live, _)| live != pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        if self.status.is_none() {
            let graceful = self.stop_signal != libc::SIGKILL;
            if !(graceful && self.stop(Duration::from_secs(5)).is_ok()) {
                self.kill();
            }
        }
    }
}
