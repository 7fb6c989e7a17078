use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{SocketAddress, ipv4_in_mapped, ipv4_mapped};

use crate::{
    maps::{ORIGINAL_DST, globals},
    redirect::{
        proxies_for_ipv4, proxies_for_ipv6_socket, set_user_ipv4, set_user_ipv6, user_ipv4,
        user_ipv6,
    },
};

/// getpeername programs must return 1, like the connect hooks.
const ALLOW: i32 = 1;

/// connect4 pointed the socket at the proxy; getpeername() shows the application the
/// destination it connected to instead, as a NAT-based redirect (Istio's iptables
/// sidecar) would.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_ipv4(ctx.sock_addr);
    if proxies_for_ipv4(&globals()).contain((ipv4_mapped(addr), port))
        && let Some(original) = original_destination(&ctx)
        && let Some(addr) = ipv4_in_mapped(original.addr)
    {
        set_user_ipv4(ctx.sock_addr, (addr, original.port));
    }
    ALLOW
}

/// The same for sockets connect6 redirected, native IPv6 and dual-stack alike.
#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    let peer = user_ipv6(ctx.sock_addr);
    if proxies_for_ipv6_socket(&globals(), peer.0).contain(peer)
        && let Some(original) = original_destination(&ctx)
    {
        set_user_ipv6(ctx.sock_addr, (original.addr, original.port));
    }
    ALLOW
}

#[inline(always)]
fn original_destination(ctx: &SockAddrContext) -> Option<SocketAddress> {
    let stored = unsafe { ORIGINAL_DST.get_ptr_mut(ctx) };
    if stored.is_null() {
        return None;
    }
    Some(unsafe { (*stored).dst })
}
