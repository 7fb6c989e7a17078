use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use core::ptr::{read_volatile, write_volatile};
use interceptor_ebpf::{OriginalDst, SERVICE_ADDR_LOOKUP_PREFIX, ServiceAddrKey};

use crate::maps::{
    ORIG_BY_COOKIE, SERVICE_ADDRS, SERVICE_PORTS, bypass_mark, proxy_addr, proxy_port,
};

/// connect4 must return 1: 0 would fail the application's connect() with EPERM.
const ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    redirect_if_intercepted(&ctx);
    ALLOW
}

#[inline(always)]
fn redirect_if_intercepted(ctx: &SockAddrContext) {
    let sock_addr = ctx.sock_addr;
    // Each context field is read on its own: LLVM would otherwise merge neighbouring
    // reads into one wide load, which the verifier rejects for this context.
    let protocol = unsafe { read_volatile(&(*sock_addr).protocol) };
    if protocol != IPPROTO_TCP {
        return;
    }
    let sk = unsafe { (*sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let mark = unsafe { read_volatile(&(*sk).mark) };
    if mark != 0 && mark == bypass_mark() {
        return;
    }

    let dst_addr = unsafe { read_volatile(&(*sock_addr).user_ip4) }.to_ne_bytes();
    // user_port holds the port in network byte order in its first two bytes in memory.
    let dst_port_word = unsafe { read_volatile(&(*sock_addr).user_port) }.to_ne_bytes();
    let dst_port = [dst_port_word[0], dst_port_word[1]];

    let proxy_addr = proxy_addr();
    let proxy_port = proxy_port();
    if dst_addr == proxy_addr && dst_port == proxy_port {
        return;
    }

    let key = Key::new(
        SERVICE_ADDR_LOOKUP_PREFIX,
        ServiceAddrKey {
            port: dst_port,
            addr: dst_addr,
        },
    );
    let intercepted = SERVICE_ADDRS.get(&key).is_some()
        || unsafe { SERVICE_PORTS.get(&u16::from_be_bytes(dst_port)) }.is_some();
    if !intercepted {
        return;
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst {
        addr: dst_addr,
        port: dst_port,
        _pad: [0; 2],
        redirected_at_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Without a record the proxy would refuse the connection, so fail open instead.
    if ORIG_BY_COOKIE.insert(&cookie, &original, 0).is_err() {
        return;
    }
    unsafe {
        write_volatile(&mut (*sock_addr).user_ip4, u32::from_ne_bytes(proxy_addr));
        write_volatile(
            &mut (*sock_addr).user_port,
            u32::from_ne_bytes([proxy_port[0], proxy_port[1], 0, 0]),
        );
    }
}
