//! What a daemon takes over from the one it replaces on the same cgroup: the kernel
//! path's socket storage.
//!
//! A kernel-path socket outlives the daemon that sent it to its backend, and
//! getpeername shows it its VIP from that storage. A daemon whose programs had storage
//! of their own would leave every connection opened before it started showing its
//! backend once the old daemon detaches. So a new daemon finds the storage map of the
//! getpeername program already attached to its cgroup and loads its programs with that
//! map: all the daemons of a restart chain share one.
//!
//! aya's loader reuses an existing map only from a path on a BPF filesystem, so the
//! map is pinned there for the moment of the load, under a name of this process's,
//! and unpinned right after. With no BPF filesystem the daemon starts with storage of
//! its own and says so.

use std::{
    fs::File,
    io,
    mem::size_of,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo, MapType};
use interceptor_common::{
    KERNEL_PATH_DST_MAP, KernelPathDst,
    host::{BPF_CGROUP_INET4_GETPEERNAME, attached_programs},
};
use tracing::{debug, info, warn};

/// The previous daemon's storage map, pinned where the loader is told to find it.
/// Dropping it unpins the map; the programs loaded with it keep it alive.
pub(super) struct StagedStorage {
    path: PathBuf,
}

impl StagedStorage {
    /// The storage of the daemon attached to `cgroup` before this one, staged on
    /// `bpf_fs`; `None` if there is none to share or it cannot be shared (logged).
    pub(super) fn previous(cgroup: &File, bpf_fs: Option<&Path>) -> Option<Self> {
        let map = match previous_map(cgroup) {
            Ok(Some(map)) => map,
            Ok(None) => return None,
            Err(error) => {
                warn!(%error, "cannot look for the previous daemon's kernel-path storage; connections it opened will show their backend to getpeername once it stops");
                return None;
            }
        };
        let Some(bpf_fs) = bpf_fs else {
            info!(
                "no BPF filesystem is mounted: kernel-path connections the previous daemon opened will show their backend to getpeername once it stops (mount one at /sys/fs/bpf, or name one with --bpf-fs)"
            );
            return None;
        };
        let path = bpf_fs.join(format!("interceptor-{}-kernel-path", std::process::id()));
        // A file of a process with this pid that died in the same moment.
        let _ = std::fs::remove_file(&path);
        match map.pin(&path) {
            Ok(()) => {
                debug!(path = %path.display(), "sharing the previous daemon's kernel-path storage");
                Some(Self { path })
            }
            Err(error) => {
                warn!(%error, path = %path.display(), "cannot stage the previous daemon's kernel-path storage; connections it opened will show their backend to getpeername once it stops");
                None
            }
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedStorage {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            warn!(%error, path = %self.path.display(), "cannot unpin the staged kernel-path storage");
        }
    }
}

/// The kernel-path storage map of a getpeername program attached to `cgroup`: by name,
/// and with this build's type and sizes, so storage of an incompatible build is never
/// taken for ours.
fn previous_map(cgroup: &File) -> io::Result<Option<MapData>> {
    let attached = attached_programs(cgroup.as_fd(), BPF_CGROUP_INET4_GETPEERNAME)?;
    if attached.is_empty() {
        return Ok(None);
    }
    for program in aya::programs::loaded_programs() {
        let Ok(program) = program else { continue };
        if !attached.contains(&program.id()) {
            continue;
        }
        let Ok(Some(map_ids)) = program.map_ids() else {
            continue;
        };
        for id in map_ids {
            let Ok(info) = MapInfo::from_id(id) else {
                continue;
            };
            let ours = info.name_as_str() == Some(KERNEL_PATH_DST_MAP)
                && matches!(info.map_type(), Ok(MapType::SkStorage))
                && info.key_size() == size_of::<i32>() as u32
                && info.value_size() == size_of::<KernelPathDst>() as u32;
            if ours {
                return MapData::from_id(id).map(Some).map_err(io::Error::other);
            }
        }
    }
    Ok(None)
}
