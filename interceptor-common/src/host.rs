//! Facts about the host that the daemon, the integration tests and the benchmark all
//! need, read one way.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::PathBuf,
};

use nix::libc;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The cgroup2 mount point, read from /proc/self/mounts. On a hybrid hierarchy this is
/// the unified mount (e.g. /sys/fs/cgroup/unified), not /sys/fs/cgroup.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    mount_point("cgroup2")
}

/// Where a BPF filesystem is mounted (usually /sys/fs/bpf), read from /proc/self/mounts.
pub fn bpf_fs_root() -> io::Result<PathBuf> {
    mount_point("bpf")
}

/// The first mount point of a filesystem of type `fstype`.
fn mount_point(fstype: &str) -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == fstype).then(|| PathBuf::from(target))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {fstype} filesystem is mounted (see /proc/self/mounts)"),
            )
        })
}

/// The open-files limit as (soft, hard).
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)
}

/// Sets the open-files limit; children inherit it. Raising the soft limit up to the
/// hard one needs no privilege; raising the hard one needs CAP_SYS_RESOURCE.
pub fn set_open_files_limit(soft: u64, hard: u64) -> io::Result<()> {
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(io::Error::from)
}

/// Raises the open-files limit (children inherit it) to `wanted`, or as near as this
/// process may, and returns the soft limit now in force. The kernel's `fs.nr_open`
/// caps it; above the hard limit needs CAP_SYS_RESOURCE, which a container's root
/// may lack, and then the hard limit is the ceiling.
pub fn raise_open_files_limit(wanted: u64) -> io::Result<u64> {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|raw| raw.trim().parse::<u64>().ok())
        .unwrap_or(1_048_576);
    let wanted = wanted.min(ceiling);
    let (_, hard) = open_files_limit()?;
    if set_open_files_limit(wanted, wanted.max(hard)).is_ok() {
        return Ok(wanted);
    }
    let soft = wanted.min(hard);
    set_open_files_limit(soft, hard)?;
    Ok(soft)
}

/// The descriptors this process holds now.
pub fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// `enum bpf_attach_type`'s getpeername hook for IPv4 sockets.
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

/// The ids of the programs attached to `cgroup` itself at `attach_type`
/// (BPF_PROG_QUERY), in the order they run. Types this kernel lacks answer EINVAL.
pub fn attached_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    /// The part of `union bpf_attr` BPF_PROG_QUERY reads and writes, zero-padded.
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
    // The kernel caps a cgroup at 64 programs per attach type.
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a zero-padded bpf_attr prefix for BPF_PROG_QUERY, and prog_ids
    // points at prog_cnt ids, all the kernel writes besides attr.
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
    let count = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..count].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_reads_back_what_was_set() {
        let (soft, hard) = open_files_limit().unwrap();
        set_open_files_limit(soft, hard).unwrap();
        assert_eq!(open_files_limit().unwrap(), (soft, hard));
        assert!(open_descriptors() >= 3);
        // Up to the hard limit needs no privilege.
        let raised = raise_open_files_limit(hard).unwrap();
        assert!(raised > 0 && raised <= hard, "{raised} of {hard}");
        assert_eq!(open_files_limit().unwrap().0, raised);
        set_open_files_limit(soft, hard).unwrap();
    }
}
