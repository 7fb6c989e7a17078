//! The programs' side of `interceptor trace`: the settings entry connect4/6 read
//! before emitting anything, and the ring they emit into.

use std::sync::Arc;

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf};
use interceptor_common::{TraceEvent, TraceSettings};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::trace::{Connect, Event, KernelSwitch, Tracer};

/// The programs' trace maps, until the daemon hands them to its [`Tracer`].
pub struct TraceMaps {
    pub(super) settings: Array<MapData, TraceSettings>,
    pub(super) events: RingBuf<MapData>,
}

impl TraceMaps {
    /// Connects `tracer` to the programs: it switches their tracing as streams come
    /// and go, and gets their events.
    pub fn connect(self, tracer: &Arc<Tracer>) {
        let mut settings = self.settings;
        let switch: KernelSwitch = Box::new(move |wanted: &TraceSettings| {
            settings
                .set(0, wanted, 0)
                .context("writing the programs' trace settings")
        });
        tracer.set_kernel(switch);
        tokio::spawn(follow(self.events, Arc::clone(tracer)));
    }
}

/// Hands every event connect4/6 emit to `tracer`. They emit only while a stream is
/// open, so this wakes only then.
async fn follow(ring: RingBuf<MapData>, tracer: Arc<Tracer>) {
    // SAFETY: the ring owns its descriptor, which stays open and unreplaced for as
    // long as the AsyncFd owns the ring.
    let mut ring = match unsafe { AsyncFd::register(ring) } {
        Ok(ring) => ring,
        Err(error) => {
            warn!(%error, "cannot watch the programs' trace events");
            return;
        }
    };
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<TraceEvent>() {
                // SAFETY: connect4/6 write TraceEvents, which hold only integers.
                let event = unsafe { item.as_ptr().cast::<TraceEvent>().read_unaligned() };
                if let Some(connect) = Connect::of(&event) {
                    tracer.emit(Event::Connect(connect));
                }
            }
        }
        guard.clear_ready();
    }
}
