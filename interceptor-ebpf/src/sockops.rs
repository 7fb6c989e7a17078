use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::read_volatile;
use interceptor_ebpf::{Address, RedirectRecord, SocketAddress, ipv4_mapped};

use crate::maps::{ORIG_BY_CLIENT, ORIG_BY_COOKIE, PEER_BY_COOKIE, REDIRECTS};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The proxy reads the ring when it accepts and never waits on it, so no wake-up.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// sock_ops programs return 1 for success, like the other cgroup programs.
const OK: u32 = 1;

#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => rekey_by_client_addr(&ctx),
        // Only redirected sockets ask for state callbacks (below).
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let _ = PEER_BY_COOKIE.remove(&cookie);
        }
        _ => {}
    }
    OK
}

/// Moves the record connect4 made from the socket cookie, which the proxy cannot see,
/// to the client's address, which is the peer address of the socket the proxy accepts:
/// into the ring buffer the proxy reads without a system call, or, if the proxy has
/// fallen that far behind, into the ORIG_BY_CLIENT map.
///
/// The record is not deleted when the client closes: a client that writes and closes
/// at once can reach TCP_CLOSE before the proxy has accepted, and deleting then would
/// lose its data. The proxy deletes each record when it accepts the connection, and
/// sweeps records that no connection claimed.
#[inline(always)]
fn rekey_by_client_addr(ctx: &SockOpsContext) {
    let Some(local_addr) = local_address(ctx) else {
        return;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(original) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    // local_port is in host byte order, unlike remote_port.
    let local_port = ctx.local_port() as u16;
    let client = SocketAddress {
        addr: local_addr,
        port: local_port.to_be_bytes(),
        _pad: [0; 2],
    };
    let record = RedirectRecord {
        client,
        _pad: [0; 4],
        original,
    };
    let handed_over = REDIRECTS
        .output::<RedirectRecord>(&record, BPF_RB_NO_WAKEUP)
        .is_ok()
        || ORIG_BY_CLIENT.insert(&client, &original, 0).is_ok();
    if handed_over {
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
    // getpeername4/6 answer with the original destination while the socket lives; the
    // state callback on close removes it again.
    if PEER_BY_COOKIE.insert(&cookie, &original, 0).is_ok() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// The socket's local address as the proxy sees its peer: IPv4-mapped for IPv4,
/// which is also how a dual-stack socket that connect6 sent to the IPv4 listener
/// holds it.
#[inline(always)]
fn local_address(ctx: &SockOpsContext) -> Option<Address> {
    match ctx.family() {
        AF_INET => Some(ipv4_mapped(ctx.local_ip4().to_ne_bytes())),
        AF_INET6 => {
            let ops = ctx.ops;
            // One 32-bit read per word: the verifier rejects wider context loads.
            Some([0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*ops).local_ip6[word]) }))
        }
        _ => None,
    }
}
