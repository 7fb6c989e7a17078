//! `cargo xtask vm`: the root integration tests on Debian's own kernels, each booted
//! in qemu (software emulation: the machines this runs on cannot run stock kernels
//! under KVM) from one cached debootstrap image.
//!
//! Layout under target/vm/: `rootfs/` (the debootstrap tree with every fetched
//! kernel's modules and initramfs), `base.img` (that tree as ext4, only ever booted
//! as a throwaway snapshot), `kernels/<suite>/` (the downloaded packages and the
//! apt state that fetched them), `payload/` + `payload.img` (the binaries under test,
//! rebuilt every run).

mod image;
mod qemu;
mod vagrant_box;

use std::path::Path;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use crate::{check, setup};

#[derive(Debug, Args)]
pub struct VmArgs {
    /// Which kernel to boot (default 6.1; with --systemd, none: the host's, in a
    /// container).
    #[arg(long, value_enum)]
    kernel: Option<KernelChoice>,
    /// An interactive root shell on the serial console instead of the tests
    /// (Ctrl-A X quits qemu).
    #[arg(long)]
    shell: bool,
    /// Instead of the tests: check deploy/systemd/interceptor.service under the
    /// image's systemd (start, reload, restart, stop, its hardening): with systemd-nspawn
    /// on the host's kernel, or with --kernel in the VM on that kernel.
    #[arg(long, conflicts_with_all = ["shell", "write_box"])]
    systemd: bool,
    /// Write target/vm/interceptor.box, a libvirt Vagrant box of the image booting
    /// the --kernel given (one), and stop.
    #[arg(long = "box")]
    write_box: bool,
    /// Arguments for the integration test binary, e.g. a filter such as `redirect::`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    test_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelChoice {
    #[value(name = "5.10")]
    K5_10,
    #[value(name = "6.1")]
    K6_1,
    #[value(name = "6.12")]
    K6_12,
    #[value(name = "7.x")]
    K7,
    All,
}

/// A Debian kernel line: the release that ships it as `linux-image-cloud-amd64`.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub label: &'static str,
    pub suite: &'static str,
}

pub const KERNELS: [Kernel; 4] = [
    Kernel {
        label: "5.10",
        suite: "bullseye",
    },
    Kernel {
        label: "6.1",
        suite: "bookworm",
    },
    Kernel {
        label: "6.12",
        suite: "trixie",
    },
    Kernel {
        label: "7.x",
        suite: "forky",
    },
];

impl KernelChoice {
    fn kernels(self) -> Vec<Kernel> {
        let label = match self {
            KernelChoice::All => return KERNELS.to_vec(),
            KernelChoice::K5_10 => "5.10",
            KernelChoice::K6_1 => "6.1",
            KernelChoice::K6_12 => "6.12",
            KernelChoice::K7 => "7.x",
        };
        KERNELS
            .iter()
            .copied()
            .filter(|k| k.label == label)
            .collect()
    }
}

pub fn run(root: &Path, args: VmArgs) -> Result<()> {
    setup::ensure_toolchain()?;
    image::ensure_host_packages()?;
    let vm_dir = root.join("target/vm");
    let kernels = args.kernel.unwrap_or(KernelChoice::K6_1).kernels();
    if (args.shell || args.write_box) && kernels.len() != 1 {
        bail!("--shell and --box take one kernel: name it with --kernel");
    }
    let mut image = image::Image::open(root, &vm_dir)?;
    if args.systemd && args.kernel.is_none() {
        // The container runs the tree itself, on the host's kernel.
        let payload = image::build_payload(root, &vm_dir, image::Run::SystemdChecks)?;
        let outcome = qemu::nspawn(&image, &payload)?;
        println!("xtask vm: systemd unit checks: {outcome}");
        if !outcome.passed() {
            bail!("the systemd unit checks failed");
        }
        return Ok(());
    }
    let mut installed = Vec::new();
    for kernel in &kernels {
        installed.push(image.ensure_kernel(*kernel)?);
    }
    if args.write_box {
        return vagrant_box::write(
            &image,
            &installed[0],
            &vm_dir,
            &vm_dir.join("interceptor.box"),
        );
    }
    image.ensure_disk()?;
    let run = if args.systemd {
        image::Run::SystemdChecks
    } else {
        image::Run::Tests(&args.test_args)
    };
    let payload = image::build_payload(root, &vm_dir, run)?;
    let mut failed = Vec::new();
    for boot in &installed {
        let outcome = qemu::boot(&image, boot, &payload, args.shell)?;
        println!(
            "xtask vm: kernel {} ({}): {outcome}",
            boot.label, boot.release
        );
        if !outcome.passed() {
            failed.push(boot.label);
        }
    }
    if !failed.is_empty() {
        bail!("the tests failed on kernel(s) {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo build` for one of the binaries the VM runs, with the toolchain's PATH.
fn cargo_build(args: &[&str]) -> Result<()> {
    check(crate::cargo().args(args))
}
