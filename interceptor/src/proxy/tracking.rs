//! Live connections, for `/connections` and the connection metrics.
//!
//! Each accepted connection gets a [`ConnectionGuard`] that the proxy fills in as it
//! learns where the connection goes. The guard's record sits in a sharded table while
//! the connection lives; dropping the guard removes it and settles the metrics, so a
//! connection is counted exactly once as closed or failed, whatever path it left by.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    copy::{Close, Copied},
    kernel::RecordSource,
    metrics::{Datapath, FailureReason, Metrics, TrafficLabels, UNMATCHED},
    registry::Service,
    resolve::ResolveError,
    trace::{Event, Proxied, Tracer},
};

/// Enough shards that accepts on different cores rarely meet on one lock.
const SHARDS: usize = 32;

type Shard = Mutex<HashMap<u64, Arc<Record>>>;

/// The connections the proxy holds now.
pub struct ConnectionTable {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    /// Told how each connection went, while someone traces.
    tracer: Arc<Tracer>,
}

struct Record {
    id: u64,
    client: SocketAddr,
    accepted_at: Instant,
    accepted_at_unix: f64,
    // Per connection, so only its own task and a `/connections` reader ever meet here.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    original_destination: Option<SocketAddr>,
    service_entry: Option<String>,
    host: Option<String>,
    endpoint: Option<String>,
    failure: Option<FailureReason>,
    /// (client → upstream, upstream → client), known when the copy ends.
    bytes: Option<(u64, u64)>,
    /// How the copy ended.
    close: Option<Close>,
    /// The client socket's cgroup, for a trace stream narrowed to one.
    cgroup_id: Option<u64>,
}

/// One live connection as `/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub client: SocketAddr,
    pub original_destination: Option<SocketAddr>,
    pub service_entry: Option<String>,
    pub host: Option<String>,
    pub endpoint: Option<String>,
    /// `routing` until an upstream accepted, then `forwarding`.
    pub state: &'static str,
    /// Seconds since the epoch.
    pub accepted_at: f64,
    pub age_seconds: f64,
    /// Bytes from the client so far: filled in by the admin server from the
    /// kernel's count on the client socket (see `sockdiag`).
    pub sent_bytes: Option<u64>,
    /// Bytes to the client so far, acknowledged by it.
    pub received_bytes: Option<u64>,
}

impl ConnectionTable {
    pub fn new(metrics: Arc<Metrics>, tracer: Arc<Tracer>) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
            metrics,
            tracer,
        })
    }

    /// The metrics the table settles, for the accept loop's own counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether a trace stream needs each client's cgroup (see
    /// [`ConnectionGuard::set_client_cgroup`]).
    pub fn tracing_cgroups(&self) -> bool {
        self.tracer.wants_cgroups()
    }

    /// Starts tracking a connection the proxy just accepted.
    pub fn open(self: &Arc<Self>, client: SocketAddr) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let record = Arc::new(Record {
            id,
            client,
            accepted_at: Instant::now(),
            accepted_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |since| since.as_secs_f64()),
            state: Mutex::default(),
        });
        self.shard(id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&record));
        self.metrics.connection_opened(Datapath::proxy);
        self.metrics.connections_open.inc();
        ConnectionGuard {
            table: Arc::clone(self),
            record,
        }
    }

    /// Every live connection, oldest first.
    pub fn snapshot(&self) -> Vec<ConnectionInfo> {
        let records: Vec<Arc<Record>> = self
            .shards
            .iter()
            .flat_map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut connections: Vec<ConnectionInfo> = records.iter().map(|r| r.info()).collect();
        connections.sort_by_key(|connection| connection.id);
        connections
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[id as usize % self.shards.len()]
    }
}

impl Record {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&self) -> ConnectionInfo {
        let state = self.state();
        ConnectionInfo {
            id: self.id,
            client: self.client,
            original_destination: state.original_destination,
            service_entry: state.service_entry.clone(),
            host: state.host.clone(),
            endpoint: state.endpoint.clone(),
            state: if state.endpoint.is_some() {
                "forwarding"
            } else {
                "routing"
            },
            accepted_at: self.accepted_at_unix,
            age_seconds: self.accepted_at.elapsed().as_secs_f64(),
            sent_bytes: state.bytes.map(|(sent, _)| sent),
            received_bytes: state.bytes.map(|(_, received)| received),
        }
    }
}

impl Record {
    /// How the connection went, for `interceptor trace`.
    fn traced(&self, state: &State) -> Proxied {
        Proxied {
            client: Some(self.client),
            cgroup_id: state.cgroup_id,
            destination: state.original_destination,
            service_entry: state.service_entry.clone(),
            host: state.host.clone(),
            endpoint: state.endpoint.clone(),
            outcome: match (state.failure, state.close) {
                (Some(reason), _) => format!("{reason:?}"),
                (None, Some(_)) => "closed".to_owned(),
                // Dropped mid-copy: the daemon is exiting past its drain timeout.
                (None, None) => "abandoned".to_owned(),
            },
            close: state.close.map(|close| close.to_string()),
            bytes_sent: state.bytes.map(|(sent, _)| sent),
            bytes_received: state.bytes.map(|(_, received)| received),
        }
    }
}

/// The proxy's handle on one tracked connection. Dropping it ends the tracking.
pub struct ConnectionGuard {
    table: Arc<ConnectionTable>,
    record: Arc<Record>,
}

impl ConnectionGuard {
    pub fn set_original_destination(&self, original: SocketAddr, source: RecordSource) {
        self.table.metrics.redirect_record_taken(source);
        self.record.state().original_destination = Some(original);
    }

    /// The ServiceEntry the connection routed to; its first host names the traffic
    /// until [`ConnectionGuard::set_host`] says better.
    pub fn set_service(&self, service: &Service) {
        let mut state = self.record.state();
        state.service_entry = Some(service.name.clone());
        state.host = service.hosts.first().cloned();
    }

    /// The host SNI/Host routing matched. Pass the entry's own host (pattern), not the
    /// name the client sent: it becomes a metric label, and clients must not be able
    /// to create label values.
    pub fn set_host(&self, host: &str) {
        self.record.state().host = Some(host.to_owned());
    }

    /// The upstream accepted: the connection is forwarding from now on.
    pub fn connected(&self, endpoint: &impl std::fmt::Display) {
        self.table
            .metrics
            .connect_duration
            .observe(self.record.accepted_at.elapsed().as_secs_f64());
        self.record.state().endpoint = Some(endpoint.to_string());
    }

    /// The cgroup of the client's socket, learnt while it exists.
    pub fn set_client_cgroup(&self, cgroup_id: Option<u64>) {
        self.record.state().cgroup_id = cgroup_id;
    }

    /// The connection is being reset without having been forwarded.
    pub fn failed(&self, reason: impl Into<FailureReason>) {
        self.record.state().failure = Some(reason.into());
    }

    /// The copy ended; how, and its byte counts, go to the metrics when the guard
    /// drops.
    pub fn finished(&self, copied: &Copied) {
        let mut state = self.record.state();
        state.bytes = Some((copied.sent, copied.received));
        state.close = Some(copied.close);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let id = self.record.id;
        self.table
            .shard(id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let metrics = &self.table.metrics;
        metrics.connections_open.dec();
        let mut state = self.record.state();
        if self.table.tracer.active() {
            self.table
                .tracer
                .emit(Event::Proxy(self.record.traced(&state)));
        }
        if let Some(reason) = state.failure {
            metrics.connection_failed(Datapath::proxy, reason);
            return;
        }
        // Without a close, the task was dropped mid-copy: the daemon is exiting after
        // its drain timeout, and nobody scrapes it any more.
        if let Some(close) = state.close {
            metrics.connection_closed(Datapath::proxy, close);
        }
        if let Some((sent, received)) = state.bytes {
            // The record has left the table: only a `/connections` snapshot taken
            // just before could still read it, and would list this closing
            // connection without its names.
            let labels = TrafficLabels {
                service_entry: state
                    .service_entry
                    .take()
                    .unwrap_or_else(|| UNMATCHED.to_owned()),
                host: state.host.take().unwrap_or_else(|| UNMATCHED.to_owned()),
                datapath: Datapath::proxy,
            };
            metrics.transferred(&labels, sent, received);
        }
    }
}

impl From<&ResolveError> for FailureReason {
    fn from(error: &ResolveError) -> Self {
        match error {
            ResolveError::NoEndpoint => FailureReason::no_upstream,
            ResolveError::Dns(_) => FailureReason::dns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{How, Side};

    fn counter_line(metrics: &Metrics, prefix: &str) -> String {
        metrics
            .encode()
            .lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_default()
            .to_owned()
    }

    /// The closed connections over every side and how.
    fn closed_total(metrics: &Metrics) -> u64 {
        metrics
            .encode()
            .lines()
            .filter(|line| line.starts_with("interceptor_connections_closed_total{"))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    fn copied(sent: u64, received: u64, side: Side, how: How) -> Copied {
        Copied {
            sent,
            received,
            close: Close { side, how },
            error: None,
        }
    }

    #[test]
    fn a_connection_is_listed_while_open_and_counted_once_when_it_ends() {
        let metrics = Arc::new(Metrics::new());
        let table = ConnectionTable::new(Arc::clone(&metrics), Tracer::new(Default::default()));
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let guard = table.open(client);
        guard.set_original_destination("240.240.0.1:80".parse().unwrap(), RecordSource::Ring);
        guard.connected(&"198.18.0.1:80");
        let listed = table.snapshot();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].client, client);
        assert_eq!(listed[0].state, "forwarding");
        assert_eq!(listed[0].endpoint.as_deref(), Some("198.18.0.1:80"));
        guard.finished(&copied(10, 20, Side::Client, How::Fin));
        drop(guard);

        assert!(table.snapshot().is_empty());
        assert_eq!(
            counter_line(
                &metrics,
                "interceptor_connections_closed_total{side=\"client\",how=\"fin\",datapath=\"proxy\"}"
            ),
            "interceptor_connections_closed_total{side=\"client\",how=\"fin\",datapath=\"proxy\"} 1"
        );
        assert_eq!(closed_total(&metrics), 1);
        assert_eq!(
            counter_line(&metrics, "interceptor_sent_bytes_total"),
            "interceptor_sent_bytes_total{service_entry=\"unmatched\",host=\"unmatched\",datapath=\"proxy\"} 10"
        );
        assert_eq!(
            counter_line(&metrics, "interceptor_connections_open "),
            "interceptor_connections_open 0"
        );
    }

    #[test]
    fn a_failed_connection_is_not_counted_as_closed() {
        let metrics = Arc::new(Metrics::new());
        let table = ConnectionTable::new(Arc::clone(&metrics), Tracer::new(Default::default()));
        let guard = table.open("10.0.0.1:40001".parse().unwrap());
        guard.failed(&ResolveError::NoEndpoint);
        drop(guard);
        let text = metrics.encode();
        assert!(
            text.contains(
                "interceptor_connections_failed_total{reason=\"no_upstream\",datapath=\"proxy\"} 1"
            ),
            "{text}"
        );
        assert_eq!(closed_total(&metrics), 0, "{text}");
    }

    /// A reset ends the copy with its counts: what went through before it is counted.
    #[test]
    fn a_reset_is_counted_with_its_side_and_bytes() {
        let metrics = Arc::new(Metrics::new());
        let table = ConnectionTable::new(Arc::clone(&metrics), Tracer::new(Default::default()));
        let guard = table.open("10.0.0.1:40002".parse().unwrap());
        guard.connected(&"198.18.0.1:80");
        guard.finished(&copied(5, 100, Side::Upstream, How::Reset));
        drop(guard);
        assert_eq!(
            counter_line(
                &metrics,
                "interceptor_connections_closed_total{side=\"upstream\",how=\"reset\",datapath=\"proxy\"}"
            ),
            "interceptor_connections_closed_total{side=\"upstream\",how=\"reset\",datapath=\"proxy\"} 1"
        );
        assert_eq!(closed_total(&metrics), 1);
        assert_eq!(
            counter_line(&metrics, "interceptor_received_bytes_total"),
            "interceptor_received_bytes_total{service_entry=\"unmatched\",host=\"unmatched\",datapath=\"proxy\"} 100"
        );
    }
}
