//! The decision connect4 and connect6 share: is this connect to an intercepted
//! IPv4 destination, and if so, record where it was going.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use core::ptr::{read_volatile, write_volatile};
use interceptor_ebpf::{OriginalDst, SERVICE_ADDR_LOOKUP_PREFIX, ServiceAddrKey};

use crate::maps::{
    ORIG_BY_COOKIE, SERVICE_ADDRS, SERVICE_PORTS, bypass_mark, proxy_addr, proxy_port,
};

const IPPROTO_TCP: u32 = 6;

/// Where connect4/connect6 should send the socket instead: the proxy's address and
/// port, both in network byte order.
pub struct Redirect {
    pub addr: [u8; 4],
    pub port: [u8; 2],
}

/// `None` leaves the connect alone. `Some` means the original destination is recorded
/// under the socket's cookie and the caller must rewrite the destination.
#[inline(always)]
pub fn redirect_ipv4(
    ctx: &SockAddrContext,
    dst_addr: [u8; 4],
    dst_port: [u8; 2],
) -> Option<Redirect> {
    let sock_addr = ctx.sock_addr;
    // Each context field is read on its own: LLVM would otherwise merge neighbouring
    // reads into one wide load, which the verifier rejects for this context.
    let protocol = unsafe { read_volatile(&(*sock_addr).protocol) };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let sk = unsafe { (*sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    let mark = unsafe { read_volatile(&(*sk).mark) };
    if mark != 0 && mark == bypass_mark() {
        return None;
    }

    let proxy = Redirect {
        addr: proxy_addr(),
        port: proxy_port(),
    };
    if dst_addr == proxy.addr && dst_port == proxy.port {
        return None;
    }

    let key = Key::new(
        SERVICE_ADDR_LOOKUP_PREFIX,
        ServiceAddrKey {
            port: dst_port,
            addr: dst_addr,
        },
    );
    let intercepted = SERVICE_ADDRS.get(&key).is_some()
        || unsafe { SERVICE_PORTS.get(&u16::from_be_bytes(dst_port)) }.is_some();
    if !intercepted {
        return None;
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst {
        addr: dst_addr,
        port: dst_port,
        _pad: [0; 2],
        redirected_at_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Without a record the proxy would refuse the connection, so fail open instead.
    ORIG_BY_COOKIE.insert(&cookie, &original, 0).ok()?;
    Some(proxy)
}

/// An IPv4 socket address as the hooks see it: both parts in network byte order.
pub type Ipv4Endpoint = ([u8; 4], [u8; 2]);

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

/// The IPv4 address and port of a connect6/getpeername6 context whose address is
/// IPv4-mapped (::ffff:a.b.c.d); `None` for native IPv6.
#[inline(always)]
pub fn user_mapped_ipv4(sock_addr: *mut bpf_sock_addr) -> Option<Ipv4Endpoint> {
    // One 32-bit read per word: the verifier rejects wider loads of user_ip6.
    let words = [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*sock_addr).user_ip6[word]) });
    Some((ipv4_in_mapped(words)?, user_port(sock_addr)))
}

/// Rewrites the IPv4 part of an IPv4-mapped context address, and the port.
#[inline(always)]
pub fn set_user_mapped_ipv4(sock_addr: *mut bpf_sock_addr, (addr, port): Ipv4Endpoint) {
    unsafe { write_volatile(&mut (*sock_addr).user_ip6[3], u32::from_ne_bytes(addr)) };
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

/// The IPv4 address inside an IPv4-mapped IPv6 address (::ffff:a.b.c.d), given as the
/// four 32-bit words of a BPF context, as they sit in memory.
#[inline(always)]
pub fn ipv4_in_mapped(words: [u32; 4]) -> Option<[u8; 4]> {
    const MARKER: [u8; 4] = [0, 0, 0xff, 0xff];
    (words[0] == 0 && words[1] == 0 && words[2].to_ne_bytes() == MARKER)
        .then(|| words[3].to_ne_bytes())
}
