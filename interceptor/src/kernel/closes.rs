//! Close events of kernel-path connections: sockops reports each close with the
//! socket's byte counts, and the daemon logs it as the proxy logs the connections it
//! relays, counts it in the same metric families with `datapath="kernel"`, and
//! feeds the connect's outcome to the endpoint's outlier ejection.
//!
//! sockops reports no event when a connection opens, so a kernel-path connection is
//! counted as opened when it closes; a connect that never established counts as
//! opened and failed, as a proxied connection the proxy could not forward does.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use aya::maps::{MapData, RingBuf};
use interceptor_common::KernelPathClose;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use super::Kernel;
use crate::{
    copy::{Close, How, Side},
    metrics::{Datapath, FailureReason, Metrics, TrafficLabels, UNMATCHED},
    registry::{Lookup, Registry},
    trace::{Event, KernelClose, Tracer},
};

/// Logs and counts every close event sockops writes to `ring`, naming the service
/// the registry routes the original destination to.
pub async fn follow(
    ring: RingBuf<MapData>,
    registry: Arc<ArcSwap<Registry>>,
    metrics: Arc<Metrics>,
    kernel: Arc<Kernel>,
    tracer: Arc<Tracer>,
) {
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
                closed(&close, &registry.load(), &metrics, &kernel, &tracer);
            }
        }
        guard.clear_ready();
    }
}

fn closed(
    close: &KernelPathClose,
    registry: &Registry,
    metrics: &Metrics,
    kernel: &Kernel,
    tracer: &Tracer,
) {
    let record = &close.record;
    let original = record.original.socket_addr();
    let endpoint = record.backend.socket_addr();
    let route = match registry.lookup(original) {
        Lookup::Route(route) => Some(route),
        _ => None,
    };
    // The config may have changed since the connect: the proxy's name for that.
    let service = route
        .as_ref()
        .map_or_else(|| UNMATCHED.to_owned(), |route| route.service.name.clone());
    let established = record.established_at_ns != 0;
    if let Some(route) = &route {
        let port = route.service.ports[route.port].number;
        if let Err(error) = kernel.connect_outcome(&service, port, endpoint, established) {
            warn!(error = %crate::report::Chain(&error), "cannot update the kernel path's backend sets");
        }
    }
    metrics.connection_opened(Datapath::kernel);
    let duration = Duration::from_nanos(close.closed_at_ns.saturating_sub(record.connected_at_ns));
    let traced = |outcome, bytes_sent, bytes_received| {
        if tracer.active() {
            tracer.emit(Event::KernelClose(KernelClose {
                cgroup_id: record.cgroup_id,
                destination: original,
                endpoint,
                service_entry: service.clone(),
                outcome,
                bytes_sent,
                bytes_received,
            }));
        }
    };
    if !established {
        traced("upstream_connect", 0, 0);
        // sockops sees the close, not the connect's error: refused and timed out look
        // the same from there.
        metrics.connection_failed(Datapath::kernel, FailureReason::upstream_connect);
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
    let bytes_sent = close.bytes_acked.saturating_sub(sequence_flags_sent(close));
    let bytes_received = close
        .bytes_received
        .saturating_sub(u64::from(fin_received(close)));
    traced("closed", bytes_sent, bytes_received);
    metrics.connection_closed(Datapath::kernel, how_closed(close));
    let labels = TrafficLabels {
        service_entry: service.clone(),
        host: route
            .as_ref()
            .and_then(|route| route.service.hosts.first().cloned())
            .unwrap_or_else(|| UNMATCHED.to_owned()),
        datapath: Datapath::kernel,
    };
    metrics.transferred(&labels, bytes_sent, bytes_received);
    info!(
        service,
        original_dst = %original,
        endpoint = %endpoint,
        bytes_sent,
        bytes_received,
        duration_ms = duration.as_millis() as u64,
        datapath = "kernel",
        "connection closed"
    );
}

/// Which side ended the connection, and how, from the state its socket closed
/// from: the application's own socket sent the first FIN (client), received it
/// (upstream), or went straight from ESTABLISHED to CLOSE, which a reset does. A
/// reset from either side looks the same there; it is counted against the upstream,
/// as the application resetting its own connection is the rarer case.
fn how_closed(close: &KernelPathClose) -> Close {
    match close.old_state {
        TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING => Close {
            side: Side::Client,
            how: How::Fin,
        },
        TCP_CLOSE_WAIT | TCP_LAST_ACK => Close {
            side: Side::Upstream,
            how: How::Fin,
        },
        _ => Close {
            side: Side::Upstream,
            how: How::Reset,
        },
    }
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

#[cfg(test)]
mod tests {
    use interceptor_common::{KernelPathDst, SocketAddress};

    use super::*;

    fn closed_from(old_state: u32) -> Close {
        let close = KernelPathClose {
            record: KernelPathDst {
                original: SocketAddress::NONE,
                backend: SocketAddress::NONE,
                connected_at_ns: 1,
                established_at_ns: 2,
                cgroup_id: 1,
            },
            bytes_acked: 1,
            bytes_received: 0,
            closed_at_ns: 3,
            old_state,
            all_acked: 1,
        };
        how_closed(&close)
    }

    #[test]
    fn the_state_a_socket_closed_from_tells_who_ended_it_and_how() {
        const TCP_ESTABLISHED: u32 = 1;
        for (state, side, how) in [
            (TCP_FIN_WAIT2, Side::Client, How::Fin),
            (TCP_CLOSING, Side::Client, How::Fin),
            (TCP_LAST_ACK, Side::Upstream, How::Fin),
            (TCP_CLOSE_WAIT, Side::Upstream, How::Fin),
            (TCP_ESTABLISHED, Side::Upstream, How::Reset),
        ] {
            let close = closed_from(state);
            assert_eq!((close.side, close.how), (side, how), "state {state}");
        }
    }
}
