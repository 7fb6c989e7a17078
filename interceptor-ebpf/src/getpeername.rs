use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    maps::{PEER_BY_COOKIE, proxy_addr, proxy_port},
    redirect::{Ipv4Endpoint, set_user_ipv4, set_user_mapped_ipv4, user_ipv4, user_mapped_ipv4},
};

/// getpeername programs must return 1, like the connect hooks.
const ALLOW: i32 = 1;

/// connect4 pointed the socket at the proxy; getpeername() shows the application the
/// destination it connected to instead, as a NAT-based redirect (Istio's iptables
/// sidecar) would.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_if_proxy(&ctx, user_ipv4(ctx.sock_addr)) {
        set_user_ipv4(ctx.sock_addr, original);
    }
    ALLOW
}

/// The same for dual-stack sockets connect6 redirected (IPv4-mapped peers).
#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(peer) = user_mapped_ipv4(ctx.sock_addr)
        && let Some(original) = original_if_proxy(&ctx, peer)
    {
        set_user_mapped_ipv4(ctx.sock_addr, original);
    }
    ALLOW
}

#[inline(always)]
fn original_if_proxy(ctx: &SockAddrContext, peer: Ipv4Endpoint) -> Option<Ipv4Endpoint> {
    if peer != (proxy_addr(), proxy_port()) {
        return None;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = unsafe { PEER_BY_COOKIE.get(&cookie) }?;
    Some((original.addr, original.port))
}
