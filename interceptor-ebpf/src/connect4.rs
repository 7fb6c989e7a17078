use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use core::ptr::{read_volatile, write_volatile};

use crate::redirect::{port_bytes, redirect_ipv4, user_port_word};

/// connect4 must return 1: 0 would fail the application's connect() with EPERM.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;
    let dst_addr = unsafe { read_volatile(&(*sock_addr).user_ip4) }.to_ne_bytes();
    let dst_port = port_bytes(unsafe { read_volatile(&(*sock_addr).user_port) });
    if let Some(proxy) = redirect_ipv4(&ctx, dst_addr, dst_port) {
        unsafe {
            write_volatile(&mut (*sock_addr).user_ip4, u32::from_ne_bytes(proxy.addr));
            write_volatile(&mut (*sock_addr).user_port, user_port_word(proxy.port));
        }
    }
    ALLOW
}
