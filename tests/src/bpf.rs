//! Asking the kernel which programs are attached to a cgroup (BPF_PROG_QUERY), without
//! trusting the daemon's own account of it.

use std::{fs::File, io, os::fd::AsRawFd as _, path::Path};

pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;

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
