//! Idempotent installation of what building and testing need: Debian packages, the
//! rust-src component, and bpf-linker built against LLVM 22.

use std::{
    env,
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::check;

const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
];
/// What the root integration tests run as real clients: `dig` (bind9-dnsutils),
/// `curl` and Python's resolver; glibc's `getent` is always there.
pub const TEST_PACKAGES: &[&str] = &["bind9-dnsutils", "curl", "python3"];
/// What `cargo xtask bench` runs besides the workspace's binaries: the peers it races
/// (HAProxy, nginx with its stream module) and `ip` for the sandbox.
pub const BENCH_PACKAGES: &[&str] = &["haproxy", "nginx", "libnginx-mod-stream", "iproute2"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure_toolchain() -> Result<()> {
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}

pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !debian_package_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    check(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )?;
    let still_missing: Vec<&str> = missing
        .into_iter()
        .filter(|package| !debian_package_installed(package))
        .collect();
    if !still_missing.is_empty() {
        bail!("apt-get did not install: {}", still_missing.join(" "));
    }
    Ok(())
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn ensure_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.starts_with("rust-src"))
    {
        return Ok(());
    }
    println!("xtask: installing the rust-src component");
    check(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn ensure_bpf_linker() -> Result<()> {
    if succeeds(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", path_with_cargo_bin()),
    ) {
        return Ok(());
    }
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
    // The crate's default feature wants LLVM 23, and /usr/bin/llvm-config may be an
    // older LLVM: point both bpf-linker's and llvm-sys's build at LLVM 22 explicitly.
    check(
        crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .stdin(Stdio::null()),
    )?;
    check(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", path_with_cargo_bin()),
    )
}

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin_dir()];
    if let Some(existing) = env::var_os("PATH") {
        paths.extend(env::split_paths(&existing));
    }
    env::join_paths(paths).unwrap_or_default()
}

/// Installs a cargo subcommand from crates.io unless `cargo <subcommand>` works.
pub fn ensure_cargo_tool(subcommand: &str, package: &str) -> Result<()> {
    if succeeds(crate::cargo().args([subcommand, "--version"])) {
        return Ok(());
    }
    println!("xtask: installing {package}");
    check(
        crate::cargo()
            .args(["install", "--locked", package])
            .stdin(Stdio::null()),
    )
}

/// Whether a probe command runs and exits 0; its output is not wanted.
fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
