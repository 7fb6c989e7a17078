use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{bpf_ktime_get_ns, generated::bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::{null_mut, read_volatile};
use interceptor_common::{
    Address, KernelEvent, KernelPathClose, KernelPathDst, OriginalDst, RedirectRecord,
    SocketAddress, ipv4_mapped,
};

use crate::{
    maps::{
        KERNEL_PATH_CLOSES, ORIG_BY_CLIENT, REDIRECTS, count, globals, kernel_path_dst_map,
        original_dst_map,
    },
    redirect::{Endpoint, proxies_for_ipv4, proxies_for_ipv6_socket, same_endpoint},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The proxy reads the ring when it accepts and never waits on it, so no wake-up.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// sock_ops programs return 1 for success, like the other cgroup programs.
const OK: u32 = 1;

const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            hand_over_by_client_addr(&ctx);
            if let Some(record) = kernel_path_record(&ctx) {
                unsafe { (*record).established_at_ns = bpf_ktime_get_ns() };
            }
        }
        // A kernel-path socket asks for its state changes, so its close is seen, also
        // a close before the handshake ends (refused, timed out).
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if kernel_path_record(&ctx).is_some() {
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => report_kernel_path_close(&ctx),
        _ => {}
    }
    OK
}

/// The kernel-path record of the socket, if it is still connected to the backend
/// connect4/6 chose for it.
#[inline(always)]
fn kernel_path_record(ctx: &SockOpsContext) -> Option<*mut KernelPathDst> {
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return None;
    }
    let stored = unsafe { bpf_sk_storage_get(kernel_path_dst_map(), sk.cast(), null_mut(), 0) }
        .cast::<KernelPathDst>();
    if stored.is_null() {
        return None;
    }
    let peer = remote_endpoint(ctx);
    let backend = unsafe { (*stored).backend };
    same_endpoint(peer, (backend.addr, backend.port)).then_some(stored)
}

/// Reports a kernel-path socket's close with its byte counts to the daemon. If the
/// ring is full the event is lost: the connection is long gone, so nothing waits on it.
#[inline(always)]
fn report_kernel_path_close(ctx: &SockOpsContext) {
    let Some(record) = kernel_path_record(ctx) else {
        return;
    };
    let close = KernelPathClose {
        record: unsafe { *record },
        bytes_acked: unsafe { read_volatile(&(*ctx.ops).bytes_acked) },
        bytes_received: unsafe { read_volatile(&(*ctx.ops).bytes_received) },
        closed_at_ns: unsafe { bpf_ktime_get_ns() },
        old_state: ctx.arg(0),
        all_acked: u32::from(
            unsafe { read_volatile(&(*ctx.ops).snd_una) }
                == unsafe { read_volatile(&(*ctx.ops).snd_nxt) },
        ),
    };
    let _ = KERNEL_PATH_CLOSES.output::<KernelPathClose>(&close, 0);
}

/// Hands the record connect4 left in the socket's storage, which the proxy cannot see,
/// over under the client's address, which is the peer address of the socket the proxy
/// accepts: into the ring buffer the proxy reads without a system call, or, if the
/// proxy has fallen that far behind, into the ORIG_BY_CLIENT map.
///
/// The storage stays for getpeername and goes with the socket. The handed-over record
/// outlives a client that writes and closes at once, which can reach TCP_CLOSE before
/// the proxy has accepted; the proxy deletes each record when it accepts the
/// connection, and sweeps records that no connection claimed.
#[inline(always)]
fn hand_over_by_client_addr(ctx: &SockOpsContext) {
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return;
    }
    let stored = unsafe { bpf_sk_storage_get(original_dst_map(), sk.cast(), null_mut(), 0) }
        .cast::<OriginalDst>();
    if stored.is_null() {
        return;
    }
    // Read before the addresses, not between them and the second look at the family:
    // there, it would keep LLVM from threading each family's branch into its own
    // proxies, and LLVM would merge the two families' last address reads into one read
    // at a computed context offset, which the verifier rejects.
    let globals = globals();
    let Some((local_addr, peer)) = addresses(ctx) else {
        return;
    };
    // A socket whose redirected connect failed may connect again somewhere nothing
    // intercepts; its storage then describes a connection that never reached a proxy.
    let proxies = match ctx.family() {
        AF_INET => proxies_for_ipv4(&globals),
        _ => proxies_for_ipv6_socket(&globals, peer.0),
    };
    if !proxies.contain(peer) {
        return;
    }
    let original = unsafe { *stored };
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
    if REDIRECTS
        .output::<RedirectRecord>(&record, BPF_RB_NO_WAKEUP)
        .is_err()
        && ORIG_BY_CLIENT.insert(&client, &original, 0).is_err()
    {
        count(KernelEvent::RecordLost);
    }
}

/// The socket's local address as the proxy sees its peer (IPv4-mapped for IPv4, which
/// is also how a dual-stack socket that connect6 sent to the IPv4 listener holds it),
/// and the endpoint it connected to.
#[inline(always)]
fn addresses(ctx: &SockOpsContext) -> Option<(Address, Endpoint)> {
    let ops = ctx.ops;
    // remote_port holds the port as the socket stores it (network byte order) in its
    // upper 16 bits.
    let remote_port = ((unsafe { read_volatile(&(*ops).remote_port) } >> 16) as u16).to_ne_bytes();
    match ctx.family() {
        AF_INET => {
            let local = unsafe { read_volatile(&(*ops).local_ip4) }.to_ne_bytes();
            let remote = unsafe { read_volatile(&(*ops).remote_ip4) }.to_ne_bytes();
            Some((ipv4_mapped(local), (ipv4_mapped(remote), remote_port)))
        }
        AF_INET6 => {
            // One 32-bit read per word: the verifier rejects wider context loads.
            let local = [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*ops).local_ip6[word]) });
            let remote =
                [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*ops).remote_ip6[word]) });
            Some((local, (remote, remote_port)))
        }
        _ => None,
    }
}

/// The endpoint the socket connected to. Both families' fields are read, each on its
/// own and unconditionally, and the family only selects between the values: reads
/// under a branch per family are merged by LLVM into one read at a computed context
/// offset, which the verifier rejects.
#[inline(always)]
fn remote_endpoint(ctx: &SockOpsContext) -> Endpoint {
    let ops = ctx.ops;
    let remote_port = ((unsafe { read_volatile(&(*ops).remote_port) } >> 16) as u16).to_ne_bytes();
    let v4 = unsafe { read_volatile(&(*ops).remote_ip4) }.to_ne_bytes();
    let v6 = [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*ops).remote_ip6[word]) });
    let addr = if ctx.family() == AF_INET {
        ipv4_mapped(v4)
    } else {
        v6
    };
    (addr, remote_port)
}
