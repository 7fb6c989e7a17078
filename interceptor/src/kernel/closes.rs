//! Close events of kernel-path connections: sockops reports each close with the
//! socket's byte counts, and the daemon logs it as the proxy logs the connections it
//! relays, with `datapath=kernel`.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use aya::maps::{MapData, RingBuf};
use interceptor_common::KernelPathClose;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::registry::{Lookup, Registry};

/// Logs every close event sockops writes to `ring`, naming the service the registry
/// routes the original destination to.
pub async fn follow(ring: RingBuf<MapData>, registry: Arc<ArcSwap<Registry>>) {
    // SAFETY: the ring owns its descriptor, which stays open and unreplaced for as
    // long as the AsyncFd owns the ring.
    let mut ring = match unsafe { AsyncFd::register(ring) } {
        Ok(ring) => ring,
        Err(error) => {
            warn!(%error, "cannot watch the kernel path's close events");
            return;
        }
    };
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<KernelPathClose>() {
                // SAFETY: sockops writes KernelPathClose records, which hold only
                // integers; the ring's items are 8-aligned but read unaligned anyway.
                let close = unsafe { item.as_ptr().cast::<KernelPathClose>().read_unaligned() };
                log(&close, &registry.load());
            }
        }
        guard.clear_ready();
    }
}

fn log(close: &KernelPathClose, registry: &Registry) {
    let record = &close.record;
    let original = record.original.socket_addr();
    let endpoint = record.backend.socket_addr();
    let service = match registry.lookup(original) {
        Lookup::Route(route) => route.service.name.clone(),
        _ => "none".to_owned(),
    };
    let duration = Duration::from_nanos(close.closed_at_ns.saturating_sub(record.connected_at_ns));
    if record.established_at_ns == 0 {
        warn!(
            service,
            original_dst = %original,
            endpoint = %endpoint,
            duration_ms = duration.as_millis() as u64,
            datapath = "kernel",
            "upstream connect failed"
        );
        return;
    }
    info!(
        service,
        original_dst = %original,
        endpoint = %endpoint,
        bytes_sent = close.bytes_acked.saturating_sub(sequence_flags_sent(close)),
        bytes_received = close.bytes_received.saturating_sub(u64::from(fin_received(close))),
        duration_ms = duration.as_millis() as u64,
        datapath = "kernel",
        "connection closed"
    );
}

const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

/// How many of `bytes_acked` are the SYN and the socket's own FIN, which count one
/// each in sequence space: the SYN always (the connection established), the FIN once
/// it was sent (a state after FIN_WAIT1 or LAST_ACK) and acknowledged.
fn sequence_flags_sent(close: &KernelPathClose) -> u64 {
    let fin_sent = matches!(
        close.old_state,
        TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK
    );
    1 + u64::from(fin_sent && close.all_acked != 0)
}

/// Whether `bytes_received` counts the peer's FIN: the socket closed from a state
/// entered by receiving it. FIN_WAIT2 closes when the peer's FIN moves the socket to
/// TIME_WAIT, and also when FIN_WAIT2 times out without it, which this counts as one
/// byte too many.
fn fin_received(close: &KernelPathClose) -> bool {
    matches!(
        close.old_state,
        TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_FIN_WAIT2
    )
}
