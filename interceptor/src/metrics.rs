//! Prometheus metrics, served by the admin server at `/metrics`.
//!
//! Every metric lives in one [`Metrics`] value that the proxy, the reloader and the
//! admin server share. Per-connection updates are atomic adds on counters resolved
//! once per connection; label sets are bounded by the configuration (ServiceEntry
//! names and their hosts) and fixed enums, never by client addresses.

use std::{
    net::IpAddr,
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use interceptor_common::KernelEvent;

use crate::{
    copy::{Close, How, Side},
    kernel::{MapUsage, RecordSource},
    resolve::LookupError,
};

/// The `service_entry` label of connections no ServiceEntry matched: the config
/// changed between the redirect and the accept, and the connection went to its
/// original destination (ALLOW_ANY). No ServiceEntry name can take this value,
/// since real names are `ServiceEntry/<namespace>/<name>`.
pub const UNMATCHED: &str = "unmatched";

/// Why a connection was not forwarded.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The variant names are the label values.
pub enum FailureReason {
    /// Nothing connect4 redirected: a direct connection to the proxy port.
    no_redirect_record,
    /// The service has no usable endpoint.
    no_upstream,
    /// The endpoint's hostname did not resolve.
    dns,
    /// The upstream refused the connection (the last address tried, when several).
    upstream_refused,
    /// The upstream did not answer within the connect timeout.
    upstream_timeout,
    /// No route to the upstream's host or network.
    upstream_unreachable,
    /// Any other failure to connect to the upstream.
    upstream_connect,
    /// A TLS or HTTP port-only port, but no ClientHello or request head arrived in time
    /// (garbage, a silent client, or one that closed).
    no_host,
    /// Nothing matched and the outbound traffic policy is REGISTRY_ONLY.
    registry_only,
    /// The TLS handshake a DestinationRule asked for failed (unknown CA, wrong
    /// name, expired, refused client certificate).
    upstream_tls,
    /// A DestinationRule's `connectionPool.tcp.maxConnections` was reached.
    pool_overflow,
}

impl FailureReason {
    /// Every reason, so each series exists from the start; a `match` here would not
    /// compile without a new variant, which keeps the list complete.
    pub const ALL: [Self; 11] = [
        Self::no_redirect_record,
        Self::no_upstream,
        Self::dns,
        Self::upstream_refused,
        Self::upstream_timeout,
        Self::upstream_unreachable,
        Self::upstream_connect,
        Self::no_host,
        Self::registry_only,
        Self::upstream_tls,
        Self::pool_overflow,
    ];

    /// The reason a failed upstream connect is counted under.
    pub fn of_connect(error: &std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::ConnectionRefused => Self::upstream_refused,
            std::io::ErrorKind::TimedOut => Self::upstream_timeout,
            std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                Self::upstream_unreachable
            }
            _ => Self::upstream_connect,
        }
    }

    #[cfg(test)]
    fn is_listed(self) -> bool {
        match self {
            Self::no_redirect_record
            | Self::no_upstream
            | Self::dns
            | Self::upstream_refused
            | Self::upstream_timeout
            | Self::upstream_unreachable
            | Self::upstream_connect
            | Self::no_host
            | Self::registry_only
            | Self::upstream_tls
            | Self::pool_overflow => Self::ALL.contains(&self),
        }
    }
}

/// Which path a connection took: connect() rewritten straight to a backend, or
/// relayed by the proxy (see `crate::datapath`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Datapath {
    kernel,
    proxy,
}

impl Datapath {
    pub const ALL: [Self; 2] = [Self::kernel, Self::proxy];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatapathLabels {
    pub datapath: Datapath,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: FailureReason,
    pub datapath: Datapath,
}

/// Bounded by the configuration: the ServiceEntry's name, and one of its own hosts
/// (the first, or the one SNI/Host routing matched), never a client-supplied name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub service_entry: String,
    pub host: String,
    pub datapath: Datapath,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    ok,
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

/// Which side ended a forwarded connection, and how (see [`Close`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub side: &'static str,
    pub how: &'static str,
    pub datapath: Datapath,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordSourceLabels {
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelEventLabels {
    pub event: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DnsFailure {
    /// NXDOMAIN, or a name without address records.
    no_records,
    /// Timeout, refused, server failure: the lookup itself did not work.
    error,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsFailureLabels {
    pub reason: DnsFailure,
}

/// DNS counters, process-wide so the DNS cache can count its lookups with one line
/// and no new constructor argument: `crate::metrics::DNS.record_lookup(&answer)`.
pub struct DnsMetrics {
    lookups: Counter,
    failures: Family<DnsFailureLabels, Counter>,
}

pub static DNS: LazyLock<DnsMetrics> = LazyLock::new(|| DnsMetrics {
    lookups: Counter::default(),
    failures: Family::default(),
});

impl DnsMetrics {
    /// Counts one lookup sent to the name servers (a cache miss or refresh, not a
    /// cache hit) and, if it failed, why.
    pub fn record_lookup(&self, answer: &Result<Arc<[IpAddr]>, LookupError>) {
        self.lookups.inc();
        if let Err(error) = answer {
            let reason = match error {
                LookupError::NoRecords { .. } => DnsFailure::no_records,
                LookupError::Failed { .. } => DnsFailure::error,
            };
            self.failures
                .get_or_create(&DnsFailureLabels { reason })
                .inc();
        }
    }
}

pub struct Metrics {
    registry: Registry,
    connections_opened: Family<DatapathLabels, Counter>,
    connections_closed: Family<CloseLabels, Counter>,
    pub connections_failed: Family<FailureLabels, Counter>,
    pub connections_open: Gauge,
    pub connections_limit: Gauge,
    pub connection_limit_reached: Counter,
    pub sent_bytes: Family<TrafficLabels, Counter>,
    pub received_bytes: Family<TrafficLabels, Counter>,
    pub connect_duration: Histogram,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub config_last_reload_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    redirect_records: Family<RecordSourceLabels, Counter>,
    kernel_events: Family<KernelEventLabels, Counter>,
    pub busy_poll_spin: Counter<f64, std::sync::atomic::AtomicU64>,
    pub dns_queries: Family<crate::dns::QueryLabels, Counter>,
    pub vips_allocated: Gauge,
    pub trace_streams: Gauge,
    /// The Kubernetes config source's, registered always, filled only with it.
    pub config_source: crate::config::kubernetes::SourceMetrics,
    /// Handles on the two series of `redirect_records`, so counting costs no lookup.
    records_from_ring: Counter,
    records_from_map: Counter,
    /// Handles on every series of `connections_closed`, by [`Datapath`], [`Side`]
    /// and [`How`].
    closes: [[[Counter; How::ALL.len()]; Side::ALL.len()]; Datapath::ALL.len()],
    /// Handles on every series of `connections_opened`, by [`Datapath`].
    opens: [Counter; Datapath::ALL.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("interceptor");
        let metrics = Self {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            connections_failed: Family::default(),
            connections_open: Gauge::default(),
            connections_limit: Gauge::default(),
            connection_limit_reached: Counter::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            // 100 µs to ~6.5 s: loopback and LAN upstreams at the low end, a connect
            // timeout (5 s by default) at the top.
            connect_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            config_reloads: Family::default(),
            config_last_reload_success: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            redirect_records: Family::default(),
            kernel_events: Family::default(),
            busy_poll_spin: Counter::default(),
            dns_queries: Family::default(),
            vips_allocated: Gauge::default(),
            trace_streams: Gauge::default(),
            config_source: Default::default(),
            records_from_ring: Counter::default(),
            records_from_map: Counter::default(),
            closes: Default::default(),
            opens: Default::default(),
            registry: Registry::default(),
        };
        let source = |source| {
            metrics
                .redirect_records
                .get_or_create(&RecordSourceLabels { source })
                .clone()
        };
        // Every series exists from the start, so a rate() over them works before the
        // first reset.
        let closes = Datapath::ALL.map(|datapath| {
            Side::ALL.map(|side| {
                How::ALL.map(|how| {
                    metrics
                        .connections_closed
                        .get_or_create(&CloseLabels {
                            side: side.label(),
                            how: how.label(),
                            datapath,
                        })
                        .clone()
                })
            })
        });
        let opens = Datapath::ALL.map(|datapath| {
            metrics
                .connections_opened
                .get_or_create(&DatapathLabels { datapath })
                .clone()
        });
        let metrics = Self {
            records_from_ring: source("ring"),
            records_from_map: source("map"),
            closes,
            opens,
            ..metrics
        };
        registry.register(
            "dns_queries",
            "DNS queries the daemon's DNS server handled, by outcome: answered locally, \
             forwarded upstream, or failed (SERVFAIL, FORMERR or dropped)",
            metrics.dns_queries.clone(),
        );
        registry.register(
            "vips_allocated",
            "Hosts with auto-allocated VIPs in the running configuration",
            metrics.vips_allocated.clone(),
        );
        registry.register(
            "trace_streams",
            "Open /trace streams (interceptor trace); while any is open, connect4/6 emit \
             an event per connect",
            metrics.trace_streams.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections intercepted, by datapath: accepted by the proxy, or on the kernel \
             path connects counted when their socket closes (sockops reports no open)",
            metrics.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections that were forwarded and have ended, by datapath, the side that \
             ended them and how: a reset or failure wherever it came (how=reset, or error \
             for a failure other than a reset; the other side was reset), else the first \
             FIN (how=fin)",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "connections_failed",
            "Connections reset without being forwarded, by reason and datapath; on the \
             kernel path, connects that never established (upstream_connect)",
            metrics.connections_failed.clone(),
        );
        registry.register(
            "connections_open",
            "Connections accepted and not yet ended",
            metrics.connections_open.clone(),
        );
        registry.register(
            "connections_limit",
            "The most connections served at once (--max-connections); more wait in the accept queue",
            metrics.connections_limit.clone(),
        );
        registry.register(
            "connection_limit_reached",
            "Times a proxy listener stopped accepting because the connection limit was reached",
            metrics.connection_limit_reached.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Bytes forwarded from clients to upstreams, counted when a connection ends; \
             on the kernel path, what the backend acknowledged",
            prometheus_client::registry::Unit::Bytes,
            metrics.sent_bytes.clone(),
        );
        registry.register_with_unit(
            "received",
            "Bytes forwarded from upstreams to clients, counted when a connection ends; \
             on the kernel path, what the socket received",
            prometheus_client::registry::Unit::Bytes,
            metrics.received_bytes.clone(),
        );
        registry.register_with_unit(
            "upstream_connect_duration",
            "Latency the proxy adds before forwarding: from accept to upstream connected",
            prometheus_client::registry::Unit::Seconds,
            metrics.connect_duration.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by result; a failed reload leaves the running config in place",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the running configuration was applied, in seconds since the epoch",
            metrics.config_last_reload_success.clone(),
        );
        registry.register(
            "bpf_map_entries",
            "Entries in each BPF map",
            metrics.map_entries.clone(),
        );
        registry.register(
            "bpf_map_max_entries",
            "Capacity of each BPF map",
            metrics.map_capacity.clone(),
        );
        registry.register(
            "redirect_records",
            "Redirect records the proxy took, by where it found them: ring (no system call) \
             or map (the fallback sockops uses when the ring is full)",
            metrics.redirect_records.clone(),
        );
        registry.register(
            "kernel_events",
            "What the BPF programs could not do: storage_unavailable (a connect went direct \
             for want of memory for its record), record_lost (the ring and the fallback map \
             were full; the proxy refused that connection), trace_lost (the trace ring was \
             full; interceptor trace missed a connect)",
            metrics.kernel_events.clone(),
        );
        registry.register_with_unit(
            "busy_poll_spin",
            "Wall time proxy workers spent spinning for their next event instead of \
             blocking (--busy-poll-us): an upper bound on the CPU busy polling costs",
            prometheus_client::registry::Unit::Seconds,
            metrics.busy_poll_spin.clone(),
        );
        registry.register(
            "dns_lookups",
            "DNS lookups sent to the name servers (cache misses and refreshes)",
            DNS.lookups.clone(),
        );
        registry.register(
            "dns_lookup_failures",
            "DNS lookups that produced no address, by reason",
            DNS.failures.clone(),
        );
        // Every reason and result exists from the start, so a rate() over them works
        // before the first failure.
        for datapath in Datapath::ALL {
            for reason in FailureReason::ALL {
                metrics
                    .connections_failed
                    .get_or_create_owned(&FailureLabels { reason, datapath });
            }
        }
        for result in [ReloadResult::ok, ReloadResult::failed] {
            metrics
                .config_reloads
                .get_or_create_owned(&ReloadLabels { result });
        }
        metrics.config_source.register(&mut registry);
        Self {
            registry,
            ..metrics
        }
    }

    pub fn redirect_record_taken(&self, source: RecordSource) {
        match source {
            RecordSource::Ring => self.records_from_ring.inc(),
            RecordSource::Map => self.records_from_map.inc(),
        };
    }

    pub fn connection_opened(&self, datapath: Datapath) {
        self.opens[datapath as usize].inc();
    }

    pub fn connection_closed(&self, datapath: Datapath, close: Close) {
        // `ALL` lists the variants in order, so a variant's number is its index there.
        self.closes[datapath as usize][close.side as usize][close.how as usize].inc();
    }

    pub fn connection_failed(&self, datapath: Datapath, reason: FailureReason) {
        self.connections_failed
            .get_or_create(&FailureLabels { reason, datapath })
            .inc();
    }

    /// Adds a finished connection's bytes each way to its entry's counters.
    pub fn transferred(&self, labels: &TrafficLabels, sent: u64, received: u64) {
        self.sent_bytes.get_or_create(labels).inc_by(sent);
        self.received_bytes.get_or_create(labels).inc_by(received);
    }

    pub fn reloaded(&self, result: ReloadResult) {
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
        if result == ReloadResult::ok {
            self.config_applied();
        }
    }

    /// A configuration was applied, at start-up or by a reload.
    pub fn config_applied(&self) {
        self.config_last_reload_success.set(unix_seconds());
    }

    /// Records the occupancy of the BPF maps, read just before a scrape.
    pub fn set_map_usage(&self, usage: &[MapUsage]) {
        for map in usage {
            let labels = MapLabels { map: map.name };
            self.map_entries
                .get_or_create(&labels)
                .set(i64::try_from(map.entries).unwrap_or(i64::MAX));
            self.map_capacity
                .get_or_create(&labels)
                .set(i64::from(map.capacity));
        }
    }

    /// Brings the kernel event counters to the programs' totals, read just before a
    /// scrape; they only grow while the programs are loaded.
    pub fn set_kernel_events(&self, events: &[(KernelEvent, u64)]) {
        for &(event, total) in events {
            let counter = self.kernel_events.get_or_create(&KernelEventLabels {
                event: event.label(),
            });
            // Concurrent scrapes may both get here: raising to the total, rather than
            // adding the difference each saw, cannot count twice.
            counter
                .inner()
                .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_reason_is_exported_from_the_start() {
        assert!(FailureReason::ALL.iter().all(|reason| reason.is_listed()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &Metrics::new().registry).unwrap();
        for reason in ["no_host", "registry_only", "no_redirect_record"] {
            assert!(
                text.contains(&format!("reason=\"{reason}\"")),
                "{reason} missing:\n{text}"
            );
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics.connection_opened(Datapath::proxy);
        metrics.transferred(
            &TrafficLabels {
                service_entry: "ServiceEntry/ns/api".into(),
                host: "api.example.com".into(),
                datapath: Datapath::kernel,
            },
            42,
            0,
        );
        metrics.connect_duration.observe(0.001);
        metrics.reloaded(ReloadResult::failed);
        let text = metrics.encode();
        for expected in [
            "interceptor_connections_opened_total{datapath=\"proxy\"} 1",
            "interceptor_connections_opened_total{datapath=\"kernel\"} 0",
            "interceptor_connections_failed_total{reason=\"dns\",datapath=\"proxy\"} 0",
            "interceptor_connections_failed_total{reason=\"dns\",datapath=\"kernel\"} 0",
            "interceptor_sent_bytes_total{service_entry=\"ServiceEntry/ns/api\",host=\"api.example.com\",datapath=\"kernel\"} 42",
            "interceptor_upstream_connect_duration_seconds_count 1",
            "interceptor_config_reloads_total{result=\"failed\"} 1",
            "interceptor_config_reloads_total{result=\"ok\"} 0",
            "interceptor_dns_lookups_total",
            "# EOF",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn closes_are_counted_by_side_and_how_from_the_start() {
        assert!(
            Side::ALL
                .iter()
                .enumerate()
                .all(|(index, side)| *side as usize == index)
        );
        assert!(
            How::ALL
                .iter()
                .enumerate()
                .all(|(index, how)| *how as usize == index)
        );
        assert!(
            Datapath::ALL
                .iter()
                .enumerate()
                .all(|(index, datapath)| *datapath as usize == index)
        );
        let metrics = Metrics::new();
        metrics.connection_closed(
            Datapath::proxy,
            Close {
                side: Side::Upstream,
                how: How::Reset,
            },
        );
        let text = metrics.encode();
        for expected in [
            "interceptor_connections_closed_total{side=\"upstream\",how=\"reset\",datapath=\"proxy\"} 1",
            "interceptor_connections_closed_total{side=\"upstream\",how=\"reset\",datapath=\"kernel\"} 0",
            "interceptor_connections_closed_total{side=\"client\",how=\"fin\",datapath=\"kernel\"} 0",
            "interceptor_connections_closed_total{side=\"client\",how=\"error\",datapath=\"proxy\"} 0",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn dns_failures_are_counted_by_reason() {
        let before = DNS.lookups.get();
        DNS.record_lookup(&Err(LookupError::NoRecords {
            host: "missing.example".into(),
        }));
        DNS.record_lookup(&Ok(Arc::from(vec![IpAddr::from([192, 0, 2, 1])])));
        assert!(DNS.lookups.get() >= before + 2);
        let no_records = DNS
            .failures
            .get_or_create(&DnsFailureLabels {
                reason: DnsFailure::no_records,
            })
            .get();
        assert!(no_records >= 1);
    }

    #[test]
    fn a_failed_upstream_connect_is_counted_under_its_cause() {
        use std::io::{Error, ErrorKind};
        for (kind, reason) in [
            (
                ErrorKind::ConnectionRefused,
                FailureReason::upstream_refused,
            ),
            (ErrorKind::TimedOut, FailureReason::upstream_timeout),
            (
                ErrorKind::HostUnreachable,
                FailureReason::upstream_unreachable,
            ),
            (
                ErrorKind::NetworkUnreachable,
                FailureReason::upstream_unreachable,
            ),
            (ErrorKind::PermissionDenied, FailureReason::upstream_connect),
        ] {
            assert_eq!(
                FailureReason::of_connect(&Error::from(kind)),
                reason,
                "{kind:?}"
            );
        }
        // What connect(2) reports reaches the same reasons.
        assert_eq!(
            FailureReason::of_connect(&Error::from_raw_os_error(libc::ENETUNREACH)),
            FailureReason::upstream_unreachable
        );
        assert_eq!(
            FailureReason::of_connect(&Error::from_raw_os_error(libc::ECONNREFUSED)),
            FailureReason::upstream_refused
        );
    }
}
