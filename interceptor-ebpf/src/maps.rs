use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use interceptor_ebpf::{
    Address, InterceptRule, KernelEvent, ORIG_DST_CAPACITY, OriginalDst, PORT_WORDS,
    REDIRECTS_RING_BYTES, SERVICE_ADDRS_CAPACITY, SERVICE_PORTS_CAPACITY, ServiceAddrKey,
    SocketAddress,
};

#[map]
pub static SERVICE_ADDRS: LpmTrie<ServiceAddrKey, InterceptRule> =
    LpmTrie::with_max_entries(SERVICE_ADDRS_CAPACITY, 0);

/// See [`interceptor_ebpf::PORT_FILTER_MAP`].
#[map]
pub static PORT_FILTER: Array<u64> = Array::with_max_entries(2 * PORT_WORDS, 0);

/// Keyed by the destination port in host byte order. Allocated per entry, as the
/// trie is: a preallocated table would hold 5 MiB for the few ports ever used.
#[map]
pub static SERVICE_PORTS: HashMap<u16, InterceptRule> =
    HashMap::with_max_entries(SERVICE_PORTS_CAPACITY, BPF_F_NO_PREALLOC);

/// Each redirected socket's original destination, from connect4/6 for as long as the
/// socket lives: sockops hands it to the proxy, getpeername shows it to the application.
/// The kernel frees it with the socket, so it needs no sweeping, no state callbacks and
/// no capacity sized in advance.
#[btf_map]
pub static ORIGINAL_DST: SkStorage<OriginalDst> = SkStorage::new();

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

/// Set by the loader. Volatile reads keep LLVM from folding the zero initialisers.
#[unsafe(no_mangle)]
static PROXY_ADDR4: [u8; 4] = [0; 4];
#[unsafe(no_mangle)]
static PROXY_PORT4: [u8; 2] = [0; 2];
#[unsafe(no_mangle)]
static PROXY_ADDR6: Address = [0; 4];
#[unsafe(no_mangle)]
static PROXY_PORT6: [u8; 2] = [0; 2];
#[unsafe(no_mangle)]
static BYPASS_MARK: u32 = 0;
#[unsafe(no_mangle)]
static PROXY_NETNS_COOKIE: u64 = 0;
#[unsafe(no_mangle)]
static CONTAINER_PROXY_ADDR4: [u8; 4] = [0; 4];
#[unsafe(no_mangle)]
static CONTAINER_PROXY_PORT4: [u8; 2] = [0; 2];
#[unsafe(no_mangle)]
static CONTAINER_PROXY_ADDR6: Address = [0; 4];
#[unsafe(no_mangle)]
static CONTAINER_PROXY_PORT6: [u8; 2] = [0; 2];

/// The proxy's IPv4 listener: address and port, network byte order.
#[inline(always)]
pub fn proxy_ipv4() -> ([u8; 4], [u8; 2]) {
    unsafe {
        (
            core::ptr::read_volatile(&PROXY_ADDR4),
            core::ptr::read_volatile(&PROXY_PORT4),
        )
    }
}

/// The proxy's IPv6 listener; port zero if it has none.
#[inline(always)]
pub fn proxy_ipv6() -> (Address, [u8; 2]) {
    ipv6_global(&PROXY_ADDR6, &PROXY_PORT6)
}

/// Where native IPv6 connects from other network namespaces go; port zero for nowhere.
#[inline(always)]
pub fn container_proxy_ipv6() -> (Address, [u8; 2]) {
    ipv6_global(&CONTAINER_PROXY_ADDR6, &CONTAINER_PROXY_PORT6)
}

#[inline(always)]
fn ipv6_global(addr: &Address, port: &[u8; 2]) -> (Address, [u8; 2]) {
    let addr = [0, 1, 2, 3].map(|word| unsafe { core::ptr::read_volatile(&addr[word]) });
    (addr, unsafe { core::ptr::read_volatile(port) })
}

#[inline(always)]
pub fn bypass_mark() -> u32 {
    unsafe { core::ptr::read_volatile(&BYPASS_MARK) }
}

/// Where IPv4 connects from other network namespaces go, if anywhere.
#[inline(always)]
pub fn container_proxy_ipv4() -> Option<([u8; 4], [u8; 2])> {
    let port = unsafe { core::ptr::read_volatile(&CONTAINER_PROXY_PORT4) };
    if port == [0, 0] {
        return None;
    }
    Some((
        unsafe { core::ptr::read_volatile(&CONTAINER_PROXY_ADDR4) },
        port,
    ))
}

#[inline(always)]
pub fn proxy_netns_cookie() -> u64 {
    unsafe { core::ptr::read_volatile(&PROXY_NETNS_COOKIE) }
}
