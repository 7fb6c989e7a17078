use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{SocketAddress, ipv4_in_mapped, ipv4_mapped};

use crate::{
    dns,
    maps::{KERNEL_PATH_DST, ORIGINAL_DST, globals},
    redirect::{
        Endpoint, proxies_for_ipv4, proxies_for_ipv6_socket, same_endpoint, set_user_ipv4,
        set_user_ipv6, user_ipv4, user_ipv6,
    },
};

/// getpeername programs must return 1, like the connect hooks.
const ALLOW: i32 = 1;

/// connect4 pointed the socket at the proxy or straight at a backend; getpeername()
/// shows the application the destination it connected to instead, as a NAT-based
/// redirect (Istio's iptables sidecar) would. A kernel-path socket's storage holds the
/// backend too, and only a socket still connected to it shows the original destination
/// (a socket may connect again after a failed connect). A TCP DNS query captured at
/// connect shows the nameserver it asked, as its replies do.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_ipv4(ctx.sock_addr);
    let peer = (ipv4_mapped(addr), port);
    let original = if proxies_for_ipv4(&globals()).contain(peer) {
        original_destination(&ctx)
    } else if let Some(nameserver) = dns::nameserver(&ctx, peer) {
        Some(socket_address(nameserver))
    } else {
        kernel_path_destination(&ctx, peer)
    };
    if let Some(original) = original
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
    let original = if proxies_for_ipv6_socket(&globals(), peer.0).contain(peer) {
        original_destination(&ctx)
    } else if let Some(nameserver) = dns::nameserver(&ctx, peer) {
        Some(socket_address(nameserver))
    } else {
        kernel_path_destination(&ctx, peer)
    };
    if let Some(original) = original {
        set_user_ipv6(ctx.sock_addr, (original.addr, original.port));
    }
    ALLOW
}

#[inline(always)]
fn socket_address((addr, port): Endpoint) -> SocketAddress {
    SocketAddress {
        addr,
        port,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn original_destination(ctx: &SockAddrContext) -> Option<SocketAddress> {
    let stored = unsafe { ORIGINAL_DST.get_ptr_mut(ctx) };
    if stored.is_null() {
        return None;
    }
    Some(unsafe { (*stored).dst })
}

/// The destination a kernel-path socket connected to, if it is still connected to the
/// backend connect4/6 chose for it.
#[inline(always)]
fn kernel_path_destination(ctx: &SockAddrContext, peer: Endpoint) -> Option<SocketAddress> {
    let stored = unsafe { KERNEL_PATH_DST.get_ptr_mut(ctx) };
    if stored.is_null() {
        return None;
    }
    let record = unsafe { *stored };
    same_endpoint(peer, (record.backend.addr, record.backend.port)).then_some(record.original)
}
