use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::Verdict;

use crate::{
    maps::globals,
    redirect::{connect, proxies_for_ipv6_socket, set_user_ipv6, user_ipv6},
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
    let dst = user_ipv6(ctx.sock_addr);
    let proxies = proxies_for_ipv6_socket(&globals, dst.0);
    let (verdict, to) = connect(&ctx, &globals, dst, proxies, false);
    crate::trace::connect(dst, verdict, to);
    if to.1 != [0, 0] {
        set_user_ipv6(ctx.sock_addr, to);
    } else if verdict == Verdict::NoEndpoint {
        return REJECT;
    }
    ALLOW
}
