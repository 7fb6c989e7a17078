use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::bpf_get_socket_cookie, macros::sock_ops,
    programs::SockOpsContext,
};
use interceptor_ebpf::ClientAddr;

use crate::maps::{ORIG_BY_CLIENT, ORIG_BY_COOKIE};

const AF_INET: u32 = 2;
/// sock_ops programs return 1 for success, like the other cgroup programs.
const OK: u32 = 1;

#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        rekey_by_client_addr(&ctx);
    }
    OK
}

/// Moves the record connect4 made from the socket cookie, which the proxy cannot see,
/// to the client's address, which is the peer address of the socket the proxy accepts.
///
/// The record is not deleted when the client closes: a client that writes and closes
/// at once can reach TCP_CLOSE before the proxy has accepted, and deleting then would
/// lose its data. The proxy deletes each record when it accepts the connection, and
/// sweeps records that no connection claimed.
#[inline(always)]
fn rekey_by_client_addr(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(original) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let local_addr = ctx.local_ip4();
    // local_port is in host byte order, unlike remote_port.
    let local_port = ctx.local_port() as u16;
    let client = ClientAddr {
        addr: local_addr.to_ne_bytes(),
        port: local_port.to_be_bytes(),
        _pad: [0; 2],
    };
    if ORIG_BY_CLIENT.insert(&client, &original, 0).is_ok() {
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
}
