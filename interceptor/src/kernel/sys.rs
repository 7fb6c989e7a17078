//! The system calls this module makes beyond aya's API, typed as aya's `sys/bpf.rs`
//! types its own: Pod-bounded values, `io::Result`, `None` for "no such entry".

use std::{
    io,
    marker::PhantomData,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
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
    types: PhantomData<fn(K) -> V>,
}

impl<K: Pod, V: Pod> HashMapFd<K, V> {
    pub(super) fn of(map: &HashMap<MapData, K, V>) -> io::Result<Self> {
        Ok(Self {
            fd: map.map().fd().as_fd().try_clone_to_owned()?,
            types: PhantomData,
        })
    }

    /// Takes `key`'s value out of the map; `None` if it has none.
    pub(super) fn lookup_and_delete(&self, key: &K) -> io::Result<Option<V>> {
        // SAFETY: `of` took the descriptor from a map aya typed with K and V.
        unsafe { lookup_and_delete(self.fd.as_fd(), key) }
    }
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM: one system call, atomic, so two callers can never
/// both take one entry. aya wraps it only for queues and stacks.
///
/// # Safety
///
/// `map`'s key and value sizes must be those of `K` and `V`.
unsafe fn lookup_and_delete<K: Pod, V: Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    /// The part of `union bpf_attr` this command reads.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = MaybeUninit::<V>::uninit();
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: attr points at live key and value buffers of the map's sizes (the
    // caller's promise).
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            size_of::<MapElemAttr>(),
        )
    };
    if result == 0 {
        // SAFETY: the kernel filled the whole value on success, and V is Pod.
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
