use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    maps::globals,
    redirect::{Redirect, proxies_for_ipv6_socket, redirect, set_user_ipv6, user_ipv6},
};

/// connect6 must return 1: 0 fails the application's connect() with EPERM.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

/// Native IPv6 connects go to the proxy's IPv6 listeners. Dual-stack sockets (the
/// default for Java, and for anything that opens AF_INET6 and connects to an IPv4
/// address) reach IPv4 destinations as ::ffff:a.b.c.d through this hook, never
/// connect4; they go to the IPv4 listeners, which ::ffff:<proxy> reaches.
#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let globals = globals();
    if crate::dns::capture6(&ctx, &globals) {
        return ALLOW;
    }
    let dst = user_ipv6(ctx.sock_addr);
    let proxies = proxies_for_ipv6_socket(&globals, dst.0);
    match redirect(&ctx, &globals, dst, proxies, false) {
        Some(Redirect::Proxy(to) | Redirect::Backend(to)) => set_user_ipv6(ctx.sock_addr, to),
        Some(Redirect::Refuse) => match crate::dns::refusal(dst) {
            Some(to) => set_user_ipv6(ctx.sock_addr, to),
            None => return REJECT,
        },
        None => {
            if let Some(to) = crate::dns::refuse(&ctx, &globals, dst) {
                set_user_ipv6(ctx.sock_addr, to);
            }
        }
    }
    ALLOW
}
