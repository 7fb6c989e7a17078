//! The bench's own network namespace and cgroup, removed on every exit path.
//!
//! The namespace is entered with `unshare(CLONE_NEWNET)` by the harness's main thread
//! before it starts any other thread or child, so the backends, the daemon, HAProxy
//! and the clients all live in it; it disappears with the harness process. It has
//! loopback only, no default route, and the backend host on `lo`: 198.18.0.1 and
//! 2001:2:0:1::1, from the IPv4 and IPv6 benchmarking ranges.

use std::{
    fs::{self, File, OpenOptions},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::proto::{BACKEND_IPV4, BACKEND_IPV6, EPHEMERAL_PORTS};
use crate::setup;

/// Enough descriptors for 10,000 idle connections through a proxy (two sockets each
/// in the proxy, one in the client, one in the backend) with room to spare.
const OPEN_FILES: u64 = 262_144;

pub struct Sandbox {
    pub cgroup: PathBuf,
    /// The cgroup as /proc/<pid>/cgroup names it.
    pub cgroup_relative: String,
    cgroup_procs: File,
    pub workdir: PathBuf,
    /// RLIMIT_NOFILE of the harness and its children.
    pub open_files: u64,
}

impl Sandbox {
    /// Must run on the main thread before any other thread exists.
    pub fn create() -> Result<Self> {
        let open_files = raise_open_files_limit()?;
        let root = setup::cgroup2_root()?;
        remove_stale_cgroups(&root);
        let name = format!("interceptor-bench-{}", std::process::id());
        let cgroup = root.join(&name);
        fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        let workdir = std::env::temp_dir().join(&name);
        let cgroup_procs = OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"));
        let cgroup_procs = match cgroup_procs {
            Ok(file) => file,
            Err(error) => {
                let _ = fs::remove_dir(&cgroup);
                return Err(error).context("opening the bench cgroup's cgroup.procs");
            }
        };
        // From here on, Drop undoes whatever part succeeded.
        let sandbox = Self {
            cgroup,
            cgroup_relative: format!("/{name}"),
            cgroup_procs,
            workdir,
            open_files,
        };
        let _ = fs::remove_dir_all(&sandbox.workdir);
        fs::create_dir_all(&sandbox.workdir)?;
        enter_new_network_namespace()?;
        Ok(sandbox)
    }

    /// For [`super::procs::SpawnOptions::cgroup_procs`].
    pub fn cgroup_procs_fd(&self) -> libc::c_int {
        self.cgroup_procs.as_raw_fd()
    }

    fn cgroup_pids(&self) -> Vec<u32> {
        fs::read_to_string(self.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Only clients ever live in the cgroup; kill any that survived.
        if !self.cgroup_pids().is_empty() {
            let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        }
        for _ in 0..250 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.cgroup.exists() {
            eprintln!("xtask bench: could not remove {}", self.cgroup.display());
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// Raises RLIMIT_NOFILE (inherited by every child) as far as allowed and returns the
/// soft limit now in force. Above the hard limit needs CAP_SYS_RESOURCE, which a
/// container's root may lack; then the hard limit is the ceiling.
fn raise_open_files_limit() -> Result<u64> {
    let ceiling = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|raw| raw.trim().parse::<u64>().ok())
        .unwrap_or(1_048_576);
    let wanted = OPEN_FILES.min(ceiling);
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    for (soft, hard) in [
        (wanted, wanted.max(current.rlim_max)),
        (wanted.min(current.rlim_max), current.rlim_max),
    ] {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit with a valid rlimit; children inherit it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
            return Ok(soft);
        }
    }
    bail!("raising RLIMIT_NOFILE: {}", std::io::Error::last_os_error())
}

/// Bench cgroups whose harness no longer runs (it was SIGKILLed before cleanup).
fn remove_stale_cgroups(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix("interceptor-bench-"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = fs::write(path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if fs::remove_dir(&path).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn enter_new_network_namespace() -> Result<()> {
    // SAFETY: unshare affects only this thread's network namespace; threads and
    // children created by it afterwards inherit the new one.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{BACKEND_IPV4}/32"), "dev", "lo"])?;
    ip(&[
        "-6",
        "addr",
        "add",
        &format!("{BACKEND_IPV6}/128"),
        "dev",
        "lo",
    ])?;
    // /proc/sys/net follows the network namespace of the thread that opens it.
    // TIME_WAIT reuse for the 198.18/15 hosts too (the default 2 covers 127/8 only),
    // and a wide ephemeral range: the connection-rate runs open ~100k connections.
    fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").context("setting tcp_tw_reuse")?;
    fs::write("/proc/sys/net/ipv4/ip_local_port_range", EPHEMERAL_PORTS)
        .context("setting ip_local_port_range")?;
    for family in ["-4", "-6"] {
        let routes = Command::new("ip")
            .args([family, "route", "show", "default"])
            .output()
            .context("running ip (iproute2)")?;
        ensure!(
            routes.status.success() && routes.stdout.is_empty(),
            "the bench network namespace has a default route: {}",
            String::from_utf8_lossy(&routes.stdout)
        );
    }
    let links = Command::new("ip").args(["-o", "link", "show"]).output()?;
    let links = String::from_utf8_lossy(&links.stdout);
    ensure!(
        links.lines().count() == 1 && links.contains(" lo:"),
        "the bench network namespace has links besides lo:\n{links}"
    );
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    ensure!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
