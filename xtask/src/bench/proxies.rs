//! The proxies under test: the interceptor daemon, HAProxy in TCP mode, and nginx's
//! stream proxy.

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
    proto::{
        BULK_PORT, CONN_PORT, ECHO_PORT, HAPROXY_PORT_BASE, NGINX_PORT_BASE, PROXY, backend_ip,
        loopback, vip,
    },
    sandbox::Sandbox,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The daemon's admin server: its default address, in the bench's namespace.
pub const ADMIN: &str = "127.0.0.1:15000";
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
            .arg("--state-dir")
            .arg(sandbox.workdir.join("daemon-state"))
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

/// `haproxy 2.6.12-1+deb12u4, nginx 1.22.1`, or `unknown` for either.
pub fn peer_versions() -> String {
    let version = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .and_then(|output| {
                // HAProxy prints "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - …" to
                // stdout, nginx "nginx version: nginx/1.22.1" to stderr.
                let text = [output.stdout, output.stderr].concat();
                let text = String::from_utf8_lossy(&text);
                let word = text.split_whitespace().nth(2)?;
                Some(word.trim_start_matches("nginx/").to_owned())
            })
            .unwrap_or_else(|| "unknown".into())
    };
    format!(
        "haproxy {}, nginx {}",
        version("haproxy", "-v"),
        version("nginx", "-v")
    )
}

pub fn haproxy_port(backend_port: u16) -> u16 {
    HAPROXY_PORT_BASE + (backend_port - 5000)
}

pub fn nginx_port(backend_port: u16) -> u16 {
    NGINX_PORT_BASE + (backend_port - 5000)
}

/// Descriptors a proxy may spend on connections out of the open-files limit, after
/// a margin for its own (listeners, poller, logs).
fn descriptor_budget(open_files: u64) -> u64 {
    open_files.saturating_sub(200)
}

/// HAProxy's pipes when every connection is idle.
const IDLE_PIPES: u64 = 10;

/// Connections a proxy can hold at once within the open-files limit: two
/// descriptors each.
pub fn connections_within(open_files: u64) -> u64 {
    descriptor_budget(open_files) / 2
}

/// What every proxy in a run is sized for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sizing {
    /// Traffic: HAProxy splits its descriptors between connections and splice pipes.
    Traffic,
    /// This many idle connections held open at once. They never fill a pipe, so each
    /// proxy is sized for the connections alone, as an operator sizing for many idle
    /// clients would: HAProxy's `maxconn`, the daemon's `--max-connections`.
    Idle(u64),
}

/// HAProxy as its documentation recommends for a TCP relay: `option splice-auto`
/// (kernel splicing where the socket buffers show it pays), with `maxpipes` sized so
/// that connections and pipes (two descriptors each) together fit the descriptor
/// limit it can raise itself to; HAProxy refuses to start otherwise.
/// `busy_polling` adds the global `busy-polling`: its threads spin instead of
/// sleeping in epoll_wait.
pub fn haproxy_config(
    threads: usize,
    open_files: u64,
    busy_polling: bool,
    sizing: Sizing,
) -> String {
    // A connection holds two descriptors (client and server side), and so does a
    // pipe. Under traffic, half of the budget goes to connections and half to pipes:
    // a spliced connection holds one pipe per direction with data in flight.
    let pairs = connections_within(open_files);
    let (maxconn, maxpipes) = match sizing {
        Sizing::Traffic => {
            let half = (pairs / 2).saturating_sub(20);
            (half, half)
        }
        // A few pipes only: with `maxpipes 0` HAProxy takes maxconn/4 and then
        // asks for more descriptors than the limit allows. The caller keeps the
        // connections within the budget.
        Sizing::Idle(connections) => (connections, IDLE_PIPES),
    };
    let spin = if busy_polling { "  busy-polling\n" } else { "" };
    let mut config = format!(
        "global\n  nbthread {threads}\n  maxconn {maxconn}\n  maxpipes {maxpipes}\n{spin}\ndefaults\n  mode tcp\n  option splice-auto\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n"
    );
    for port in BACKEND_PORTS {
        let _ = write!(
            config,
            "\nlisten bench-{port}\n  bind {}\n  server backend {}\n",
            SocketAddr::new(loopback(), haproxy_port(port)),
            SocketAddr::new(backend_ip(), port),
        );
    }
    config
}

/// nginx's stream proxy as its documentation recommends for many connections: a
/// worker per CPU, each with its own `reuseport` listener, descriptors to match,
/// and a 64 KiB `proxy_buffer_size` (the default 16 KiB costs bulk transfers four
/// times the system calls), and `proxy_half_close`, without which nginx ends the
/// whole session at the first FIN where a TCP relay passes it on as HAProxy and the
/// interceptor do. nginx has no busy-polling option and no splice in the stream
/// module.
pub fn nginx_config(threads: usize, open_files: u64, stream_module: &Path) -> String {
    // nginx counts each side of a proxied session as a connection, so a worker's
    // `worker_connections` is a count of descriptors; and with `reuseport` the
    // kernel's hash may hand any one worker more than its share.
    let connections = descriptor_budget(open_files);
    let mut config = format!(
        "load_module {};\nuser root root;\ndaemon off;\nmaster_process on;\nworker_processes {threads};\nworker_rlimit_nofile {open_files};\nerror_log stderr warn;\n\nevents {{\n  worker_connections {connections};\n  multi_accept on;\n}}\n\nstream {{\n  proxy_buffer_size 64k;\n  proxy_half_close on;\n  proxy_connect_timeout 5s;\n  proxy_timeout 300s;\n  tcp_nodelay on;\n",
        stream_module.display()
    );
    for port in BACKEND_PORTS {
        let _ = write!(
            config,
            "\n  server {{\n    listen {} reuseport backlog=4096;\n    proxy_pass {};\n  }}\n",
            SocketAddr::new(loopback(), nginx_port(port)),
            SocketAddr::new(backend_ip(), port),
        );
    }
    config.push_str("}\n");
    config
}

/// The peers' configurations as this run writes them, for the JSON and BENCHMARKS.md.
pub fn configs_text(threads: usize, open_files: u64, stream_module: &Path) -> String {
    format!(
        "# haproxy-poll: haproxy (below) plus `busy-polling` in `global`\n# the idle-connection memory run: `maxconn` is the connections held and `maxpipes 10`\n# (the daemon gets `--max-connections` with the same number)\n# haproxy.cfg\n{}\n# nginx.conf\n{}",
        haproxy_config(threads, open_files, false, Sizing::Traffic),
        nginx_config(threads, open_files, stream_module)
    )
}

/// Where Debian's libnginx-mod-stream puts the module, relative to a root.
pub const NGINX_STREAM_MODULE: &str = "usr/lib/nginx/modules/ngx_stream_module.so";

/// A peer proxy process (HAProxy, or nginx's master with its workers).
pub struct Peer {
    process: Proc,
}

impl Peer {
    pub fn haproxy(
        sandbox: &Sandbox,
        threads: usize,
        busy_polling: bool,
        sizing: Sizing,
    ) -> Result<Self> {
        let path = sandbox.workdir.join("haproxy.cfg");
        fs::write(
            &path,
            haproxy_config(threads, sandbox.open_files, busy_polling, sizing),
        )?;
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&path);
        Self::spawn("haproxy", command, haproxy_port)
    }

    pub fn nginx(sandbox: &Sandbox, threads: usize, stream_module: &Path) -> Result<Self> {
        let path = sandbox.workdir.join("nginx.conf");
        fs::write(
            &path,
            nginx_config(threads, sandbox.open_files, stream_module),
        )?;
        let prefix = sandbox.workdir.join("nginx");
        fs::create_dir_all(&prefix)?;
        let mut command = Command::new("nginx");
        // -e: the compiled-in error log (/var/log/nginx) is opened before the
        // configuration is read, and may not exist.
        command
            .arg("-p")
            .arg(&prefix)
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&path)
            .arg("-g")
            .arg(format!("pid {};", prefix.join("nginx.pid").display()));
        Self::spawn("nginx", command, nginx_port)
    }

    fn spawn(name: &str, mut command: Command, port_of: fn(u16) -> u16) -> Result<Self> {
        let mut process = Proc::spawn(
            name,
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
            .map(|&port| SocketAddr::new(loopback(), port_of(port)))
            .collect();
        loop {
            bail_if_interrupted()?;
            if let Some(status) = process.try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                bail!("{name} exited with {status}{}", process.stderr_tail());
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
                    "{name} is not listening after 10 s{}",
                    process.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM, and waits until it has exited, so no process of it is left running
    /// while the next path is measured.
    pub fn stop(mut self) -> Result<()> {
        let name = self.process.name.clone();
        self.process
            .stop(STOP_TIMEOUT)
            .with_context(|| format!("stopping {name}"))?;
        Ok(())
    }
}

/// The RSS of `pid` and its children (nginx's master and workers).
pub fn rss_bytes_tree(pid: u32) -> Result<u64> {
    let mut total = rss_bytes(pid)?;
    for child in super::proto::children(pid) {
        // A child may exit between the listing and the read.
        total += rss_bytes(child).unwrap_or(0);
    }
    Ok(total)
}

fn rss_bytes(pid: u32) -> Result<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(config: &str, name: &str) -> u64 {
        config
            .lines()
            .find_map(|line| {
                line.trim()
                    .strip_prefix(name)?
                    .trim()
                    .trim_end_matches(';')
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in\n{config}"))
    }

    /// The memory run holds (limit - 200) / 2 idle connections through each proxy;
    /// HAProxy refuses to start when maxconn and maxpipes together need more
    /// descriptors than the limit, and nginx resets what its workers cannot hold.
    #[test]
    fn peers_sized_for_idle_connections_hold_all_of_them_within_the_limit() {
        let open_files = 20_000;
        let held = connections_within(open_files);
        let haproxy = haproxy_config(2, open_files, false, Sizing::Idle(held));
        let (maxconn, maxpipes) = (setting(&haproxy, "maxconn"), setting(&haproxy, "maxpipes"));
        assert!(maxconn >= held, "maxconn {maxconn} for {held}");
        // What HAProxy adds for its own (listeners, poller) is under 100.
        assert!(2 * (maxconn + maxpipes) + 100 <= open_files, "{haproxy}");

        let nginx = nginx_config(2, open_files, Path::new("/m.so"));
        // Two of nginx's connections per session, all of them in one worker at worst.
        assert!(setting(&nginx, "worker_connections") >= 2 * held, "{nginx}");
    }
}
