//! The decision the connect hooks share: is this connect to an intercepted destination,
//! and if so, record where it was going. Also the context accessors they and the
//! getpeername hooks share.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use core::ptr::{read_volatile, write_volatile};
use interceptor_ebpf::{
    Address, OriginalDst, SERVICE_ADDR_LOOKUP_PREFIX, ServiceAddrKey, SocketAddress,
    ipv4_in_mapped, ipv4_mapped,
};

use crate::maps::{
    ORIG_BY_COOKIE, SERVICE_ADDRS, SERVICE_PORTS, bypass_mark, proxy_ipv4, proxy_ipv6,
    proxy_netns_cookie,
};

const IPPROTO_TCP: u32 = 6;

/// A socket address as the hooks see it: the address (IPv4-mapped for IPv4) and the
/// port in network byte order.
pub type Endpoint = (Address, [u8; 2]);

/// An IPv4 socket address, both parts in network byte order.
pub type Ipv4Endpoint = ([u8; 4], [u8; 2]);

/// Whether the connect of `ctx` to `dst` is intercepted. If so, the original
/// destination is recorded under the socket's cookie and the caller must rewrite the
/// destination to `proxy`.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, dst: Endpoint, proxy: Endpoint) -> bool {
    let sock_addr = ctx.sock_addr;
    // Each context field is read on its own: LLVM would otherwise merge neighbouring
    // reads into one wide load, which the verifier rejects for this context.
    let protocol = unsafe { read_volatile(&(*sock_addr).protocol) };
    if protocol != IPPROTO_TCP {
        return false;
    }
    let sk = unsafe { (*sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    let mark = unsafe { read_volatile(&(*sk).mark) };
    if mark != 0 && mark == bypass_mark() {
        return false;
    }
    if same_endpoint(dst, proxy) {
        return false;
    }
    // A container or pod in its own network namespace would be sent to its own
    // loopback, where no proxy listens: it goes direct instead.
    let proxy_netns = proxy_netns_cookie();
    if proxy_netns != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != proxy_netns {
        return false;
    }

    let (addr, port) = dst;
    let key = Key::new(
        SERVICE_ADDR_LOOKUP_PREFIX,
        ServiceAddrKey {
            port,
            _pad: [0; 2],
            addr,
        },
    );
    let intercepted = SERVICE_ADDRS.get(&key).is_some()
        || unsafe { SERVICE_PORTS.get(&u16::from_be_bytes(port)) }.is_some();
    if !intercepted {
        return false;
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst {
        dst: SocketAddress {
            addr,
            port,
            _pad: [0; 2],
        },
        _pad: [0; 4],
        redirected_at_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Without a record the proxy would refuse the connection, so fail open instead.
    ORIG_BY_COOKIE.insert(&cookie, &original, 0).is_ok()
}

/// Where an AF_INET6 socket reaching `addr` is sent instead: the IPv4 listener (as an
/// IPv4-mapped address) for a dual-stack socket reaching an IPv4 destination, the IPv6
/// listener for native IPv6. `None`: the proxy has no IPv6 listener.
#[inline(always)]
pub fn proxy_for_ipv6_socket(addr: Address) -> Option<Endpoint> {
    if ipv4_in_mapped(addr).is_some() {
        let (proxy_addr, proxy_port) = proxy_ipv4();
        Some((ipv4_mapped(proxy_addr), proxy_port))
    } else {
        proxy_ipv6()
    }
}

/// Word by word: a whole-array compare may become a library call BPF does not have.
#[inline(always)]
pub fn same_endpoint(a: Endpoint, b: Endpoint) -> bool {
    a.0[0] == b.0[0] && a.0[1] == b.0[1] && a.0[2] == b.0[2] && a.0[3] == b.0[3] && a.1 == b.1
}

/// The IPv4 address and port of a connect4/getpeername4 context.
#[inline(always)]
pub fn user_ipv4(sock_addr: *mut bpf_sock_addr) -> Ipv4Endpoint {
    // Each context field is read on its own: the verifier rejects merged loads.
    let addr = unsafe { read_volatile(&(*sock_addr).user_ip4) }.to_ne_bytes();
    (addr, user_port(sock_addr))
}

#[inline(always)]
pub fn set_user_ipv4(sock_addr: *mut bpf_sock_addr, (addr, port): Ipv4Endpoint) {
    unsafe { write_volatile(&mut (*sock_addr).user_ip4, u32::from_ne_bytes(addr)) };
    set_user_port(sock_addr, port);
}

/// The address (IPv6 or IPv4-mapped) and port of a connect6/getpeername6 context.
#[inline(always)]
pub fn user_ipv6(sock_addr: *mut bpf_sock_addr) -> Endpoint {
    // One 32-bit read per word: the verifier rejects wider loads of user_ip6.
    let addr = [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*sock_addr).user_ip6[word]) });
    (addr, user_port(sock_addr))
}

#[inline(always)]
pub fn set_user_ipv6(sock_addr: *mut bpf_sock_addr, (addr, port): Endpoint) {
    for (word, value) in addr.into_iter().enumerate() {
        unsafe { write_volatile(&mut (*sock_addr).user_ip6[word], value) };
    }
    set_user_port(sock_addr, port);
}

/// user_port holds the port in network byte order in its first two bytes in memory.
#[inline(always)]
fn user_port(sock_addr: *mut bpf_sock_addr) -> [u8; 2] {
    let word = unsafe { read_volatile(&(*sock_addr).user_port) }.to_ne_bytes();
    [word[0], word[1]]
}

#[inline(always)]
fn set_user_port(sock_addr: *mut bpf_sock_addr, port: [u8; 2]) {
    let word = u32::from_ne_bytes([port[0], port[1], 0, 0]);
    unsafe { write_volatile(&mut (*sock_addr).user_port, word) };
}
