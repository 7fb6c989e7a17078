use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{Verdict, ipv4_in_mapped, ipv4_mapped};

use crate::{
    maps::globals,
    redirect::{connect, proxies_for_ipv4, set_user_ipv4, user_ipv4},
};

/// connect4 must return 1: 0 fails the application's connect() with EPERM.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let globals = globals();
    let (addr, port) = user_ipv4(ctx.sock_addr);
    let dst = (ipv4_mapped(addr), port);
    let (verdict, to) = connect(&ctx, &globals, dst, proxies_for_ipv4(&globals), true);
    crate::trace::connect(dst, verdict, to);
    if to.1 != [0, 0] {
        // Every endpoint an AF_INET socket may be sent to is IPv4.
        if let Some(to_addr) = ipv4_in_mapped(to.0) {
            set_user_ipv4(ctx.sock_addr, (to_addr, to.1));
        }
    } else if verdict == Verdict::NoEndpoint {
        // No refusing port to send it to: fail it here, with EPERM.
        return REJECT;
    }
    ALLOW
}
