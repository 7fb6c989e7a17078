//! The VM image: a Debian root filesystem made by debootstrap and provisioned by
//! deploy/vagrant/provision.sh (the Vagrant rig runs the same script), the kernels
//! fetched from Debian's archive, and the payload disk with the binaries under test.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use super::Kernel;
use crate::{check, setup};

/// The image's release: the same as the host's, so binaries built here run there.
const IMAGE_SUITE: &str = "bookworm";
const IMAGE_PACKAGES: &str = "systemd-sysv,udev,kmod,initramfs-tools,iproute2,procps,util-linux,ca-certificates,curl,python3,bind9-dnsutils";
/// The cloud kernel builds its virtio drivers as modules; the initramfs loads them
/// in dependency order before it looks for the root disk.
const INITRAMFS_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];
const DISK_SIZE: &str = "6G";

pub fn ensure_host_packages() -> Result<()> {
    setup::ensure_debian_packages(&["debootstrap", "e2fsprogs", "systemd-container"])?;
    ensure_qemu()
}

/// qemu-system-x86 must match the installed qemu-utils, which may come from
/// bookworm-backports: install it from a temporary sources list that names the
/// machine's own mirror, never touching the machine's apt configuration.
fn ensure_qemu() -> Result<()> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
    {
        return Ok(());
    }
    let mirror = debian_mirror()?;
    let apt = TempApt::new(
        Path::new("/tmp/xtask-vm-apt"),
        &["bookworm", "bookworm-updates", "bookworm-backports"]
            .map(|suite| format!("{mirror} {suite}")),
    )?;
    apt.update()?;
    check(
        apt.command("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(["-t", "bookworm-backports", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

/// The Debian mirror the machine's apt already uses (deb822 or one-line format).
fn debian_mirror() -> Result<String> {
    let mut texts = Vec::new();
    for dir in ["/etc/apt/sources.list.d", "/etc/apt"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path.to_string_lossy();
            if name.ends_with(".sources") || name.ends_with(".list") {
                texts.push(fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    texts
        .iter()
        .flat_map(|text| text.split_whitespace())
        .find(|word| {
            (word.starts_with("http://") || word.starts_with("https://"))
                && word.trim_end_matches('/').ends_with("/debian")
        })
        .map(|word| word.trim_end_matches('/').to_string())
        .context("no Debian mirror in /etc/apt/sources.list*: the VM image needs one")
}

/// apt with its own sources list, lists and cache, so that fetching other releases'
/// packages leaves the machine's apt state alone.
struct TempApt {
    dir: PathBuf,
}

impl TempApt {
    /// `sources`: "MIRROR SUITE" pairs.
    fn new(dir: &Path, sources: &[String]) -> Result<Self> {
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let list: String = sources
            .iter()
            .map(|source| {
                format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {source} main\n"
                )
            })
            .collect();
        fs::write(dir.join("sources.list"), list)?;
        Ok(TempApt {
            dir: dir.to_path_buf(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let option = |name: &str, value: &Path| format!("-o{name}={}", value.display());
        command
            .arg(option(
                "Dir::Etc::sourcelist",
                &self.dir.join("sources.list"),
            ))
            .arg("-oDir::Etc::sourceparts=-")
            .arg(option("Dir::State::Lists", &self.dir.join("lists")))
            .arg(option("Dir::Cache", &self.dir.join("cache")));
        command
    }

    /// The linux-* packages `package` depends on (the first of each alternative).
    fn kernel_dependencies(&self, package: &str) -> Result<Vec<String>> {
        let show = self
            .command("apt-cache")
            .args(["show", package])
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&show.stdout);
        let depends = text
            .lines()
            .find_map(|line| line.strip_prefix("Depends:"))
            .unwrap_or_default();
        Ok(depends
            .split(',')
            .flat_map(|dep| dep.split('|'))
            .filter_map(|dep| dep.split_whitespace().next())
            .filter(|dep| dep.starts_with("linux-"))
            .map(str::to_string)
            .collect())
    }

    fn update(&self) -> Result<()> {
        check(self.command("apt-get").args(["update", "-q"]))
    }
}

/// One bootable kernel of the image.
pub struct Boot {
    pub label: &'static str,
    /// `uname -r` inside the VM.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

pub struct Image {
    root: PathBuf,
    rootfs: PathBuf,
    pub disk: PathBuf,
    /// Whether the tree changed since `disk` was written.
    changed: bool,
}

impl Image {
    /// The debootstrap tree, made and provisioned on first use.
    pub fn open(root: &Path, vm_dir: &Path) -> Result<Self> {
        let rootfs = vm_dir.join("rootfs");
        let complete = rootfs.join(".xtask-complete");
        let disk = vm_dir.join("base.img");
        let mut image = Image {
            root: root.to_path_buf(),
            rootfs,
            changed: !disk.exists(),
            disk,
        };
        if complete.exists() {
            image.write_guest_files()?;
            return Ok(image);
        }
        if image.rootfs.exists() {
            fs::remove_dir_all(&image.rootfs)
                .with_context(|| format!("removing the partial {}", image.rootfs.display()))?;
        }
        println!("xtask vm: building the {IMAGE_SUITE} image with debootstrap");
        check(
            Command::new("debootstrap")
                .args(["--variant=minbase", "--include", IMAGE_PACKAGES])
                .arg(IMAGE_SUITE)
                .arg(&image.rootfs)
                .arg(debian_mirror()?),
        )?;
        image.provision()?;
        fs::write(&complete, "")?;
        image.changed = true;
        Ok(image)
    }

    /// The shared provisioning script, then what only the test VM needs: a root
    /// console, the payload disk, and the unit that runs the tests at boot.
    fn provision(&mut self) -> Result<()> {
        let staged = self.rootfs.join("tmp/provision");
        fs::create_dir_all(&staged)?;
        fs::copy(
            self.root.join("deploy/vagrant/provision.sh"),
            staged.join("provision.sh"),
        )?;
        copy_tree(&self.root.join("deploy"), &staged.join("deploy"))?;
        copy_tree(&self.root.join("examples"), &staged.join("examples"))?;
        self.in_root(&[
            "sh",
            "/tmp/provision/provision.sh",
            "--source",
            "/tmp/provision",
        ])?;
        fs::remove_dir_all(&staged)?;

        let write = |path: &str, text: &str| -> Result<()> {
            let path = self.rootfs.join(path.trim_start_matches('/'));
            fs::create_dir_all(path.parent().expect("absolute"))?;
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write("/etc/hostname", "interceptor-vm\n")?;
        write(
            "/etc/fstab",
            "/dev/vda / ext4 defaults 0 1\n/dev/vdb /payload ext4 defaults,nofail 0 2\n",
        )?;
        write(
            "/etc/initramfs-tools/modules",
            &(INITRAMFS_MODULES.join("\n") + "\n"),
        )?;
        // gzip: every kernel of the matrix can unpack it.
        write(
            "/etc/initramfs-tools/conf.d/xtask-vm",
            "COMPRESS=gzip\nMODULES=most\n",
        )?;
        write(
            "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
            "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200 %I $TERM\n",
        )?;
        self.write_guest_files()?;
        self.in_root(&["systemctl", "enable", "xtask-vm.service"])?;
        Ok(())
    }

    /// The runner and its unit, rewritten when they differ from this build's.
    fn write_guest_files(&mut self) -> Result<()> {
        for (path, text, mode) in [
            ("usr/local/sbin/xtask-vm-run", GUEST_RUNNER, 0o755),
            ("etc/systemd/system/xtask-vm.service", GUEST_UNIT, 0o644),
        ] {
            let path = self.rootfs.join(path);
            if fs::read_to_string(&path).is_ok_and(|current| current == text) {
                continue;
            }
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            set_mode(&path, mode)?;
            self.changed = true;
        }
        for unit in GUEST_MASKED {
            let link = self.rootfs.join("etc/systemd/system").join(unit);
            if fs::read_link(&link).is_ok_and(|target| target == Path::new("/dev/null")) {
                continue;
            }
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink("/dev/null", &link)
                .with_context(|| format!("masking {unit}"))?;
            self.changed = true;
        }
        Ok(())
    }

    /// Runs a command inside the tree, with /proc mounted in a mount namespace of
    /// its own that vanishes with the command.
    fn in_root(&self, command: &[&str]) -> Result<()> {
        let mut script = format!(
            "mount -t proc proc {0}/proc && mount --rbind /dev {0}/dev && exec chroot {0}",
            self.rootfs.display()
        );
        for word in command {
            script.push_str(&format!(" '{word}'"));
        }
        check(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(script)
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        )
    }

    /// Fetches one kernel from Debian's archive (once) and installs its modules and
    /// an initramfs in the tree.
    pub fn ensure_kernel(&mut self, kernel: Kernel) -> Result<Boot> {
        let dir = self.root.join("target/vm/kernels").join(kernel.suite);
        let release_file = dir.join("release");
        let installed = fs::read_to_string(&release_file)
            .map(|release| release.trim().to_string())
            .ok()
            .filter(|release| self.rootfs.join(format!("boot/vmlinuz-{release}")).exists());
        let release = match installed {
            Some(release) => release,
            None => {
                let release = self.fetch_kernel(kernel, &dir)?;
                fs::write(&release_file, &release)?;
                release
            }
        };
        let boot = Boot {
            label: kernel.label,
            vmlinuz: self.rootfs.join(format!("boot/vmlinuz-{release}")),
            initrd: self.rootfs.join(format!("boot/initrd.img-{release}")),
            release,
        };
        if !boot.initrd.exists() {
            println!("xtask vm: making the initramfs of {}", boot.release);
            self.in_root(&[
                "mkinitramfs",
                "-o",
                &format!("/boot/initrd.img-{}", boot.release),
                &boot.release,
            ])?;
            self.changed = true;
        }
        Ok(boot)
    }

    fn fetch_kernel(&mut self, kernel: Kernel, dir: &Path) -> Result<String> {
        println!(
            "xtask vm: fetching Debian {}'s cloud kernel ({})",
            kernel.suite, kernel.label
        );
        let apt = TempApt::new(
            &dir.join("apt"),
            &[format!("{} {}", debian_mirror()?, kernel.suite)],
        )?;
        apt.update()?;
        // The metapackage names the versioned image package this release ships;
        // from 7.x on, that one is itself split into linux-binary-* (the kernel) and
        // linux-modules-* (its modules).
        let package = apt
            .kernel_dependencies("linux-image-cloud-amd64")?
            .into_iter()
            .find(|dep| dep.starts_with("linux-image-"))
            .with_context(|| format!("no linux-image-cloud-amd64 in Debian {}", kernel.suite))?;
        let release = package.trim_start_matches("linux-image-").to_string();
        let mut packages = vec![package.clone()];
        packages.extend(
            apt.kernel_dependencies(&package)?
                .into_iter()
                .filter(|dep| dep.ends_with(&release)),
        );
        let debs_dir = dir.join("debs");
        if debs_dir.exists() {
            fs::remove_dir_all(&debs_dir)?;
        }
        fs::create_dir_all(&debs_dir)?;
        check(
            apt.command("apt-get")
                .arg("download")
                .args(&packages)
                .current_dir(&debs_dir),
        )?;
        // Unpacked, not installed: its maintainer scripts belong to another release.
        // Into a directory of its own first: older packages put modules under /lib,
        // which in the merged-/usr tree is a link that extracting over would replace.
        let unpacked = dir.join("unpacked");
        if unpacked.exists() {
            fs::remove_dir_all(&unpacked)?;
        }
        for deb in fs::read_dir(&debs_dir)?.flatten() {
            check(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(deb.path())
                    .arg(&unpacked),
            )?;
        }
        for (from, to) in [
            ("boot", "boot"),
            ("lib/modules", "usr/lib/modules"),
            ("usr/lib/modules", "usr/lib/modules"),
        ] {
            if unpacked.join(from).exists() {
                copy_tree(&unpacked.join(from), &self.rootfs.join(to))?;
            }
        }
        fs::remove_dir_all(&unpacked)?;
        // From 7.x on the kernel and its config ship in the modules directory, and
        // the maintainer scripts (not run here) put them in /boot.
        let modules = self.rootfs.join("usr/lib/modules").join(&release);
        for (shipped, boot) in [
            ("vmlinuz", "vmlinuz"),
            ("config", "config"),
            ("System.map", "System.map"),
        ] {
            let target = self.rootfs.join(format!("boot/{boot}-{release}"));
            if modules.join(shipped).exists() && !target.exists() {
                fs::copy(modules.join(shipped), target)?;
            }
        }
        self.in_root(&["depmod", &release])?;
        self.changed = true;
        Ok(release)
    }

    /// The tree as an ext4 disk, rewritten when the tree changed.
    pub fn ensure_disk(&mut self) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        println!("xtask vm: writing {}", self.disk.display());
        let _ = fs::remove_file(&self.disk);
        make_ext4(&self.rootfs, &self.disk, DISK_SIZE)
    }

    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }
}

/// The binaries under test and the files the tests read at their build-time paths,
/// on a disk of their own, so the cached image is never rewritten for a build.
pub struct Payload {
    pub dir: PathBuf,
    pub disk: PathBuf,
}

/// What the payload runs at boot.
pub enum Run<'a> {
    /// The integration test binary with these arguments, in a VM.
    Tests(&'a [String]),
    /// The systemd unit checks, in a container.
    SystemdChecks,
}

pub fn build_payload(root: &Path, vm_dir: &Path, what: Run) -> Result<Payload> {
    super::cargo_build(&["build", "--package", "interceptor"])?;
    let test_binary = match what {
        Run::Tests(_) => Some(integration_test_binary()?),
        Run::SystemdChecks => None,
    };
    let dir = vm_dir.join("payload");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    // Inside the VM the workspace path is a link to this tree, so paths compiled
    // into the tests (CARGO_MANIFEST_DIR) resolve.
    let workspace = dir.join("workspace");
    fs::create_dir_all(workspace.join("target/debug"))?;
    fs::create_dir_all(workspace.join("tests"))?;
    copy_tree(&root.join("deploy"), &workspace.join("deploy"))?;
    copy_tree(&root.join("examples"), &workspace.join("examples"))?;
    fs::copy(
        root.join("target/debug/interceptor"),
        workspace.join("target/debug/interceptor"),
    )?;
    if let Some(test_binary) = &test_binary {
        fs::copy(test_binary, workspace.join("target/debug/integration"))?;
    }
    fs::write(dir.join("workspace-path"), format!("{}\n", root.display()))?;
    let (what, script) = match what {
        Run::Tests(test_args) => {
            let mut quoted_args = String::new();
            for arg in test_args {
                quoted_args.push_str(&format!(" '{}'", arg.replace('\'', r"'\''")));
            }
            let script = format!(
                "#!/bin/sh\nset -e\ncd '{root}/tests'\nexport INTERCEPTOR_BIN='{root}/target/debug/interceptor' RUST_BACKTRACE=1\nexec '{root}/target/debug/integration' --color=never{quoted_args}\n",
                root = root.display()
            );
            ("the integration tests", script)
        }
        Run::SystemdChecks => {
            fs::write(dir.join("autorun"), "")?;
            ("the systemd unit checks", SYSTEMD_CHECKS.to_string())
        }
    };
    fs::write(dir.join("what"), what)?;
    fs::write(dir.join("run.sh"), script)?;
    let disk = vm_dir.join("payload.img");
    let _ = fs::remove_file(&disk);
    make_ext4(
        &dir,
        &disk,
        &format!("{}M", tree_size_mib(&dir)? * 3 / 2 + 64),
    )?;
    Ok(Payload { dir, disk })
}

/// Builds the integration test binary and returns its path, as cargo reports it.
fn integration_test_binary() -> Result<PathBuf> {
    super::cargo_build(&[
        "test",
        "--package",
        "integration-tests",
        "--test",
        "integration",
        "--no-run",
    ])?;
    let output = crate::cargo()
        .args([
            "test",
            "--package",
            "integration-tests",
            "--test",
            "integration",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::null())
        .output()
        .context("running cargo test --no-run")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "integration")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo named no integration test executable")
}

fn make_ext4(tree: &Path, disk: &Path, size: &str) -> Result<()> {
    check(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(tree)
            .arg(disk)
            .arg(size),
    )
}

fn tree_size_mib(tree: &Path) -> Result<u64> {
    let output = Command::new("du")
        .args(["-sm"])
        .arg(tree)
        .output()
        .context("running du")?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .and_then(|size| size.parse().ok())
        .context("du printed no size")
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    check(Command::new("cp").arg("-a").arg(from.join(".")).arg(to))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Runs at boot: links the workspace path to the payload and, when asked (`xtask.run`
/// on a VM's kernel command line, or /payload/autorun in a container), runs
/// /payload/run.sh, prints a status line the host reads, and powers off.
const GUEST_RUNNER: &str = r#"#!/bin/sh
workspace=$(cat /payload/workspace-path 2>/dev/null) || exit 0
mkdir -p "$(dirname "$workspace")"
ln -sfn /payload/workspace "$workspace"
if [ -e /payload/autorun ]; then
	container=yes
elif grep -qw xtask.run /proc/cmdline; then
	container=no
else
	exit 0
fi
echo "xtask-vm: kernel $(uname -r), $(nproc) CPUs, running $(cat /payload/what)"
sh /payload/run.sh
status=$?
echo "xtask-vm: exit status $status"
sync
if [ "$container" = yes ]; then
	# Never the sysrq trigger here: in a container it is the host's.
	systemctl poweroff --no-block
else
	echo o > /proc/sysrq-trigger
fi
"#;

/// Nothing in the test VM may wait for a network it does not have, and no login
/// prompt may take the console from the runner: agetty hangs up the terminal it takes
/// over. (--shell logs in through serial-getty@ttyS0, which stays.)
const GUEST_MASKED: &[&str] = &[
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "console-getty.service",
    "container-getty@.service",
];

const SYSTEMD_CHECKS: &str = include_str!("systemd-checks.sh");

const GUEST_UNIT: &str = "[Unit]
Description=cargo xtask vm: what the payload disk runs
After=local-fs.target payload.mount
RequiresMountsFor=/payload

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/xtask-vm-run
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console

[Install]
WantedBy=multi-user.target
";
