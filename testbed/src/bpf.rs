//! Asking the kernel which programs are attached to a cgroup (BPF_PROG_QUERY), without
//! trusting the daemon's own account of it: the integration tests check what a
//! daemon attached and detached, the soak that nothing stays after the run.

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Command,
};

pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// Every cgroup attach type, so that programs added later (DNS capture's UDP hooks)
/// are covered too.
pub const CGROUP_ATTACH_TYPES: &[(u32, &str)] = &[
    (0, "ingress"),
    (1, "egress"),
    (2, "sock_create"),
    (BPF_CGROUP_SOCK_OPS, "sock_ops"),
    (8, "inet4_bind"),
    (9, "inet6_bind"),
    (BPF_CGROUP_INET4_CONNECT, "connect4"),
    (BPF_CGROUP_INET6_CONNECT, "connect6"),
    (12, "inet4_post_bind"),
    (13, "inet6_post_bind"),
    (14, "udp4_sendmsg"),
    (15, "udp6_sendmsg"),
    (19, "udp4_recvmsg"),
    (20, "udp6_recvmsg"),
    (21, "getsockopt"),
    (22, "setsockopt"),
    (
        interceptor_common::host::BPF_CGROUP_INET4_GETPEERNAME,
        "getpeername4",
    ),
    (30, "getpeername6"),
    (31, "getsockname4"),
    (32, "getsockname6"),
];

/// The name and count of each attach type in [`CGROUP_ATTACH_TYPES`] that has
/// programs on `cgroup` itself. Types this kernel lacks answer EINVAL and count as
/// none.
pub fn every_attached(cgroup: &Path) -> Vec<(&'static str, u32)> {
    CGROUP_ATTACH_TYPES
        .iter()
        .filter_map(|&(attach_type, name)| {
            let count = attached_programs(cgroup, attach_type).ok()?;
            (count > 0).then_some((name, count))
        })
        .collect()
}

/// Number of programs attached to `cgroup` itself for `attach_type`.
pub fn attached_programs(cgroup: &Path, attach_type: u32) -> io::Result<u32> {
    let cgroup = File::open(cgroup)?;
    let ids = interceptor_common::host::attached_programs(cgroup.as_fd(), attach_type)?;
    Ok(ids.len() as u32)
}

/// A BPF filesystem of a test's or the soak's own, for the daemon's `--bpf-fs`:
/// mounted on a scratch directory, unmounted (and the directory removed) when dropped.
pub struct BpfFs {
    pub path: PathBuf,
    /// What the kernel puts in a fresh one (the preloaded `maps.debug`, `progs.debug`).
    fresh: Vec<String>,
}

impl BpfFs {
    pub fn mount(path: PathBuf) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .context("running mount")?;
        anyhow::ensure!(
            status.success(),
            "mount -t bpf bpf {}: {status}",
            path.display()
        );
        let fresh = entries(&path);
        Ok(Self { path, fresh })
    }

    /// What was pinned there since it was mounted, by name.
    pub fn pinned(&self) -> Vec<String> {
        let mut pinned = entries(&self.path);
        pinned.retain(|name| !self.fresh.contains(name));
        pinned
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // Lazily, so a daemon still starting cannot keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn entries(directory: &Path) -> Vec<String> {
    std::fs::read_dir(directory)
        .map(|entries| {
            entries
                .filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}
