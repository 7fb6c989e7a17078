//! What the daemon reports about the kernel side: the programs' event counters and how
//! full the maps are.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use aya::maps::{MapData, PerCpuArray};
use interceptor_common::{
    KernelEvent, ORIG_BY_CLIENT_MAP, ORIG_DST_CAPACITY, SERVICE_ADDRS_CAPACITY, SERVICE_ADDRS_MAP,
    SERVICE_PORTS_CAPACITY, SERVICE_PORTS_MAP,
};

use super::records::OriginalDestinations;

/// The programs' per-CPU counters of what they could not do.
pub struct KernelEvents(Mutex<PerCpuArray<MapData, u64>>);

impl KernelEvents {
    pub(super) fn new(counters: PerCpuArray<MapData, u64>) -> Self {
        Self(Mutex::new(counters))
    }

    /// Each event's count so far, summed over the CPUs; an unreadable counter reads 0.
    pub fn read(&self) -> Vec<(KernelEvent, u64)> {
        let counters = self.0.lock().unwrap_or_else(|e| e.into_inner());
        KernelEvent::ALL
            .iter()
            .map(|&event| {
                let total = counters
                    .get(&(event as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (event, total)
            })
            .collect()
    }
}

/// Entries in the interception maps, kept by [`super::Kernel::sync`], which is the only
/// writer: counting them on every scrape would walk up to 65,536 keys each.
#[derive(Debug, Default)]
pub(super) struct InterceptCounts {
    addresses: AtomicUsize,
    ports: AtomicUsize,
}

impl InterceptCounts {
    pub(super) fn store(&self, addresses: usize, ports: usize) {
        self.addresses.store(addresses, Ordering::Relaxed);
        self.ports.store(ports, Ordering::Relaxed);
    }
}

/// How full one BPF map is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// Reads the occupancy of every map; cheap to clone, and keeps working after the
/// programs are detached.
#[derive(Clone)]
pub struct MapOccupancy {
    pub(super) intercept_counts: Arc<InterceptCounts>,
    pub(super) original_destinations: Arc<OriginalDestinations>,
    pub events: Arc<KernelEvents>,
}

impl MapOccupancy {
    /// The interception maps from the counts [`super::Kernel::sync`] keeps; the
    /// original destination maps by walking their keys, which are few in steady state
    /// (records live from connect to accept). May block for a walk of a full map:
    /// call it off the async runtime.
    pub fn read(&self) -> Vec<MapUsage> {
        let by_client = self.original_destinations.in_fallback_map();
        vec![
            MapUsage {
                name: SERVICE_ADDRS_MAP,
                entries: self.intercept_counts.addresses.load(Ordering::Relaxed),
                capacity: SERVICE_ADDRS_CAPACITY,
            },
            MapUsage {
                name: SERVICE_PORTS_MAP,
                entries: self.intercept_counts.ports.load(Ordering::Relaxed),
                capacity: SERVICE_PORTS_CAPACITY,
            },
            MapUsage {
                name: ORIG_BY_CLIENT_MAP,
                entries: by_client,
                capacity: ORIG_DST_CAPACITY,
            },
        ]
    }
}
