//! The system calls this module makes beyond aya's API, typed as aya's `sys/bpf.rs`
//! types its own: Pod-bounded values, `io::Result`, `None` for "no such entry".

use std::{
    io,
    marker::PhantomData,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};
use nix::{
    sys::socket::{AddressFamily, SockFlag, SockType, getsockopt, socket},
    time::{ClockId, clock_gettime},
};

/// A descriptor of its own for a hash map, whose key and value sizes aya checked
/// against `K` and `V` when it typed the map. Calls on it take no lock.
pub(super) struct HashMapFd<K, V> {
    fd: OwnedFd,
    /// Whether the kernel takes an entry out of a hash map in one call (Linux 5.14);
    /// cleared at the first answer that it does not.
    takes_in_one_call: AtomicBool,
    types: PhantomData<fn(K) -> V>,
}

impl<K: Pod, V: Pod> HashMapFd<K, V> {
    pub(super) fn of(map: &HashMap<MapData, K, V>) -> io::Result<Self> {
        Ok(Self {
            fd: map.map().fd().as_fd().try_clone_to_owned()?,
            takes_in_one_call: AtomicBool::new(true),
            types: PhantomData,
        })
    }

    /// Takes `key`'s value out of the map, so that no other caller can take it too;
    /// `None` if it has none.
    pub(super) fn lookup_and_delete(&self, key: &K) -> io::Result<Option<V>> {
        let fd = self.fd.as_fd();
        if self.takes_in_one_call.load(Ordering::Relaxed) {
            // SAFETY: `of` took the descriptor from a map aya typed with K and V.
            match unsafe { map_elem::<K, V>(fd, BPF_MAP_LOOKUP_AND_DELETE_ELEM, key) } {
                Err(error) if without_lookup_and_delete(&error) => {
                    self.takes_in_one_call.store(false, Ordering::Relaxed);
                }
                taken => return taken,
            }
        }
        // Before 5.14: a lookup, then a delete. The delete is atomic, so of two callers
        // only one gets the value.
        // SAFETY: as above.
        let Some(value) = (unsafe { map_elem::<K, V>(fd, BPF_MAP_LOOKUP_ELEM, key) })? else {
            return Ok(None);
        };
        // SAFETY: as above; a delete writes no value.
        let deleted = unsafe { map_elem::<K, V>(fd, BPF_MAP_DELETE_ELEM, key) }?;
        Ok(deleted.and(Some(value)))
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// One system call, atomic. aya wraps it only for queues and stacks.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Whether the kernel answered BPF_MAP_LOOKUP_AND_DELETE_ELEM on a hash map as one
/// that lacks it: before 5.14 it takes only queues and stacks, and says ENOTSUPP (524,
/// an errno of the kernel's own that leaks to user space).
fn without_lookup_and_delete(error: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(
        error.raw_os_error(),
        Some(ENOTSUPP | libc::EOPNOTSUPP | libc::EINVAL)
    )
}

/// One of the map element commands on `key`: the value for a lookup, `Some` of an
/// unread value for a delete. `None`: no such entry.
///
/// # Safety
///
/// `map`'s key and value sizes must be those of `K` and `V`.
unsafe fn map_elem<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    command: libc::c_long,
    key: &K,
) -> io::Result<Option<V>> {
    /// The part of `union bpf_attr` these commands read.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = MaybeUninit::<V>::zeroed();
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: if command == BPF_MAP_DELETE_ELEM {
            0
        } else {
            value.as_mut_ptr() as u64
        },
        flags: 0,
    };
    // SAFETY: attr points at live key and value buffers of the map's sizes (the
    // caller's promise).
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &attr as *const MapElemAttr,
            size_of::<MapElemAttr>(),
        )
    };
    if result == 0 {
        // SAFETY: the kernel filled the whole value on a lookup's success, a delete
        // left it zeroed, and V is Pod.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(error),
    }
}

/// SO_NETNS_COOKIE (Linux 5.14), which nix does not name: its `getsockopt_impl!` makes
/// the typed option.
#[derive(Clone, Copy, Debug)]
struct NetnsCookie;

nix::getsockopt_impl!(
    NetnsCookie,
    libc::SOL_SOCKET,
    libc::SO_NETNS_COOKIE,
    u64,
    nix::sys::socket::sockopt::GetStruct<u64>
);

/// The cookie the kernel gives the network namespace this process runs in, which
/// `bpf_get_netns_cookie` returns for sockets created in it.
pub(super) fn own_netns_cookie() -> io::Result<u64> {
    // Any socket will do; an unbound one needs no address in the namespace.
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    Ok(getsockopt(&socket, NetnsCookie)?)
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub(super) fn monotonic_now() -> io::Result<Duration> {
    Ok(clock_gettime(ClockId::CLOCK_MONOTONIC)?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_kernel_without_the_command_takes_the_two_call_path() {
        for lacking in [524, libc::EOPNOTSUPP, libc::EINVAL] {
            assert!(without_lookup_and_delete(&io::Error::from_raw_os_error(
                lacking
            )));
        }
        for other in [libc::EPERM, libc::EBADF, libc::ENOMEM] {
            assert!(!without_lookup_and_delete(&io::Error::from_raw_os_error(
                other
            )));
        }
    }
}
