//! Trace events of connect4/6 (see [`interceptor_common::TraceSettings`]).

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, RingBuf},
};
use core::ptr::read_volatile;
use interceptor_common::{
    KernelEvent, SocketAddress, TRACE_EVENTS_RING_BYTES, TraceEvent, TraceSettings, Verdict,
};

use crate::{maps::count, redirect::Endpoint};

/// The daemon reads the ring on its own schedule while tracing: a wakeup per event
/// would cost more than the event.
const BPF_RB_NO_WAKEUP: u64 = 1;

#[map]
static TRACE_SETTINGS: Array<TraceSettings> = Array::with_max_entries(1, 0);

#[map]
static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_EVENTS_RING_BYTES, 0);

/// Emits what a connect hook did with a connect to `dst`, if a tracer wants it. The
/// flag is read first and alone, so a connect nobody traces costs one array lookup.
#[inline(always)]
pub fn connect(dst: Endpoint, verdict: Verdict, to: Endpoint) {
    let Some(settings) = TRACE_SETTINGS.get_ptr(0) else {
        return;
    };
    // Volatile: the daemon rewrites the entry while programs run.
    if unsafe { read_volatile(&(*settings).enabled) } == 0 {
        return;
    }
    let settings = unsafe { read_volatile(settings) };
    let port = u16::from_ne_bytes(settings.port);
    if port != 0 && port != u16::from_ne_bytes(dst.1) {
        return;
    }
    // Word by word, as everywhere: no loop the verifier has to walk.
    let (mask, want) = (settings.dst_mask, settings.dst);
    if dst.0[0] & mask[0] != want[0]
        || dst.0[1] & mask[1] != want[1]
        || dst.0[2] & mask[2] != want[2]
        || dst.0[3] & mask[3] != want[3]
    {
        return;
    }
    if settings.cgroup_id != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(settings.cgroup_level as i32) }
            != settings.cgroup_id
    {
        return;
    }
    let event = TraceEvent {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        at_ns: unsafe { bpf_ktime_get_ns() },
        dst: SocketAddress {
            addr: dst.0,
            port: dst.1,
            _pad: [0; 2],
        },
        verdict: verdict as u32,
        to: SocketAddress {
            addr: to.0,
            port: to.1,
            _pad: [0; 2],
        },
        _pad: [0; 4],
    };
    // A full ring drops the event, counted: tracing must never hold a connect up.
    if TRACE_EVENTS
        .output::<TraceEvent>(&event, BPF_RB_NO_WAKEUP)
        .is_err()
    {
        count(KernelEvent::TraceLost);
    }
}
