//! Asking the kernel which programs are attached to a cgroup (BPF_PROG_QUERY), without
//! trusting the daemon's own account of it: the integration tests check what a
//! daemon attached and detached, the soak that nothing stays after the run.

use std::{fs::File, io, os::fd::AsRawFd as _, path::Path};

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
    (29, "getpeername4"),
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
    const BPF_PROG_QUERY: libc::c_long = 16;
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let cgroup = File::open(cgroup)?;
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix for BPF_PROG_QUERY, and
    // prog_ids is null, so the kernel only writes prog_cnt.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.prog_cnt)
}
