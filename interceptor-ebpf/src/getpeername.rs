use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::ptr::{read_volatile, write_volatile};
use interceptor_ebpf::OriginalDst;

use crate::{
    maps::{PEER_BY_COOKIE, proxy_addr, proxy_port},
    redirect::{ipv4_in_mapped, port_bytes, user_port_word},
};

/// getpeername programs must return 1, like the connect hooks.
const ALLOW: i32 = 1;

/// connect4 pointed the socket at the proxy; getpeername() shows the application the
/// destination it connected to instead, as a NAT-based redirect (Istio's iptables
/// sidecar) would.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;
    let peer_addr = unsafe { read_volatile(&(*sock_addr).user_ip4) }.to_ne_bytes();
    let peer_port = port_bytes(unsafe { read_volatile(&(*sock_addr).user_port) });
    if let Some(original) = original_if_proxy(&ctx, peer_addr, peer_port) {
        unsafe {
            write_volatile(
                &mut (*sock_addr).user_ip4,
                u32::from_ne_bytes(original.addr),
            );
            write_volatile(&mut (*sock_addr).user_port, user_port_word(original.port));
        }
    }
    ALLOW
}

/// The same for dual-stack sockets connect6 redirected (IPv4-mapped peers).
#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;
    // One 32-bit read per word: the verifier rejects wider loads of user_ip6.
    let words = [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*sock_addr).user_ip6[word]) });
    let Some(peer_addr) = ipv4_in_mapped(words) else {
        return ALLOW;
    };
    let peer_port = port_bytes(unsafe { read_volatile(&(*sock_addr).user_port) });
    if let Some(original) = original_if_proxy(&ctx, peer_addr, peer_port) {
        unsafe {
            write_volatile(
                &mut (*sock_addr).user_ip6[3],
                u32::from_ne_bytes(original.addr),
            );
            write_volatile(&mut (*sock_addr).user_port, user_port_word(original.port));
        }
    }
    ALLOW
}

#[inline(always)]
fn original_if_proxy(
    ctx: &SockAddrContext,
    peer_addr: [u8; 4],
    peer_port: [u8; 2],
) -> Option<OriginalDst> {
    if peer_addr != proxy_addr() || peer_port != proxy_port() {
        return None;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { PEER_BY_COOKIE.get(&cookie) }.copied()
}
