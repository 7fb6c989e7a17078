//! The programs' side of `interceptor trace`: the settings entry connect4/6 read
//! before emitting anything, and the ring they emit into.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf};
use interceptor_common::{TraceEvent, TraceSettings};

use crate::trace::{Connect, Event, KernelRing, KernelSwitch, Line, Tracer, unix_now};

/// How often the ring is read while someone traces. The programs do not wake the
/// daemon per event (that would cost each traced connect more than the event
/// itself); the proxy's lines read it first too, so lines keep their order.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// The programs' trace maps, until the daemon hands them to its [`Tracer`].
pub struct TraceMaps {
    pub(super) settings: Array<MapData, TraceSettings>,
    pub(super) events: RingBuf<MapData>,
}

impl TraceMaps {
    /// Connects `tracer` to the programs: it switches their tracing as streams come
    /// and go, and reads their events while any is open.
    pub fn connect(self, tracer: &Arc<Tracer>) {
        let mut settings = self.settings;
        let switch: KernelSwitch = Box::new(move |wanted: &TraceSettings| {
            settings
                .set(0, wanted, 0)
                .context("writing the programs' trace settings")
        });
        let mut ring = self.events;
        let drain: KernelRing = Box::new(move |lines: &mut Vec<Line>| {
            // The events' monotonic times, as wall-clock times.
            let (unix, monotonic) = (unix_now(), monotonic_ns());
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<TraceEvent>() {
                    // SAFETY: connect4/6 write TraceEvents, which hold only integers.
                    let event = unsafe { item.as_ptr().cast::<TraceEvent>().read_unaligned() };
                    if let Some(connect) = Connect::of(&event) {
                        let ago = monotonic.saturating_sub(event.at_ns) as f64 / 1e9;
                        lines.push(Line {
                            time: unix - ago,
                            event: Event::Connect(connect),
                        });
                    }
                }
            }
        });
        tracer.set_kernel(switch, drain);
        let tracer = Arc::clone(tracer);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(DRAIN_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if tracer.active() {
                    tracer.drain();
                }
            }
        });
    }
}

/// CLOCK_MONOTONIC now, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |now| {
        now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
    })
}
