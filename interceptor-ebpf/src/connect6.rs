use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::redirect::{proxies_for_ipv6_socket, redirect, set_user_ipv6, user_ipv6};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let dst = user_ipv6(ctx.sock_addr);
    if let Some(proxy) = redirect(&ctx, dst, proxies_for_ipv6_socket(dst.0)) {
        set_user_ipv6(ctx.sock_addr, proxy);
    }
    ALLOW
}
