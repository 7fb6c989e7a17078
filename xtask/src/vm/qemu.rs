//! Boots one kernel of the image in qemu and streams its serial console.

use std::{
    fmt, fs,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::image::{Boot, Image, Payload};

/// Software emulation is slow: a whole suite on an old kernel takes tens of minutes.
const RUN_LIMIT: Duration = Duration::from_secs(120 * 60);
/// What the guest's runner prints last (see GUEST_RUNNER).
const STATUS_PREFIX: &str = "xtask-vm: exit status ";

pub enum Outcome {
    Passed(Duration),
    Failed(i32, Duration),
    /// The VM stopped, or was stopped, before the runner reported: a kernel that
    /// did not boot, a panic, a hang.
    NoStatus(String),
    Interactive,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Passed(_) | Outcome::Interactive)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Passed(took) => write!(f, "passed in {} s", took.as_secs()),
            Outcome::Failed(status, took) => {
                write!(
                    f,
                    "FAILED (exit status {status}) after {} s",
                    took.as_secs()
                )
            }
            Outcome::NoStatus(why) => write!(f, "FAILED: {why}"),
            Outcome::Interactive => write!(f, "shell closed"),
        }
    }
}

pub fn boot(image: &Image, boot: &Boot, payload: &Payload, shell: bool) -> Result<Outcome> {
    let mut append = String::from("root=/dev/vda rw console=ttyS0,115200 panic=-1 net.ifnames=0");
    if !shell {
        // Kernel and systemd chatter stays out of the test output; errors still show.
        // No login prompt either: agetty hangs up the console it takes over, and the
        // runner's output would go with it.
        append.push_str(
            " xtask.run loglevel=4 systemd.show_status=error systemd.mask=serial-getty@ttyS0.service",
        );
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
    ])
    .args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(&boot.vmlinuz)
    .arg("-initrd")
    .arg(&boot.initrd)
    .args(["-append", &append])
    // The cached image is never written: every boot starts from the same state.
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=virtio,snapshot=on",
        image.disk.display()
    ))
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=virtio,snapshot=on",
        payload.disk.display()
    ));
    println!(
        "\n======== kernel {} ({}) ========",
        boot.label, boot.release
    );
    if shell {
        qemu.args(["-serial", "mon:stdio"]);
        crate::check(&mut qemu)?;
        return Ok(Outcome::Interactive);
    }
    qemu.args(["-serial", "stdio", "-monitor", "none"]);
    watch(qemu, boot.label)
}

/// Boots the image's systemd in a container of the host's kernel, with the payload
/// bound in: the unit checks need a real systemd, not a particular kernel.
pub fn nspawn(image: &Image, payload: &Payload) -> Result<Outcome> {
    let nspawn = format!(
        "systemd-nspawn --quiet --register=no --keep-unit --boot --volatile=overlay \
         --private-network --capability=CAP_BPF,CAP_PERFMON --system-call-filter=bpf \
         --bind-ro={payload}:/payload --directory={rootfs} systemd.show_status=error",
        payload = payload.dir.display(),
        rootfs = image.rootfs().display(),
    );
    println!("\n======== systemd-nspawn on the host's kernel ========");
    // The daemon in the container attaches to the container's cgroup root, which is
    // nspawn's own cgroup (or a child of it): so nspawn starts in a cgroup of its
    // own, never the host's root, and the cgroup goes when it ends, also when this
    // fails. A run killed before its cleanup is swept up by the next.
    testbed::remove_stale_cgroups(testbed::TEST_CGROUP_PREFIX)?;
    let cgroup = OwnCgroup::create(format!(
        "{}{}-nspawn",
        testbed::TEST_CGROUP_PREFIX,
        std::process::id()
    ))?;
    // script gives nspawn the terminal it wants for the container's console.
    let mut script = Command::new("script");
    script.args([
        "--quiet",
        "--flush",
        "--return",
        "--command",
        &nspawn,
        "/dev/null",
    ]);
    let procs = cgroup.0.join("cgroup.procs");
    // SAFETY: between fork and exec the closure opens, writes and closes one file;
    // xtask has no other thread yet, so the allocation that makes is safe too.
    unsafe {
        script.pre_exec(move || fs::write(&procs, "0"));
    }
    watch(script, "nspawn")
}

/// A cgroup of this run's, removed when it drops with everything the container's
/// systemd made in it, also in the v1 hierarchy where nspawn mirrors it on a host
/// with the hybrid layout.
struct OwnCgroup(PathBuf);

impl OwnCgroup {
    fn create(name: String) -> Result<Self> {
        let path = interceptor_common::host::cgroup2_root()?.join(name);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(OwnCgroup(path))
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        // The v2 cgroup first: removing it kills the processes the v1 one holds too.
        let mirror =
            testbed::systemd_v1_hierarchy().and_then(|v1| Some(v1.join(self.0.file_name()?)));
        for path in std::iter::once(&self.0).chain(&mirror) {
            if !testbed::remove_cgroup(path) {
                eprintln!("xtask vm: could not remove {}", path.display());
            }
        }
    }
}

/// Runs a boot, streams its console under `label`, and reads the runner's status.
fn watch(mut command: Command, label: &str) -> Result<Outcome> {
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    let timed_out = Arc::new(AtomicBool::new(false));
    let pid = child.id();
    let watchdog = {
        let timed_out = Arc::clone(&timed_out);
        thread::spawn(move || {
            thread::park_timeout(RUN_LIMIT);
            if started.elapsed() >= RUN_LIMIT {
                timed_out.store(true, Ordering::SeqCst);
                // SAFETY: kill(2) on our own child's pid; it is reaped below, so the
                // pid cannot have been reused before this.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        })
    };
    let mut status = None;
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line.context("reading the console")?;
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        println!("[{label}] {line}");
        if let Some(code) = line
            .find(STATUS_PREFIX)
            .map(|at| &line[at + STATUS_PREFIX.len()..])
        {
            status = code.trim().parse::<i32>().ok();
        }
    }
    let exit = child.wait().context("waiting for the boot to end")?;
    watchdog.thread().unpark();
    let took = started.elapsed();
    Ok(match status {
        Some(0) => Outcome::Passed(took),
        Some(code) => Outcome::Failed(code, took),
        None if timed_out.load(Ordering::SeqCst) => {
            Outcome::NoStatus(format!("no result within {} min", RUN_LIMIT.as_secs() / 60))
        }
        None => Outcome::NoStatus(format!("it stopped ({exit}) before the runner reported")),
    })
}
