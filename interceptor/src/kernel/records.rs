//! The records of where redirected connections were going, as sockops hands them to
//! the proxy: through the ring buffer, or the fallback map when the ring is full.

use std::{collections::HashMap as StdHashMap, net::SocketAddr, sync::Mutex, time::Duration};

use aya::maps::{HashMap, MapData, RingBuf};
use interceptor_common::{ORIG_DST_CAPACITY, OriginalDst, RedirectRecord, SocketAddress};

use super::{KernelError, sys};

/// The records connect4 and sockops leave for the proxy.
pub struct OriginalDestinations {
    /// Records sockops handed over through the ring buffer, not yet claimed.
    handed_over: Mutex<HandedOver>,
    /// A private descriptor of the by-client map, where sockops leaves records when the
    /// ring is full; taking one costs one lock-free syscall.
    by_client_fd: sys::HashMapFd<SocketAddress, OriginalDst>,
    /// A typed handle for the sweeper, which is rare and may take a lock.
    by_client: Mutex<HashMap<MapData, SocketAddress, OriginalDst>>,
}

struct HandedOver {
    ring: RingBuf<MapData>,
    unclaimed: StdHashMap<SocketAddress, OriginalDst>,
}

impl HandedOver {
    /// Moves every record in the ring into `unclaimed`. A record is in the ring before
    /// its connection can be accepted: sockops writes it when the client's handshake
    /// completes, before the ACK that puts the connection in the accept queue.
    fn drain_ring(&mut self) {
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<RedirectRecord>() {
                continue;
            }
            // SAFETY: sockops wrote a whole RedirectRecord, plain integers and bytes;
            // the ring gives no alignment guarantee, hence the unaligned read.
            let record =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RedirectRecord>()) };
            // A newer record for the same client address replaces an unclaimed older
            // one: that connection is gone, or its address could not be reused.
            self.unclaimed.insert(record.client, record.original);
        }
    }
}

/// Where the proxy found a connection's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordSource {
    /// The ring buffer, read in the proxy's own memory.
    Ring,
    /// The fallback map, with a system call.
    Map,
}

impl OriginalDestinations {
    pub(super) fn new(
        by_client: HashMap<MapData, SocketAddress, OriginalDst>,
        ring: RingBuf<MapData>,
    ) -> Result<Self, KernelError> {
        Ok(Self {
            handed_over: Mutex::new(HandedOver {
                ring,
                unclaimed: StdHashMap::new(),
            }),
            by_client_fd: sys::HashMapFd::of(&by_client).map_err(KernelError::Dup)?,
            by_client: Mutex::new(by_client),
        })
    }

    /// Takes the original destination of the connection whose client end is `client`,
    /// so no other accept can claim it. `None` means the connection was not redirected.
    pub fn take(&self, client: SocketAddr) -> Option<(SocketAddr, RecordSource)> {
        let key = SocketAddress::of(client);
        let handed_over = {
            let mut handed_over = self.handed_over.lock().unwrap_or_else(|e| e.into_inner());
            handed_over.drain_ring();
            handed_over.unclaimed.remove(&key)
        };
        let (original, source) = match handed_over {
            Some(original) => (original, RecordSource::Ring),
            // A map the kernel cannot read counts as holding no record, as a missing
            // one does: the proxy refuses the connection either way.
            None => (
                self.by_client_fd.lookup_and_delete(&key).ok().flatten()?,
                RecordSource::Map,
            ),
        };
        Some((original.dst.socket_addr(), source))
    }

    /// Entries in the by-client map, capped at its capacity: a walk that races with
    /// deletions can restart from the first key.
    pub fn in_fallback_map(&self) -> usize {
        let by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        by_client.keys().take(ORIG_DST_CAPACITY as usize).count()
    }

    /// Deletes records older than `max_age`: connections that were redirected but
    /// never reached the proxy. Returns how many were removed.
    pub fn sweep(&self, max_age: Duration) -> usize {
        // The clock cannot fail; if it did, time zero would sweep nothing.
        let now = sys::monotonic_now().unwrap_or_default().as_nanos() as u64;
        let cutoff = now.saturating_sub(max_age.as_nanos() as u64);
        let unclaimed_removed = {
            let mut handed_over = self.handed_over.lock().unwrap_or_else(|e| e.into_inner());
            handed_over.drain_ring();
            let before = handed_over.unclaimed.len();
            handed_over
                .unclaimed
                .retain(|_, original| original.redirected_at_ns >= cutoff);
            before - handed_over.unclaimed.len()
        };
        let mut by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        let stale_clients: Vec<SocketAddress> = by_client
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, original)| original.redirected_at_ns < cutoff)
            .map(|(key, _)| key)
            .collect();
        unclaimed_removed
            + stale_clients
                .iter()
                .filter(|key| by_client.remove(key).is_ok())
                .count()
    }
}
