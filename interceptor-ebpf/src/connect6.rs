use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use core::ptr::{read_volatile, write_volatile};

use crate::redirect::{ipv4_in_mapped, port_bytes, redirect_ipv4, user_port_word};

/// connect6 must return 1: 0 would fail the application's connect() with EPERM.
const ALLOW: i32 = 1;

/// Dual-stack sockets (the default for Java, and for anything that opens AF_INET6 and
/// connects to an IPv4 address) reach IPv4 destinations as ::ffff:a.b.c.d through
/// connect6; connect4 never sees them. Those connects are intercepted like IPv4 ones:
/// the proxy listens on IPv4, and ::ffff:<proxy> reaches it from a dual-stack socket.
/// Native IPv6 destinations are left alone.
#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;
    // One 32-bit read per word: the verifier rejects wider loads of user_ip6.
    let words = [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*sock_addr).user_ip6[word]) });
    let Some(dst_addr) = ipv4_in_mapped(words) else {
        return ALLOW;
    };
    let dst_port = port_bytes(unsafe { read_volatile(&(*sock_addr).user_port) });
    if let Some(proxy) = redirect_ipv4(&ctx, dst_addr, dst_port) {
        unsafe {
            write_volatile(
                &mut (*sock_addr).user_ip6[3],
                u32::from_ne_bytes(proxy.addr),
            );
            write_volatile(&mut (*sock_addr).user_port, user_port_word(proxy.port));
        }
    }
    ALLOW
}
