use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::redirect::{redirect_ipv4, set_user_mapped_ipv4, user_mapped_ipv4};

/// connect6 must return 1: 0 would fail the application's connect() with EPERM.
const ALLOW: i32 = 1;

/// Dual-stack sockets (the default for Java, and for anything that opens AF_INET6 and
/// connects to an IPv4 address) reach IPv4 destinations as ::ffff:a.b.c.d through
/// connect6; connect4 never sees them. Those connects are intercepted like IPv4 ones:
/// the proxy listens on IPv4, and ::ffff:<proxy> reaches it from a dual-stack socket.
/// Native IPv6 destinations are left alone.
#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let Some((addr, port)) = user_mapped_ipv4(ctx.sock_addr) else {
        return ALLOW;
    };
    if let Some(proxy) = redirect_ipv4(&ctx, addr, port) {
        set_user_mapped_ipv4(ctx.sock_addr, (proxy.addr, proxy.port));
    }
    ALLOW
}
