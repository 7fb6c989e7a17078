//! Fixtures for the root integration tests.
//!
//! Each test runs in a [`Sandbox`], the [`testbed`] one joined by the test process: a
//! fresh network namespace with only loopback, and a fresh cgroup that holds the test
//! process and the daemon. Both are torn down when the sandbox drops, also when the
//! test panics.

pub mod admin;
pub mod apiserver;
pub mod daemon;
pub mod dns;
pub mod origin;
pub mod server;
pub mod tls;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Deref,
    path::{Path, PathBuf},
};

pub use daemon::Daemon;
pub use server::TestServer;

/// A [`testbed::Sandbox`] that the test process joins, so every connection the test
/// makes goes through the daemon's programs.
pub struct Sandbox {
    sandbox: testbed::Sandbox,
}

impl Deref for Sandbox {
    type Target = testbed::Sandbox;

    fn deref(&self) -> &testbed::Sandbox {
        &self.sandbox
    }
}

impl Sandbox {
    /// Sets up the sandbox or panics with the reason: a root test that cannot set itself
    /// up must fail, never pass silently.
    pub fn new(name: &str) -> Self {
        // SAFETY: geteuid has no preconditions.
        let sandbox = if unsafe { libc::geteuid() } == 0 {
            testbed::Sandbox::create(
                &format!(
                    "{}{}-{name}",
                    testbed::TEST_CGROUP_PREFIX,
                    std::process::id()
                ),
                testbed::Placement::Harness,
            )
        } else {
            Err(anyhow::anyhow!("not running as root"))
        };
        let sandbox = sandbox.unwrap_or_else(|error| {
            panic!("cannot set up the integration-test sandbox (these tests need root, cgroup v2 and BPF): {error:#}")
        });
        Self { sandbox }
    }

    /// Gives a test host an address on loopback inside the namespace.
    pub fn add_host(&self, addr: Ipv4Addr) {
        self.add_address(addr.into())
            .unwrap_or_else(|error| panic!("adding {addr}: {error:#}"));
    }

    /// An IPv6 test host, from the unique-local range, which exists only in here.
    pub fn add_host_v6(&self, addr: Ipv6Addr) {
        self.add_address(addr.into())
            .unwrap_or_else(|error| panic!("adding {addr}: {error:#}"));
    }

    /// Test hosts, IPv4 or IPv6, written as addresses.
    pub fn add_hosts(&self, hosts: &[&str]) {
        for host in hosts {
            let addr: IpAddr = host.parse().expect("a test host address");
            self.add_address(addr)
                .unwrap_or_else(|error| panic!("adding {addr}: {error:#}"));
        }
    }

    /// Asserts, asking the kernel, that `count` programs are attached to this
    /// sandbox's cgroup for each of connect4, connect6 and sock_ops.
    pub fn assert_programs_attached(&self, count: u32) {
        for (attach_type, name) in [
            (testbed::bpf::BPF_CGROUP_INET4_CONNECT, "connect4"),
            (testbed::bpf::BPF_CGROUP_INET6_CONNECT, "connect6"),
            (testbed::bpf::BPF_CGROUP_SOCK_OPS, "sock_ops"),
        ] {
            let attached = testbed::bpf::attached_programs(&self.cgroup, attach_type)
                .unwrap_or_else(|error| panic!("querying {name} programs: {error}"));
            assert_eq!(attached, count, "{name} programs attached");
        }
    }

    /// Writes `yaml` as the config and starts the daemon in this sandbox's cgroup,
    /// which is also the cgroup the programs attach to: the daemon's own connections
    /// are exposed to its programs, as they are when it runs at a host's cgroup root.
    pub fn start_daemon(&self, yaml: &str, extra_args: &[&str]) -> Daemon {
        let config = self.write_config(yaml);
        daemon::start(&config, &self.cgroup, extra_args)
            .unwrap_or_else(|error| panic!("starting the daemon: {error:#}"))
    }

    /// [`Sandbox::start_daemon`] without waiting for it to be ready, for a test that
    /// checks a refusal to start.
    pub fn spawn_daemon(&self, yaml: &str, extra_args: &[&str]) -> Daemon {
        let config = self.write_config(yaml);
        daemon::spawn(&config, &self.cgroup, extra_args, &[])
            .unwrap_or_else(|error| panic!("starting the daemon: {error:#}"))
    }

    /// [`Sandbox::start_daemon`] with container proxy addresses among `extra_args`:
    /// `None` on a kernel without netns cookies (before Linux 5.14), once the daemon
    /// has refused to start as docs/kernels.md says and left no program attached.
    pub fn start_container_daemon(&self, yaml: &str, extra_args: &[&str]) -> Option<Daemon> {
        let mut daemon = self.spawn_daemon(yaml, extra_args);
        if daemon.wait_ready().is_ok() {
            return Some(daemon);
        }
        assert_refused_for_lack_of_netns_cookies(&mut daemon);
        assert_eq!(
            testbed::bpf::attached_programs(&self.cgroup, testbed::bpf::BPF_CGROUP_INET4_CONNECT)
                .unwrap(),
            0,
            "a refused start left a program attached"
        );
        None
    }

    /// Writes `yaml` as this sandbox's config file, the one [`Sandbox::start_daemon`]
    /// starts on, the way [`replace_file`] does; returns its path.
    pub fn write_config(&self, yaml: &str) -> PathBuf {
        let config = self.workdir.join("config.yaml");
        replace_file(&config, yaml);
        config
    }
}

/// Names the daemon's start-up warning (no container proxy address) or its refusal
/// (one) on a kernel that does not tell a socket its network namespace's cookie, before
/// Linux 5.14: there its programs cannot tell a container from the daemon's own
/// network namespace.
pub const NO_NETNS_COOKIE: &str = "SO_NETNS_COOKIE";

/// Checks that `daemon`, given a container proxy address, refused to start as
/// docs/kernels.md says it does on a kernel without netns cookies (before Linux 5.14):
/// the kernel lacks them, the daemon exited 1, and its last line is the one-line
/// refusal. Call it once the daemon has failed to get ready.
pub fn assert_refused_for_lack_of_netns_cookies(daemon: &mut Daemon) {
    assert!(
        !kernel_has_netns_cookies(),
        "the daemon did not start on a kernel with netns cookies:\n{}",
        daemon.logs()
    );
    assert_eq!(daemon.wait(), Some(1), "{}", daemon.logs());
    let logs = daemon.logs();
    let refusal = logs.lines().last().unwrap_or_default();
    assert!(
        refusal.starts_with("interceptor: ")
            && refusal.contains("container proxy address")
            && refusal.contains(NO_NETNS_COOKIE)
            && refusal.contains("Linux 5.14"),
        "not the one-line refusal for lack of netns cookies:\n{logs}"
    );
}

/// Whether this kernel answers SO_NETNS_COOKIE: what the daemon probes at start, asked
/// again so a test can hold the daemon's verdict to it.
pub fn kernel_has_netns_cookies() -> bool {
    // SAFETY: a fresh socket, an option value of the size the kernel writes, and the
    // socket closed before returning.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(socket >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut cookie = 0_u64;
        let mut length = std::mem::size_of::<u64>() as libc::socklen_t;
        let answered = libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut length,
        ) == 0;
        libc::close(socket);
        answered
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
    testbed::ip(&["link", "set", "lo", "up"]).expect("bring up the container's loopback");
    for host in hosts {
        testbed::ip(&["addr", "add", &format!("{host}/32"), "dev", "lo"])
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
    testbed::ip(args).unwrap_or_else(|error| panic!("{error:#}"));
}

/// The proxy's default listener inside every sandbox.
pub const PROXY: &str = "127.0.0.1:15001";

/// A ServiceEntry `namespace/name` for host `name.namespace.test`: the VIP `vip` with
/// one STATIC endpoint, both on port 7000.
pub fn vip_entry(namespace: &str, name: &str, vip: &str, endpoint: &str) -> String {
    static_entry(
        namespace,
        name,
        vip,
        "{number: 7000, name: tcp, protocol: TCP}",
        &format!("  - address: {endpoint}"),
    )
}

/// A STATIC ServiceEntry `namespace/name` for host `name.namespace.test` at `vip`,
/// with one `port` (a YAML flow mapping) and `endpoints` (YAML list items, indented
/// by two spaces).
pub fn static_entry(namespace: &str, name: &str, vip: &str, port: &str, endpoints: &str) -> String {
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
  - {port}
  resolution: STATIC
  endpoints:
{endpoints}
"#
    )
}

/// Writes `text` to `path` the way config management and certificate rotation do: a
/// temporary file in the same directory, renamed over the old one, so a reader never
/// sees half a file.
pub fn replace_file(path: &Path, text: &str) {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, text)
        .unwrap_or_else(|error| panic!("writing {}: {error}", temporary.display()));
    std::fs::rename(&temporary, path)
        .unwrap_or_else(|error| panic!("renaming over {}: {error}", path.display()));
}

/// A cgroup a test makes below its sandbox's (a client's, a pod's), removed when
/// dropped; drop children first.
pub struct ChildCgroup(pub PathBuf);

impl ChildCgroup {
    pub fn create(path: PathBuf) -> Self {
        std::fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("cannot create cgroup {}: {error}", path.display()));
        Self(path)
    }

    /// The cgroup id the kernel knows it by: its directory's inode number.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.0).unwrap().ino()
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs `script` in bash, as a process of `cgroup`, waits for it, and returns what it
/// printed.
pub fn run_in_cgroup(cgroup: &Path, script: &str) -> String {
    use std::os::unix::process::CommandExt as _;
    let procs = cgroup.join("cgroup.procs");
    let mut command = std::process::Command::new("bash");
    command.args(["-c", script]);
    // SAFETY: only a write to a file between fork and exec.
    unsafe {
        command.pre_exec(move || std::fs::write(&procs, "0"));
    }
    let output = command.output().expect("run bash");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
