//! The two proxies under test: the interceptor daemon and HAProxy in TCP mode.

use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use testbed::{DaemonOptions, Proc, SpawnOptions, process::bail_if_interrupted};

use super::{
    proto::{BULK_PORT, CONN_PORT, ECHO_PORT, HAPROXY_PORT_BASE, PROXY, backend_ip, loopback, vip},
    sandbox::Sandbox,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub const BACKEND_PORTS: [u16; 3] = [BULK_PORT, ECHO_PORT, CONN_PORT];

/// `count` ServiceEntries, entry `i` with VIP `vip(i)`, STATIC to the backend host on
/// each of `ports`.
pub fn service_entries_yaml(count: u32, ports: &[u16]) -> String {
    let mut yaml = String::with_capacity(count as usize * 400);
    for index in 0..count {
        let _ = write!(
            yaml,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: bench-{index}\n  namespace: bench\nspec:\n  hosts: [bench-{index}.bench.internal]\n  addresses: [{}]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports:\n",
            vip(index)
        );
        for port in ports {
            let _ = write!(
                yaml,
                "  - number: {port}\n    name: tcp-{port}\n    protocol: TCP\n"
            );
        }
        let _ = write!(yaml, "  endpoints:\n  - address: {}\n", backend_ip());
    }
    yaml
}

pub struct Daemon {
    daemon: testbed::Daemon,
    /// From spawn to the `ready` log line.
    pub ready_after: Duration,
}

impl Daemon {
    pub fn start(binary: &Path, config: &Path, sandbox: &Sandbox) -> Result<Self> {
        Self::start_with(binary, config, sandbox, &[])
    }

    /// With `extra_args` after the run's `--daemon-arg`s.
    pub fn start_with(
        binary: &Path,
        config: &Path,
        sandbox: &Sandbox,
        extra_args: &[String],
    ) -> Result<Self> {
        let mut command = testbed::Daemon::run_command(binary, config, &sandbox.cgroup);
        command
            .args(["--proxy-addr", PROXY, "--drain-timeout", "2"])
            .args(daemon_args())
            .args(extra_args)
            // `ready` is an info line of interceptor::app; per-connection lines are
            // info lines of interceptor::proxy and would distort the numbers.
            .env("RUST_LOG", "interceptor::app=info,warn");
        let mut daemon = testbed::Daemon::spawn(
            command,
            DaemonOptions {
                ready_timeout: READY_TIMEOUT,
                stop_signal: libc::SIGTERM,
                die_with_harness: true,
                keep_log_lines: 200,
            },
        )?;
        let ready_after = daemon.wait_ready()?;
        Ok(Self {
            daemon,
            ready_after,
        })
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// SIGTERM; the daemon must exit 0.
    pub fn stop(mut self) -> Result<()> {
        let status = self.daemon.stop(STOP_TIMEOUT)?;
        ensure!(
            status.success(),
            "interceptor exited with {status} on SIGTERM{}",
            self.daemon.log_tail()
        );
        Ok(())
    }
}

pub fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|output| {
            // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
            String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .nth(2)
                .map(|version| format!("haproxy {version}"))
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn haproxy_port(backend_port: u16) -> u16 {
    HAPROXY_PORT_BASE + (backend_port - 5000)
}

pub struct Haproxy {
    process: Proc,
}

impl Haproxy {
    pub fn start(sandbox: &Sandbox, threads: usize) -> Result<Self> {
        // HAProxy refuses to start when 2 × maxconn + its own descriptors exceed what
        // it may raise RLIMIT_NOFILE to.
        let maxconn = (sandbox.open_files.saturating_sub(100) / 2).saturating_sub(20);
        let mut config = format!(
            "global\n  nbthread {threads}\n  maxconn {maxconn}\n\ndefaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n"
        );
        for port in BACKEND_PORTS {
            let _ = write!(
                config,
                "\nlisten bench-{port}\n  bind {}\n  server backend {}\n",
                SocketAddr::new(loopback(), haproxy_port(port)),
                SocketAddr::new(backend_ip(), port),
            );
        }
        let path = sandbox.workdir.join("haproxy.cfg");
        fs::write(&path, config)?;
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&path);
        let mut process = Proc::spawn(
            "haproxy",
            &mut command,
            SpawnOptions {
                stop_signal: libc::SIGTERM,
                die_with_harness: true,
                cgroup_procs: None,
                pipe_stdin: false,
                pipe_stdout: true,
                on_stderr: None,
                keep_stderr_lines: 200,
            },
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let probes: Vec<SocketAddr> = BACKEND_PORTS
            .iter()
            .map(|&port| SocketAddr::new(loopback(), haproxy_port(port)))
            .collect();
        loop {
            bail_if_interrupted()?;
            if let Some(status) = process.try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                bail!("haproxy exited with {status}{}", process.stderr_tail());
            }
            // The harness is outside the bench cgroup, so its probes are never
            // redirected.
            if probes
                .iter()
                .all(|addr| TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok())
            {
                return Ok(Self { process });
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy is not listening after 10 s{}",
                    process.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn stop(mut self) {
        let _ = self.process.stop(STOP_TIMEOUT);
    }
}

pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")?;
    Ok(kib * 1024)
}

/// The `--daemon-arg` flags of this run, passed down through the environment so the
/// re-executed release build sees them too.
pub const DAEMON_ARGS_ENV: &str = "INTERCEPTOR_BENCH_DAEMON_ARGS";

fn daemon_args() -> Vec<String> {
    std::env::var(DAEMON_ARGS_ENV)
        .map(|joined| {
            joined
                .split('\x1f')
                .filter(|arg| !arg.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}
