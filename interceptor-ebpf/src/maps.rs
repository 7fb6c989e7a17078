use core::{
    mem::{self, align_of, size_of},
    ptr::{self, read_volatile},
};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use interceptor_common::{
    AUDIENCES_CAPACITY, AudienceKey, BACKENDS_CAPACITY, BackendSet, CLIENT_NAMESPACES_CAPACITY,
    Globals, InterceptRule, KERNEL_PATH_CLOSES_RING_BYTES, KernelEvent, KernelPathDst,
    ORIG_DST_CAPACITY, OriginalDst, PORT_WORDS, REDIRECTS_RING_BYTES, SERVICE_ADDRS_CAPACITY,
    SERVICE_PORTS_CAPACITY, ServiceAddrKey, SocketAddress,
};

#[map]
pub static SERVICE_ADDRS: LpmTrie<ServiceAddrKey, InterceptRule> =
    LpmTrie::with_max_entries(SERVICE_ADDRS_CAPACITY, 0);

/// See [`interceptor_common::PORT_FILTER_MAP`].
#[map]
pub static PORT_FILTER: Array<u64> = Array::with_max_entries(2 * PORT_WORDS, 0);

/// Keyed by the destination port in host byte order. Allocated per entry, as the
/// trie is: a preallocated table would hold 5 MiB for the few ports ever used.
#[map]
pub static SERVICE_PORTS: HashMap<u16, InterceptRule> =
    HashMap::with_max_entries(SERVICE_PORTS_CAPACITY, BPF_F_NO_PREALLOC);

/// See [`interceptor_common::CLIENT_NAMESPACES_MAP`]. Allocated per entry: a node
/// runs far fewer containers than the capacity allows.
#[map]
pub static CLIENT_NAMESPACES: HashMap<u64, u32> =
    HashMap::with_max_entries(CLIENT_NAMESPACES_CAPACITY, BPF_F_NO_PREALLOC);

/// See [`interceptor_common::AUDIENCES_MAP`]; the value is unused.
#[map]
pub static AUDIENCES: HashMap<AudienceKey, u8> =
    HashMap::with_max_entries(AUDIENCES_CAPACITY, BPF_F_NO_PREALLOC);

/// Socket storage: each redirected socket's original destination, from connect4/6 for
/// as long as the socket lives: sockops hands it to the proxy, getpeername shows it to
/// the application. The kernel frees it with the socket, so it needs no sweeping, no state callbacks and
/// no capacity sized in advance.
#[btf_map]
pub static ORIGINAL_DST: SkStorage<OriginalDst> = SkStorage::new();

/// Kernel-path backend sets (see [`interceptor_common::BACKENDS_MAP`]). Allocated per
/// entry: most configs have few kernel-path ports.
#[map]
pub static BACKENDS: HashMap<u32, BackendSet> =
    HashMap::with_max_entries(BACKENDS_CAPACITY, BPF_F_NO_PREALLOC);

/// Socket storage of kernel-path sockets: the destination the application asked for
/// and the backend it was sent to, for getpeername.
#[btf_map]
pub static KERNEL_PATH_DST: SkStorage<KernelPathDst> = SkStorage::new();

#[map]
pub static KERNEL_PATH_CLOSES: RingBuf = RingBuf::with_byte_size(KERNEL_PATH_CLOSES_RING_BYTES, 0);

/// The kernel-path storage map as the helpers take it.
#[inline(always)]
pub fn kernel_path_dst_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&KERNEL_PATH_DST).cast_mut().cast()
}

/// The storage map as the helpers take it, for program types aya's wrapper does not
/// cover (sock_ops).
#[inline(always)]
pub fn original_dst_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&ORIGINAL_DST).cast_mut().cast()
}

/// Where sockops leaves a record when [`REDIRECTS`] is full. Allocated per entry: it
/// is empty unless the proxy falls 32,768 connections behind, and a preallocated
/// table would hold 30 MiB on every node for that.
#[map]
pub static ORIG_BY_CLIENT: HashMap<SocketAddress, OriginalDst> =
    HashMap::with_max_entries(ORIG_DST_CAPACITY, BPF_F_NO_PREALLOC);

#[map]
pub static REDIRECTS: RingBuf = RingBuf::with_byte_size(REDIRECTS_RING_BYTES, 0);

#[map]
pub static KERNEL_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KernelEvent::COUNT, 0);

/// Per CPU, so a plain increment: the BPF target has no atomic read-modify-write in
/// Rust's core. A softirq that runs another program on the same CPU in the middle of
/// it can lose one count, which is rare and leaves the counter still showing that
/// the event happens.
#[inline(always)]
pub fn count(event: KernelEvent) {
    if let Some(counter) = KERNEL_EVENTS.get_ptr_mut(event as u32) {
        unsafe { *counter += 1 };
    }
}

/// Set by the loader (see [`interceptor_common::GLOBALS_SYMBOL`]).
#[unsafe(no_mangle)]
static GLOBALS: Globals = Globals::UNSET;

/// The loader's settings, read once per program run. The read is volatile, which keeps
/// LLVM from folding the zero initialiser into the code, and a word at a time, which
/// keeps it from loading each byte of the byte-array fields on its own.
#[inline(always)]
pub fn globals() -> Globals {
    const WORDS: usize = size_of::<Globals>() / 8;
    const {
        assert!(size_of::<Globals>() == WORDS * 8 && align_of::<Globals>() == 8);
    }
    // SAFETY: GLOBALS is 8-aligned and WORDS words long.
    let words = unsafe { read_volatile(ptr::from_ref(&GLOBALS).cast::<[u64; WORDS]>()) };
    // SAFETY: the same size, and Globals holds only integers, so any bits are valid.
    unsafe { mem::transmute::<[u64; WORDS], Globals>(words) }
}
