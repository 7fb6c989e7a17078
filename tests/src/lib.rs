//! Fixtures for the root integration tests.
//!
//! Each test runs in a [`Sandbox`]: a fresh network namespace that has only loopback
//! and no default route (so a redirect bug cannot send a packet off the machine), and
//! a fresh cgroup that holds the test process and the daemon. Both are torn down when
//! the sandbox drops, also when the test panics.

pub mod admin;
pub mod bpf;
pub mod daemon;
pub mod dns;
pub mod server;
pub mod tls;

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard},
};

use anyhow::{Context as _, Result, bail, ensure};

pub use daemon::Daemon;
pub use server::TestServer;

/// A test moves the whole process into its cgroup, so tests in one process take turns.
static ONE_SANDBOX_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct Sandbox {
    pub cgroup: PathBuf,
    pub workdir: PathBuf,
    original_cgroup: PathBuf,
    original_netns: OwnedFd,
    _turn: MutexGuard<'static, ()>,
}

impl Sandbox {
    /// Sets up the sandbox or panics with the reason: a root test that cannot set itself
    /// up must fail, never pass silently.
    pub fn new(name: &str) -> Self {
        Self::try_new(name).unwrap_or_else(|error| {
            panic!("cannot set up the integration-test sandbox (these tests need root, cgroup v2 and BPF): {error:#}")
        })
    }

    fn try_new(name: &str) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        ensure!(unsafe { libc::geteuid() } == 0, "not running as root");
        let turn = ONE_SANDBOX_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());

        let root = cgroup2_root()?;
        let original_cgroup = current_cgroup(&root)?;
        let cgroup = root.join(format!("interceptor-test-{}-{name}", std::process::id()));
        if cgroup.exists() {
            fs::remove_dir(&cgroup).with_context(|| format!("stale {}", cgroup.display()))?;
        }
        fs::create_dir(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        let workdir =
            std::env::temp_dir().join(format!("interceptor-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(&workdir)?;

        let original_netns: OwnedFd = fs::File::open("/proc/thread-self/ns/net")
            .context("open /proc/thread-self/ns/net")?
            .into();
        let mut sandbox = Self {
            cgroup,
            workdir,
            original_cgroup,
            original_netns,
            _turn: turn,
        };
        // From here on, Drop undoes whatever part succeeded.
        // SAFETY: unshare affects only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        run_ip(&["link", "set", "lo", "up"])?;
        fs::write(
            sandbox.cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .context("moving the test process into its cgroup")?;
        sandbox.assert_isolated()?;
        Ok(sandbox)
    }

    fn assert_isolated(&mut self) -> Result<()> {
        let routes = Command::new("ip")
            .args(["-4", "route", "show", "default"])
            .output()?;
        ensure!(
            routes.stdout.is_empty(),
            "the test network namespace has a default route: {}",
            String::from_utf8_lossy(&routes.stdout)
        );
        Ok(())
    }

    /// Gives a test host an address on loopback inside the namespace.
    pub fn add_host(&self, addr: Ipv4Addr) {
        run_ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .unwrap_or_else(|error| panic!("adding {addr}: {error:#}"));
    }

    /// An IPv6 test host, from the unique-local range, which exists only in here.
    pub fn add_host_v6(&self, addr: std::net::Ipv6Addr) {
        run_ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "lo",
            "nodad",
        ])
        .unwrap_or_else(|error| panic!("adding {addr}: {error:#}"));
    }

    /// Writes `yaml` as the config and starts the daemon in this sandbox's cgroup,
    /// which is also the cgroup the programs attach to: the daemon's own connections
    /// are exposed to its programs, as they are when it runs at a host's cgroup root.
    pub fn start_daemon(&self, yaml: &str, extra_args: &[&str]) -> Daemon {
        let config = self.workdir.join("config.yaml");
        fs::write(&config, yaml).expect("write config");
        Daemon::start(&config, &self.cgroup, extra_args)
            .unwrap_or_else(|error| panic!("starting the daemon: {error:#}"))
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
        // Anything still in the cgroup (a daemon the test leaked) is killed, so the
        // cgroup can be removed.
        let _ = fs::write(
            self.original_cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if !self.cgroup_pids().contains(&std::process::id()) {
            let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        }
        for _ in 0..100 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The namespace goes away with its last socket once this thread leaves it.
        // SAFETY: setns on a namespace descriptor we opened; affects only this thread.
        unsafe { libc::setns(self.original_netns.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// Moves the calling thread into a network namespace of its own, as a container's
/// processes are, with loopback up and `hosts` on it; the thread stays in the test's
/// cgroup. The namespace lives as long as the thread or a socket made in it.
pub fn enter_container_network_namespace(hosts: &[Ipv4Addr]) {
    // SAFETY: unshare affects only this thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    // `ip` runs in this thread's namespace: a child starts in its parent thread's.
    run_ip(&["link", "set", "lo", "up"]).expect("bring up the container's loopback");
    for host in hosts {
        run_ip(&["addr", "add", &format!("{host}/32"), "dev", "lo"])
            .unwrap_or_else(|error| panic!("adding {host} in the container: {error:#}"));
    }
}

/// The sandbox's end of a [`Container`]'s veth pair: the address a container bridge's
/// gateway or a node IP would have.
pub const CONTAINER_GATEWAY_V4: &str = "198.18.5.1";
pub const CONTAINER_GATEWAY_V6: &str = "fd00:5::1";
/// The container's end.
pub const CONTAINER_ADDR_V4: &str = "198.18.5.2";
pub const CONTAINER_ADDR_V6: &str = "fd00:5::2";

/// A container or pod: a thread in a network namespace of its own, still in the
/// test's cgroup, joined to the sandbox's namespace by a veth pair as a container
/// bridge joins it to a host's. Its work runs when [`Container::run`] is called, so
/// the test can start the daemon in between.
pub struct Container<T> {
    thread: std::thread::JoinHandle<Option<T>>,
    go: std::sync::mpsc::Sender<()>,
}

impl<T: Send + 'static> Container<T> {
    /// Sets up the container and the sandbox's end of its link; call it from the
    /// thread that made the sandbox.
    pub fn start(work: impl FnOnce() -> T + Send + 'static) -> Self {
        // SAFETY: gettid has no preconditions.
        let sandbox_netns = format!("/proc/{}/task/{}/ns/net", std::process::id(), unsafe {
            libc::gettid()
        });
        let (link_ready, link_is_ready) = std::sync::mpsc::channel();
        let (go, wait_for_go) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter_container_network_namespace(&[]);
            ip(&[
                "link",
                "add",
                "icpt-ctr",
                "type",
                "veth",
                "peer",
                "name",
                "icpt-host",
            ]);
            ip(&["link", "set", "icpt-host", "netns", &sandbox_netns]);
            ip(&[
                "addr",
                "add",
                &format!("{CONTAINER_ADDR_V4}/30"),
                "dev",
                "icpt-ctr",
            ]);
            let v6 = format!("{CONTAINER_ADDR_V6}/64");
            ip(&["-6", "addr", "add", &v6, "dev", "icpt-ctr", "nodad"]);
            ip(&["link", "set", "icpt-ctr", "up"]);
            link_ready.send(()).expect("the test waits for the link");
            // A test that fails before `run` drops the sender: nothing to do then.
            wait_for_go.recv().ok().map(|()| work())
        });
        link_is_ready.recv().expect("the container set up its link");
        ip(&[
            "addr",
            "add",
            &format!("{CONTAINER_GATEWAY_V4}/30"),
            "dev",
            "icpt-host",
        ]);
        let v6 = format!("{CONTAINER_GATEWAY_V6}/64");
        ip(&["-6", "addr", "add", &v6, "dev", "icpt-host", "nodad"]);
        ip(&["link", "set", "icpt-host", "up"]);
        Self { thread, go }
    }

    /// Runs the work in the container and returns its result.
    pub fn run(self) -> T {
        self.go.send(()).expect("the container thread is waiting");
        match self.thread.join() {
            Ok(result) => result.expect("the work ran"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Runs `ip` in the calling thread's network namespace, or panics with its error.
pub fn ip(args: &[&str]) {
    run_ip(args).unwrap_or_else(|error| panic!("{error:#}"));
}

fn run_ip(args: &[&str]) -> Result<()> {
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

pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .context("no cgroup2 mount in /proc/self/mounts")
}

fn current_cgroup(root: &Path) -> Result<PathBuf> {
    let membership = fs::read_to_string("/proc/self/cgroup")?;
    let relative = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(root.join(relative.trim_start_matches('/')))
}

/// The proxy's default listener inside every sandbox.
pub const PROXY: &str = "127.0.0.1:15001";

/// A ServiceEntry `namespace/name` for host `name.namespace.test`: the VIP `vip` with
/// one STATIC endpoint, both on port 7000.
pub fn vip_entry(namespace: &str, name: &str, vip: &str, endpoint: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: {namespace}
spec:
  hosts: [{name}.{namespace}.test]
  addresses: [{vip}]
  ports:
  - number: 7000
    name: tcp
    protocol: TCP
  resolution: STATIC
  endpoints:
  - address: {endpoint}
"#
    )
}
