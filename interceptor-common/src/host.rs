//! Facts about the host that the daemon, the integration tests and the benchmark all
//! need, read one way.

use std::{io, path::PathBuf};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The cgroup2 mount point, read from /proc/self/mounts. On a hybrid hierarchy this is
/// the unified mount (e.g. /sys/fs/cgroup/unified), not /sys/fs/cgroup.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 filesystem is mounted (see /proc/self/mounts)",
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
