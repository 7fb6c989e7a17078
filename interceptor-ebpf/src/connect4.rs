use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::redirect::{redirect_ipv4, set_user_ipv4, user_ipv4};

/// connect4 must return 1: 0 would fail the application's connect() with EPERM.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_ipv4(ctx.sock_addr);
    if let Some(proxy) = redirect_ipv4(&ctx, addr, port) {
        set_user_ipv4(ctx.sock_addr, (proxy.addr, proxy.port));
    }
    ALLOW
}
