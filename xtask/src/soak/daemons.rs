//! The daemons of a soak: the one serving, and the one draining after a handover.
//! Each one's log is read when it exits, and each exit is checked.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use testbed::{Daemon, DaemonOptions};

use super::backends::DNS_SERVER;

/// Longer than any connection the clients keep, so that a handover cuts none.
pub const DRAIN_SECONDS: u64 = 30;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Instance {
    pub daemon: Daemon,
    pub generation: u32,
    address_file: PathBuf,
    /// The signal the soak stopped it with, once it did.
    pub stopped_with: Option<libc::c_int>,
}

/// What is left of a daemon once it has exited.
pub struct Exited {
    pub generation: u32,
    pub stopped_with: Option<libc::c_int>,
    /// The exit code; None when a signal ended it.
    pub code: Option<i32>,
    /// False when it had to be killed after the timeout.
    pub in_time: bool,
    pub logs: String,
}

pub struct Launcher {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub cgroup: PathBuf,
    pub workdir: PathBuf,
    pub bpf_fs: PathBuf,
}

impl Launcher {
    /// Starts daemon `generation` and waits until it serves. Two may run at once
    /// (during a handover), so each has an address file of its own.
    pub fn start(&self, generation: u32) -> Result<Instance> {
        let address_file = self.workdir.join(format!("daemon-{}.json", generation % 2));
        let mut command = Daemon::run_command(&self.binary, &self.config, &self.cgroup);
        command
            .args(["--proxy-addr", "127.0.0.1:15001", "--proxy-addr-v6", "off"])
            .args(["--drain-timeout", &DRAIN_SECONDS.to_string()])
            .args(["--connect-timeout-ms", "2000"])
            .args(["--dns-server", &DNS_SERVER.to_string()])
            .args(["--dns-min-ttl", "1", "--dns-max-ttl", "1"])
            .args(["--dns-negative-ttl", "1", "--dns-timeout-ms", "300"])
            .arg("--address-file")
            .arg(&address_file)
            // Shared by every generation: the VIPs it allocates must survive restarts,
            // and the host's own state is none of the soak's business.
            .arg("--state-dir")
            .arg(self.workdir.join("state"))
            .arg("--bpf-fs")
            .arg(&self.bpf_fs)
            // `ready` is an info line of interceptor::app; per-connection lines are
            // info lines and would flood the kept log.
            .env("RUST_LOG", "interceptor::app=info,warn")
            .env("RUST_BACKTRACE", "1");
        let mut daemon = Daemon::spawn(
            command,
            DaemonOptions {
                ready_timeout: READY_TIMEOUT,
                stop_signal: libc::SIGTERM,
                die_with_harness: true,
                keep_log_lines: 200_000,
            },
        )?;
        daemon
            .wait_ready()
            .with_context(|| format!("starting daemon {generation}"))?;
        Ok(Instance {
            daemon,
            generation,
            address_file,
            stopped_with: None,
        })
    }
}

impl Instance {
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    pub fn signal(&mut self, signal: libc::c_int) {
        self.stopped_with = Some(signal);
        self.daemon.signal(signal);
    }

    /// Waits up to `timeout` for it to exit (killing it after that).
    pub fn reap(mut self, timeout: Duration) -> Exited {
        let deadline = Instant::now() + timeout;
        while !self.daemon.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let in_time = self.daemon.has_exited();
        if !in_time {
            let _ = self.daemon.stop(Duration::from_secs(1));
        }
        let code = self.daemon.wait();
        Exited {
            generation: self.generation,
            stopped_with: self.stopped_with,
            code,
            in_time,
            logs: self.daemon.logs(),
        }
    }

    pub fn has_exited(&mut self) -> bool {
        self.daemon.has_exited()
    }

    /// From its admin server: the sum of `interceptor_bpf_map_entries`, and
    /// `interceptor_connections_open`.
    pub fn metrics(&self) -> (Option<f64>, Option<f64>) {
        let Some(metrics) =
            admin_addr(&self.address_file).and_then(|addr| http_get(addr, "/metrics"))
        else {
            return (None, None);
        };
        let (map_entries, open) = parse_metrics(&metrics);
        (Some(map_entries), Some(open))
    }
}

/// The sum of every `interceptor_bpf_map_entries` series, and the
/// `interceptor_connections_open` gauge (not `…_opened_total`).
fn parse_metrics(metrics: &str) -> (f64, f64) {
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum("interceptor_bpf_map_entries"),
        sum("interceptor_connections_open"),
    )
}

fn admin_addr(address_file: &Path) -> Option<SocketAddr> {
    let text = fs::read_to_string(address_file).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["admin"].as_str()?.parse().ok()
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Resident set size in bytes.
pub fn rss(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

pub fn open_fds(pid: u32) -> Option<f64> {
    testbed::process::open_descriptors(pid)
        .ok()
        .map(|count| count as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_are_read_by_exact_name() {
        let metrics = "# HELP interceptor_connections_open Connections accepted and not yet ended\n\
            interceptor_connections_opened_total 90000\n\
            interceptor_connections_open 12\n\
            interceptor_bpf_map_entries{map=\"services\"} 7\n\
            interceptor_bpf_map_entries{map=\"records\"} 3\n\
            interceptor_bpf_map_entries_capacity{map=\"records\"} 65536\n";
        assert_eq!(super::parse_metrics(metrics), (10.0, 12.0));
    }
}
