//! The Kubernetes DaemonSet in deploy/kubernetes/interceptor.yaml, run as written.
//!
//! No kubelet runs here, so the test does the kubelet's part for the one container:
//! it expands `$(NODE_IP)`, maps each volume's mount path to a stand-in (the
//! ConfigMap to a directory laid out as the kubelet lays out a ConfigMap volume, the
//! node's cgroup2 mount to the sandbox's cgroup), starts the container's command with
//! its args, and uses the readiness probe as the kubelet does. Everything else is
//! real: the programs, a pod-like network namespace behind a veth pair, a ConfigMap
//! update by symlink swap, SIGTERM within the grace period.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::Shutdown,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{
    CONTAINER_ADDR_V4, CONTAINER_GATEWAY_V4, Container, Daemon, Sandbox, TestServer,
    admin::get_from,
    assert_refused_for_lack_of_netns_cookies,
    daemon::{self, stop_while_connecting},
    server::{Who, connect, who},
};
use serde_json::Value;
use testbed::bpf::BpfFs;

const MANIFEST_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/interceptor.yaml"
);

/// The example ServiceEntry's VIP and port, and the endpoint it names.
const VIP: &str = "240.240.0.10:5432";
const ENDPOINT: &str = "198.18.0.10";
/// Where the test moves that endpoint with a ConfigMap update.
const MOVED_ENDPOINT: &str = "198.18.0.11";

struct Manifest {
    configmap: Value,
    daemonset: Value,
}

impl Manifest {
    fn read() -> Self {
        let text = std::fs::read_to_string(MANIFEST_PATH).expect("read the manifest");
        let mut configmap = None;
        let mut daemonset = None;
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|error| panic!("{MANIFEST_PATH}: {error}"));
        for document in documents {
            match document["kind"].as_str() {
                Some("ConfigMap") => configmap = Some(document),
                Some("DaemonSet") => daemonset = Some(document),
                _ => {}
            }
        }
        Self {
            configmap: configmap.expect("the manifest has a ConfigMap"),
            daemonset: daemonset.expect("the manifest has a DaemonSet"),
        }
    }

    fn pod(&self) -> &Value {
        &self.daemonset["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod()["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "one container per pod");
        &containers[0]
    }

    fn configmap_data(&self) -> BTreeMap<String, String> {
        serde_json::from_value(self.configmap["data"].clone()).expect("ConfigMap data")
    }

    /// Each volume mount's path and the volume behind it.
    fn mounts(&self) -> Vec<(String, &Value)> {
        let volumes = self.pod()["volumes"].as_array().expect("volumes");
        let mounts = self.container()["volumeMounts"]
            .as_array()
            .expect("volumeMounts");
        mounts
            .iter()
            .map(|mount| {
                let volume = volumes
                    .iter()
                    .find(|volume| volume["name"] == mount["name"])
                    .unwrap_or_else(|| panic!("no volume for mount {mount}"));
                (mount["mountPath"].as_str().unwrap().to_owned(), volume)
            })
            .collect()
    }

    /// The readiness probe's exec command.
    fn readiness_probe(&self) -> Vec<String> {
        let command = self.container()["readinessProbe"]["exec"]["command"]
            .as_array()
            .expect("an exec readiness probe");
        command
            .iter()
            .map(|arg| arg.as_str().expect("probe args are strings").to_owned())
            .collect()
    }

    fn grace_period(&self) -> Duration {
        Duration::from_secs(
            self.pod()["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap(),
        )
    }

    /// `resources.requests.memory`, in bytes.
    fn memory_request(&self) -> u64 {
        let quantity = self.container()["resources"]["requests"]["memory"]
            .as_str()
            .expect("a memory request");
        let mebibytes: u64 = quantity
            .strip_suffix("Mi")
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("memory request {quantity:?} is not in Mi"));
        mebibytes << 20
    }
}

/// What the daemon's container is charged for, roughly: its resident memory and its
/// BPF maps (`memlock` in each map descriptor's fdinfo, the kernel's own figure; the
/// socket storage of redirected sockets, a few hundred bytes each, comes on top).
/// Before Linux 6.4 `memlock` is each map's full capacity, not what it allocated (the
/// hash maps and the trie allocate per entry), so the maps' figure is `None` there:
/// this kernel does not say what they are charged.
fn charged_memory(pid: u32) -> (u64, Option<u64>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let resident_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse().ok())
        .expect("VmRSS in /proc/pid/status");
    // A map may have several descriptors; each is counted once, by its id.
    let mut maps = std::collections::HashMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(fd.unwrap().path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, memlock);
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let maps_charged = (version >= (6, 4)).then(|| maps.values().sum());
    (resident_kib << 10, maps_charged)
}

/// A ConfigMap volume as the kubelet writes it: the files in a timestamped directory,
/// a `..data` symlink to it, and one symlink per key through `..data`. An update
/// writes a new directory and renames a new symlink over `..data`, so readers see the
/// old set or the new one, never a mix.
struct ConfigMapVolume {
    dir: PathBuf,
    generation: u32,
}

impl ConfigMapVolume {
    fn new(dir: &Path, data: &BTreeMap<String, String>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut volume = Self {
            dir: dir.to_owned(),
            generation: 0,
        };
        volume.update(data);
        for key in data.keys() {
            std::os::unix::fs::symlink(Path::new("..data").join(key), dir.join(key)).unwrap();
        }
        volume
    }

    fn update(&mut self, data: &BTreeMap<String, String>) {
        let old = self.payload_dir();
        self.generation += 1;
        let new = self.payload_dir();
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        for (key, text) in data {
            std::fs::write(self.dir.join(&new).join(key), text).unwrap();
        }
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &staged).unwrap();
        std::fs::rename(&staged, self.dir.join("..data")).unwrap();
        if self.generation > 1 {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }

    fn payload_dir(&self) -> String {
        format!("..2026_11_24_00_00_00.{:09}", self.generation)
    }
}

/// The capability set of a securityContext's `add` list.
fn capability_mask(names: &Value) -> u64 {
    names
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|name| match name.as_str().expect("a capability name") {
            "NET_ADMIN" => 1 << 12,
            "SYS_ADMIN" => 1 << 21,
            "PERFMON" => 1 << 38,
            "BPF" => 1 << 39,
            other => panic!("the test does not know capability {other}"),
        })
        .fold(0, |mask, capability| mask | capability)
}

/// The container's binary, checked against the image, and its args with
/// `$(NODE_IP)` and the mount paths replaced.
fn command_line(
    manifest: &Manifest,
    node_ip: &str,
    mount_targets: &[(String, PathBuf)],
) -> Vec<OsString> {
    let container = manifest.container();
    let env = container["env"].as_array().expect("env");
    let node_ip_source = env
        .iter()
        .find(|var| var["name"] == "NODE_IP")
        .expect("NODE_IP in env");
    assert_eq!(
        node_ip_source["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP",
        "NODE_IP must be the node's address"
    );
    let command = container["command"].as_array().expect("command");
    assert_eq!(command.len(), 1, "the binary alone: {command:?}");
    // The image puts the binary where the command says (the test runs the local build).
    let containerfile = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/Containerfile"
    ))
    .unwrap();
    let installed = format!(
        "COPY target/release/interceptor {}",
        command[0].as_str().unwrap()
    );
    assert!(
        containerfile.lines().any(|line| line == installed),
        "the Containerfile has no {installed:?}"
    );
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|arg| {
            let arg = arg
                .as_str()
                .expect("args are strings")
                .replace("$(NODE_IP)", node_ip);
            map_mount_path(&arg, mount_targets)
        })
        .collect()
}

/// `arg` with a mount path it starts with replaced by the stand-in for its volume.
fn map_mount_path(arg: &str, mount_targets: &[(String, PathBuf)]) -> OsString {
    match mount_targets
        .iter()
        .find(|(mount_path, _)| arg == *mount_path || arg.starts_with(&format!("{mount_path}/")))
    {
        Some((mount_path, target)) => {
            let mut mapped = target.clone().into_os_string();
            mapped.push(&arg[mount_path.len()..]);
            mapped
        }
        None => arg.into(),
    }
}

/// One pod of the DaemonSet on the node: its own emptyDir volumes, and the
/// container's command line and readiness probe mapped onto them.
struct Pod {
    args: Vec<OsString>,
    /// The probe's args; it runs the container's binary, as the test checks.
    probe: Vec<OsString>,
}

impl Pod {
    /// Runs the readiness probe as the kubelet does, in the container: Ok with its
    /// output if it exits 0, Err with it otherwise.
    fn probe(&self) -> Result<String, String> {
        let output = std::process::Command::new(integration_tests::daemon::binary().unwrap())
            .args(&self.probe)
            .output()
            .expect("run the readiness probe");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// The value of `flag` in the container's args.
    fn arg(&self, flag: &str) -> &OsString {
        let at = self
            .args
            .iter()
            .position(|arg| arg == flag)
            .unwrap_or_else(|| panic!("{flag} in the args"));
        &self.args[at + 1]
    }

    /// What the daemon says in its --address-file.
    fn addresses(&self) -> Value {
        let text = std::fs::read_to_string(self.arg("--address-file")).expect("the address file");
        serde_json::from_str(&text).unwrap()
    }
}

/// Whether the pod's readiness probe passed; false if its daemon exited first.
fn wait_until_ready(daemon: &mut Daemon, pod: &Pod) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probed = pod.probe();
        if probed.is_ok() {
            return true;
        }
        if daemon.has_exited() {
            return false;
        }
        if Instant::now() > deadline {
            panic!(
                "the readiness probe never passed: {probed:?}\n{}",
                daemon.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_served_by(seen: std::io::Result<Who>, server: &str) {
    let seen = seen.unwrap_or_else(|error| panic!("connect to {VIP}: {error}"));
    assert_eq!(seen.server, server, "{seen:?}");
    assert!(seen.went_through_proxy(), "{seen:?}");
    assert_eq!(
        seen.client_peer.to_string(),
        VIP,
        "getpeername shows the VIP"
    );
}

/// A node as the DaemonSet sees it: the sandbox, with the ConfigMap volume, the
/// endpoint the example names and the one an update moves it to, and the container's
/// command line mapped onto them.
struct Node {
    manifest: Manifest,
    configmap: ConfigMapVolume,
    data: BTreeMap<String, String>,
    /// Where each volume that is not a pod's own (the ConfigMap, the host path) is.
    shared_mounts: Vec<(String, PathBuf)>,
    /// The volume and mount path of each emptyDir.
    empty_dirs: Vec<(String, String)>,
    /// Replaces the `--config` value in the args, if set.
    config_override: Option<PathBuf>,
    _servers: [TestServer; 2],
    /// Unmounted before the sandbox, whose directory holds it, goes.
    _bpf_fs: BpfFs,
    sandbox: Sandbox,
}

impl Node {
    fn new(name: &str) -> Self {
        let manifest = Manifest::read();
        assert_eq!(
            manifest.pod()["hostNetwork"],
            true,
            "the proxy must be on the node's loopback"
        );
        // The API server rejects a DaemonSet whose selector misses its pods' labels.
        let labels = &manifest.daemonset["spec"]["template"]["metadata"]["labels"];
        let selector = manifest.daemonset["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("spec.selector.matchLabels");
        for (key, value) in selector {
            assert_eq!(&labels[key], value, "the selector's {key} is on the pods");
        }
        let sandbox = Sandbox::new(name);
        sandbox.add_host(ENDPOINT.parse().unwrap());
        sandbox.add_host(MOVED_ENDPOINT.parse().unwrap());
        let servers = [
            TestServer::start("first", &format!("{ENDPOINT}:5432")),
            TestServer::start("moved", &format!("{MOVED_ENDPOINT}:5432")),
        ];
        let data = manifest.configmap_data();
        let configmap = ConfigMapVolume::new(&sandbox.workdir.join("configmap"), &data);
        let mut shared_mounts = Vec::new();
        let mut empty_dirs = Vec::new();
        let mut node_bpf_fs = None;
        for (mount_path, volume) in manifest.mounts() {
            if volume.get("configMap").is_some() {
                assert_eq!(
                    volume["configMap"]["name"],
                    manifest.configmap["metadata"]["name"]
                );
                shared_mounts.push((mount_path, configmap.dir.clone()));
            } else if volume.get("emptyDir").is_some() {
                empty_dirs.push((volume["name"].as_str().unwrap().to_owned(), mount_path));
            } else if volume["hostPath"]["path"] == "/var/lib/interceptor" {
                // The node's state directory outlives pods: every pod shares one.
                let dir = sandbox.workdir.join("node-state");
                std::fs::create_dir_all(&dir).unwrap();
                shared_mounts.push((mount_path, dir));
            } else if volume["hostPath"]["path"] == "/sys/fs/bpf" {
                // A BPF filesystem of the test's stands in for the node's.
                let bpf_fs = BpfFs::mount(sandbox.workdir.join("node-bpffs")).unwrap();
                shared_mounts.push((mount_path, bpf_fs.path.clone()));
                node_bpf_fs = Some(bpf_fs);
            } else {
                assert_eq!(
                    volume["hostPath"]["path"], "/sys/fs/cgroup",
                    "the other host path is the node's cgroup2 mount"
                );
                // The sandbox's cgroup stands in for the node's cgroup2 root.
                shared_mounts.push((mount_path, sandbox.cgroup.clone()));
            }
        }
        Self {
            manifest,
            configmap,
            data,
            shared_mounts,
            empty_dirs,
            config_override: None,
            _servers: servers,
            _bpf_fs: node_bpf_fs.expect("the DaemonSet mounts the node's BPF filesystem"),
            sandbox,
        }
    }

    /// A pod of the DaemonSet, with fresh emptyDirs, as the kubelet makes one.
    fn pod(&self, name: &str) -> Pod {
        let mut mounts = self.shared_mounts.clone();
        for (volume, mount_path) in &self.empty_dirs {
            let dir = self.sandbox.workdir.join("pods").join(name).join(volume);
            std::fs::create_dir_all(&dir).unwrap();
            mounts.push((mount_path.clone(), dir));
        }
        let mut args = command_line(&self.manifest, CONTAINER_GATEWAY_V4, &mounts);
        if let Some(config) = &self.config_override {
            let at = args.iter().position(|arg| arg == "--config").unwrap() + 1;
            args[at] = config.clone().into_os_string();
        }
        let probe = self.manifest.readiness_probe();
        assert_eq!(
            probe[0],
            self.manifest.container()["command"][0],
            "the probe runs the container's binary"
        );
        let probe = probe[1..]
            .iter()
            .map(|arg| map_mount_path(arg, &mounts))
            .collect();
        Pod { args, probe }
    }

    /// Starts the container's command with the security context's capabilities, as
    /// a container runtime would: uid 0, every other capability out of the bounding
    /// set (so out of the permitted and effective sets after exec), no new
    /// privileges. Then waits on the readiness probe. None: the daemon refused the
    /// manifest's container proxy address, as it does on a kernel without netns
    /// cookies (checked).
    fn start_daemon(&self, pod: &Pod) -> Option<Daemon> {
        let security = &self.manifest.container()["securityContext"];
        assert_eq!(security["runAsUser"], 0);
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let kept = capability_mask(&security["capabilities"]["add"]);
        let no_new_privileges = security["allowPrivilegeEscalation"] == false;
        let last_capability: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut command = daemon::command(&pod.args, &[]).unwrap();
        // SAFETY: prctl is async-signal-safe and changes only the child.
        unsafe {
            command.pre_exec(move || {
                for capability in 0..=last_capability {
                    if kept & (1 << capability) == 0
                        && libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut daemon = daemon::spawn_command(command).expect("start the container's command");
        if !wait_until_ready(&mut daemon, pod) {
            assert_refused_for_lack_of_netns_cookies(&mut daemon);
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
        let effective = status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap());
        assert_eq!(
            effective,
            Some(kept),
            "the daemon runs with the manifest's capabilities only"
        );
        Some(daemon)
    }

    /// The kubelet's update of the ConfigMap with the endpoint moved.
    fn move_endpoint(&mut self) {
        let mut moved = self.data.clone();
        for text in moved.values_mut() {
            *text = text.replace(ENDPOINT, MOVED_ENDPOINT);
        }
        assert_ne!(moved, self.data, "the ConfigMap names {ENDPOINT}");
        self.configmap.update(&moved);
        self.data = moved;
    }
}

#[test]
fn the_daemonset_runs_as_written_and_follows_configmap_updates() {
    let mut node = Node::new("daemonset");
    // A pod in a network namespace of its own, whose node IP is the veth's far end.
    let pod_client = Container::start(|| who(VIP));
    let pod = node.pod("interceptor");
    let Some(mut daemon) = node.start_daemon(&pod) else {
        return;
    };

    assert_served_by(pod_client.run(), "first");
    // A host-network pod, in the node's namespace.
    assert_served_by(who(VIP), "first");
    let logs = daemon.wait_for_log("connection closed", 2);
    assert!(
        logs.contains(&format!("\"client\":\"{CONTAINER_ADDR_V4}:")),
        "the pod's connection came in through the node IP:\n{logs}"
    );

    // The memory request covers what the container is charged for once serving,
    // the BPF maps included, with a quarter left for connections (this is a debug
    // build, whose RSS is half as large again as a release build's).
    let (resident, maps) = charged_memory(daemon.pid());
    let request = node.manifest.memory_request();
    assert!(
        resident + maps.unwrap_or(0) <= request / 4 * 3,
        "RSS {} MiB + BPF maps {} against a {} MiB request",
        resident >> 20,
        maps.map_or("(not told before Linux 6.4)".to_owned(), |maps| format!(
            "{} MiB",
            maps >> 20
        )),
        request >> 20
    );

    // New connections go where the updated ConfigMap says.
    node.move_endpoint();
    daemon.wait_for_log("configuration reloaded", 1);
    assert_served_by(who(VIP), "moved");

    // An invalid update is refused with the file and the field, and the running
    // config stays.
    let mut broken = node.data.clone();
    for text in broken.values_mut() {
        *text = text.replace("resolution: STATIC", "resolution: STATICALLY");
    }
    assert_ne!(broken, node.data, "the ConfigMap has a STATIC entry");
    node.configmap.update(&broken);
    let logs = daemon.wait_for_log("reload failed", 1);
    let failure = logs
        .lines()
        .find(|line| line.contains("reload failed"))
        .unwrap();
    assert!(
        failure.contains("serviceentries.yaml") && failure.contains("spec.resolution"),
        "{failure}"
    );
    assert_served_by(who(VIP), "moved");

    // SIGTERM, as the kubelet sends it: the programs leave (a new connect to the VIP
    // goes direct and finds nothing, as on a node between two daemons), the probe
    // says draining, an open connection goes on, and the daemon exits 0 once it
    // closes, within the drain timeout and the grace period.
    let drain_timeout = pod
        .arg("--drain-timeout")
        .to_str()
        .and_then(|secs| secs.parse().ok())
        .map(Duration::from_secs)
        .expect("--drain-timeout SECS in the args");
    assert!(drain_timeout < node.manifest.grace_period());
    let mut open = connect(VIP).expect("connect before SIGTERM");
    open.write_all(b"ECHO\n").unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "moved\n");

    let stopping = Instant::now();
    daemon.signal(libc::SIGTERM);
    while !pod.probe().is_err_and(|output| output.contains("draining")) {
        assert!(
            stopping.elapsed() < drain_timeout,
            "the probe never said draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The probe flips just before the programs are detached.
    loop {
        match connect(VIP) {
            Err(error) if error.kind() == std::io::ErrorKind::NetworkUnreachable => break,
            other => assert!(
                stopping.elapsed() < drain_timeout,
                "VIP connects still intercepted while draining: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    open.write_all(b"still here\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(daemon.wait(), Some(0), "{}", daemon.logs());
    assert!(stopping.elapsed() < drain_timeout);
    let gone = pod
        .probe()
        .expect_err("the probe fails once the daemon has gone");
    assert!(gone.contains("no address file"), "{gone}");
}

/// `--config` may also name one file of the ConfigMap, which is a symlink through
/// `..data`: an update never touches that path, only what it resolves to.
#[test]
fn a_config_file_in_a_configmap_volume_follows_updates() {
    let mut node = Node::new("configmap-file");
    let key = node.data.keys().next().expect("a ConfigMap key").clone();
    node.config_override = Some(node.configmap.dir.join(key));
    // The node IP the container proxy address names; no pod here to bring its link.
    node.sandbox.add_host(CONTAINER_GATEWAY_V4.parse().unwrap());
    let Some(daemon) = node.start_daemon(&node.pod("interceptor")) else {
        return;
    };
    assert_served_by(who(VIP), "first");

    node.move_endpoint();
    daemon.wait_for_log("configuration reloaded", 1);
    assert_served_by(who(VIP), "moved");
}

/// A rolling update as the updateStrategy has it, on one node: the new pod starts
/// next to the old one and turns ready on its own probe, and only then is the old
/// pod stopped. Connects from a pod and from the host network, in a loop all the
/// while, never fail; the new daemon then answers at the configured admin address,
/// and the roll after it takes the configured proxy ports again.
#[test]
fn a_rolling_update_surges_a_new_pod_and_no_connect_fails() {
    let node = Node::new("daemonset-roll");
    let strategy = &node.manifest.daemonset["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 1);
    // With hostNetwork every container port is a host port, and the scheduler would
    // keep a surge pod off the node where the pod it replaces holds that port.
    assert!(node.manifest.container().get("ports").is_none());

    let stop_pod_client = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pod_client = {
        let stop = std::sync::Arc::clone(&stop_pod_client);
        Container::start(move || {
            let mut served = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match who(VIP) {
                    Ok(seen) if seen.server == "first" && seen.went_through_proxy() => served += 1,
                    other => return Err(format!("pod connect {served}: {other:?}")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(served)
        })
    };
    let old_pod = node.pod("old");
    let Some(old) = node.start_daemon(&old_pod) else {
        return;
    };
    let new_pod = node.pod("new");
    let not_yet = new_pod
        .probe()
        .expect_err("a pod whose daemon has not started is not ready");
    assert!(not_yet.contains("no address file"), "{not_yet}");
    // Nor is one whose emptyDir holds the file of a daemon that was killed there,
    // although the admin address it names answers ready (for the old pod).
    let configured_admin = old_pod.arg("--admin-addr").to_str().unwrap().to_owned();
    std::fs::write(
        new_pod.arg("--address-file"),
        serde_json::json!({
            "admin": configured_admin, "proxy": [], "pid": u32::MAX, "instance": 1
        })
        .to_string(),
    )
    .unwrap();
    let not_yet = new_pod
        .probe()
        .expect_err("a dead daemon's file is not ready");
    assert!(not_yet.contains("another daemon's"), "{not_yet}");
    let new = node
        .start_daemon(&new_pod)
        .expect("the kernel ran the old pod's daemon");

    let (old_addresses, new_addresses) = (old_pod.addresses(), new_pod.addresses());
    assert_eq!(old_addresses["admin"], configured_admin.as_str());
    assert_ne!(new_addresses["admin"], configured_admin.as_str());
    let ports = |addresses: &Value| -> Vec<u64> {
        addresses["proxy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|addr| {
                addr.as_str()
                    .unwrap()
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .port()
                    .into()
            })
            .collect()
    };
    let configured_ports = ports(&old_addresses);
    assert!(
        configured_ports.iter().all(|port| *port == 15001),
        "{old_addresses}"
    );
    assert!(
        ports(&new_addresses).iter().all(|port| *port == 15002),
        "the surge pod listens on the ports after the configured ones: {new_addresses}"
    );

    // Once the new pod is ready, the old one is deleted: SIGTERM within its grace
    // period, while the pod and a host-network client connect.
    let pod_client = std::thread::spawn(move || pod_client.run());
    let (status, old_logs) = stop_while_connecting(
        old,
        Duration::from_millis(300),
        Duration::from_millis(300),
        |connections| {
            let seen = who(VIP).unwrap_or_else(|error| {
                panic!("connect {connections} failed in the roll: {error}")
            });
            assert_served_by(Ok(seen), "first");
        },
    );
    stop_pod_client.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(status, Some(0), "the old daemon exits cleanly:\n{old_logs}");
    let from_pod = pod_client
        .join()
        .unwrap()
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(from_pod > 0);
    let clean_closes = |logs: &str| {
        ["client_fin", "upstream_fin"]
            .iter()
            .map(|close| logs.matches(&format!("\"close\":\"{close}\"")).count())
            .sum::<usize>()
    };
    assert!(
        clean_closes(&old_logs) > 1,
        "the old daemon served until it was stopped"
    );
    new.wait_for_log("\"connection closed\"", 2);
    for close in [
        "client_reset",
        "upstream_reset",
        "client_error",
        "upstream_error",
    ] {
        let field = format!("\"close\":\"{close}\"");
        assert!(!new.logs().contains(&field), "{}", new.logs());
    }

    // Scrape configs name the configured admin address: the new daemon takes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while new_pod.addresses()["admin"] != configured_admin.as_str() {
        assert!(
            Instant::now() < deadline,
            "the admin server stayed on its free port:\n{}",
            new.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(matches!(
        get_from(&configured_admin, "/healthz/ready"),
        Ok((200, _))
    ));
    new_pod.probe().expect("still ready");

    // The next roll goes back to the configured proxy ports. (The pod has gone, and
    // its link with it; the node IP must still exist.)
    node.sandbox.add_host(CONTAINER_GATEWAY_V4.parse().unwrap());
    let next_pod = node.pod("next");
    let _next = node
        .start_daemon(&next_pod)
        .expect("the kernel ran the old pod's daemon");
    assert_eq!(ports(&next_pod.addresses()), configured_ports);
}
