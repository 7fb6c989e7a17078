//! A throwaway network namespace and cgroup, removed on every exit path.
//!
//! The namespace is entered with `unshare(CLONE_NEWNET)` by the calling thread: that
//! thread, and the threads and children it creates afterwards, live in it. It has
//! loopback only and no default route, so a redirect bug cannot send a packet off the
//! machine. The cgroup is the one the daemon's programs attach to. Both are torn down
//! when the sandbox drops, also when the harness panics.

use std::{
    fs::{self, File, OpenOptions},
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use interceptor_common::host::cgroup2_root;

/// A harness that joins its cgroup moves the whole process, so sandboxes in one
/// process take turns.
static ONE_SANDBOX_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What goes into the sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The harness process itself, and so every child it starts (the tests: the test
    /// is the client whose connections are redirected).
    Harness,
    /// Only children started with [`Sandbox::cgroup_procs_fd`] (the bench: its
    /// clients, not the proxies or backends it measures them against).
    Children,
}

pub struct Sandbox {
    pub cgroup: PathBuf,
    /// The cgroup as /proc/<pid>/cgroup names it.
    pub cgroup_relative: String,
    /// A scratch directory for configs and the like.
    pub workdir: PathBuf,
    cgroup_procs: File,
    /// Where the harness was before it joined the sandbox's cgroup.
    original_cgroup: Option<PathBuf>,
    original_netns: OwnedFd,
    _turn: MutexGuard<'static, ()>,
}

impl Sandbox {
    /// Creates the cgroup `name` under the cgroup2 root and the directory `name` under
    /// the temporary directory, and moves the calling thread into a new network
    /// namespace. A `name` that starts with a prefix and the harness's pid lets
    /// [`remove_stale_cgroups`] find what a killed harness left.
    pub fn create(name: &str, placement: Placement) -> Result<Self> {
        let turn = ONE_SANDBOX_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let root = cgroup2_root().context("finding the cgroup2 mount")?;
        let original_cgroup = current_cgroup(&root)?;
        let cgroup = root.join(name);
        if cgroup.exists() {
            fs::remove_dir(&cgroup).with_context(|| format!("stale {}", cgroup.display()))?;
        }
        fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        let cgroup_procs = OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"));
        let cgroup_procs = match cgroup_procs {
            Ok(file) => file,
            Err(error) => {
                let _ = fs::remove_dir(&cgroup);
                return Err(error).context("opening the sandbox cgroup's cgroup.procs");
            }
        };
        let original_netns: OwnedFd = match File::open("/proc/thread-self/ns/net") {
            Ok(file) => file.into(),
            Err(error) => {
                let _ = fs::remove_dir(&cgroup);
                return Err(error).context("opening /proc/thread-self/ns/net");
            }
        };
        // From here on, Drop undoes whatever part succeeded.
        let mut sandbox = Self {
            cgroup,
            cgroup_relative: format!("/{name}"),
            workdir: std::env::temp_dir().join(name),
            cgroup_procs,
            original_cgroup: None,
            original_netns,
            _turn: turn,
        };
        let _ = fs::remove_dir_all(&sandbox.workdir);
        fs::create_dir_all(&sandbox.workdir)
            .with_context(|| format!("creating {}", sandbox.workdir.display()))?;
        // SAFETY: unshare affects only this thread's network namespace; threads and
        // children created by it afterwards inherit the new one.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        ip(&["link", "set", "lo", "up"])?;
        if placement == Placement::Harness {
            sandbox.original_cgroup = Some(original_cgroup);
            fs::write(
                sandbox.cgroup.join("cgroup.procs"),
                std::process::id().to_string(),
            )
            .context("moving the harness into the sandbox's cgroup")?;
        }
        assert_isolated()?;
        Ok(sandbox)
    }

    /// Puts `addr` on loopback inside the namespace, where only this sandbox sees it.
    pub fn add_address(&self, addr: IpAddr) -> Result<()> {
        match addr {
            IpAddr::V4(addr) => ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]),
            // nodad: usable at once, without duplicate address detection.
            IpAddr::V6(addr) => ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr}/128"),
                "dev",
                "lo",
                "nodad",
            ]),
        }
    }

    /// An open `cgroup.procs` descriptor, for [`crate::SpawnOptions::cgroup_procs`].
    pub fn cgroup_procs_fd(&self) -> libc::c_int {
        self.cgroup_procs.as_raw_fd()
    }

    pub fn cgroup_pids(&self) -> Vec<u32> {
        fs::read_to_string(self.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(original) = &self.original_cgroup {
            let _ = fs::write(
                original.join("cgroup.procs"),
                std::process::id().to_string(),
            );
        }
        // Anything still in the cgroup (a child the harness leaked) is killed, so the
        // cgroup can be removed; never the harness, should it have failed to leave.
        let pids = self.cgroup_pids();
        if !pids.is_empty() && !pids.contains(&std::process::id()) {
            let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        }
        for _ in 0..250 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.cgroup.exists() {
            eprintln!("testbed: could not remove {}", self.cgroup.display());
        }
        // The namespace goes away with its last socket once this thread leaves it.
        // SAFETY: setns on a namespace descriptor we opened; affects only this thread.
        unsafe { libc::setns(self.original_netns.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// Checks, in the calling thread's namespace, that nothing leads off the machine: no
/// default route and no link besides loopback.
fn assert_isolated() -> Result<()> {
    for family in ["-4", "-6"] {
        let routes = Command::new("ip")
            .args([family, "route", "show", "default"])
            .output()
            .context("running ip (iproute2)")?;
        ensure!(
            routes.status.success() && routes.stdout.is_empty(),
            "the sandbox's network namespace has a default route: {}",
            String::from_utf8_lossy(&routes.stdout)
        );
    }
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .context("running ip (iproute2)")?;
    let links = String::from_utf8_lossy(&links.stdout);
    ensure!(
        links.lines().count() == 1 && links.contains(" lo:"),
        "the sandbox's network namespace has links besides lo:\n{links}"
    );
    Ok(())
}

/// Cgroups `<prefix><pid>` or `<prefix><pid>-<anything>` whose harness no longer runs
/// (it was SIGKILLed before its cleanup): their processes are killed and the cgroups
/// removed.
pub fn remove_stale_cgroups(prefix: &str) -> Result<()> {
    let root = cgroup2_root().context("finding the cgroup2 mount")?;
    remove_stale_cgroups_in(&root, prefix)?;
    if let Some(v1) = systemd_v1_hierarchy() {
        remove_stale_cgroups_in(&v1, prefix)?;
    }
    Ok(())
}

/// On a host with systemd's hybrid cgroup layout, the v1 hierarchy systemd names its
/// own (`name=systemd`): systemd-nspawn mirrors its cgroup there, and a container's
/// systemd makes its cgroups in both.
pub fn systemd_v1_hierarchy() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, target, "cgroup", options, ..] = fields[..] else {
            return None;
        };
        options
            .split(',')
            .any(|option| option == "name=systemd")
            .then(|| PathBuf::from(target))
    })
}

fn remove_stale_cgroups_in(root: &Path, prefix: &str) -> Result<()> {
    let entries = fs::read_dir(root).with_context(|| format!("listing {}", root.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        remove_cgroup(&path);
    }
    Ok(())
}

/// Kills every process in the cgroup `path` and its descendants and removes them all,
/// deepest first: a cgroup with a child cgroup cannot be removed, empty or not, and a
/// container's systemd makes many. Waits up to 5 s for the killed to go; false if
/// `path` is still there then.
pub fn remove_cgroup(path: &Path) -> bool {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..250 {
        remove_cgroup_tree(path);
        if !path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(path);
}

/// Runs `ip` (iproute2) in the calling thread's network namespace: a child starts in
/// its parent thread's.
pub fn ip(args: &[&str]) -> Result<()> {
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

fn current_cgroup(root: &Path) -> Result<PathBuf> {
    let membership =
        fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let relative = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(root.join(relative.trim_start_matches('/')))
}
