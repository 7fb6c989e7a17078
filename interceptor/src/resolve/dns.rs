//! A DNS cache over hickory-resolver that the per-connection path reads without
//! waiting: answers are kept for their TTL (clamped), refreshed in the background
//! once a host in use is three quarters through its TTL, and failures are cached
//! as negative answers for a short time. A lookup that gets no answer keeps the
//! last good one (see [`settle`]). The proxy and the kernel path both read it, so
//! both use the same addresses for a host.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{
    Resolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts},
    net::{DnsError, NetError},
};
use tracing::{debug, warn};

use super::marked::MarkedRuntime;

/// RFC 8767 (serving stale data) suggests keeping answers one to three days past
/// their TTL while the servers cannot be reached; an outage outlasting a day is
/// one an operator has long since seen in the log.
pub const DEFAULT_STALE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Name servers to use instead of /etc/resolv.conf's. Empty means the system's.
    pub servers: Vec<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
    /// How long past its TTL a good answer is still used while lookups get no
    /// answer at all (a silent server, a local error such as no free descriptor).
    pub stale_ttl: Duration,
    /// Per-query timeout; a lookup makes at most two attempts.
    pub query_timeout: Duration,
    /// SO_MARK on the resolver's sockets, so DNS capture leaves them alone.
    pub bypass_mark: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            stale_ttl: DEFAULT_STALE_TTL,
            query_timeout: Duration::from_secs(2),
            bypass_mark: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsSetupError {
    #[error("cannot read the system resolver configuration (/etc/resolv.conf)")]
    SystemConfig(#[source] NetError),
    #[error("cannot build the DNS resolver")]
    Build(#[source] NetError),
}

/// Why a host has no usable address. Cloned out of the cache to each waiting connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("{host}: no such host or no address records")]
    NoRecords { host: String },
    #[error("{host}: {message}")]
    Failed { host: String, message: String },
}

type Answer = Result<Arc<[IpAddr]>, LookupError>;

#[derive(Debug, Clone)]
struct Entry {
    answer: Answer,
    refresh_at: Instant,
    expires_at: Instant,
    /// Until when a good answer outlives failed lookups; for a failure, its expiry.
    stale_until: Instant,
    refreshing: bool,
}

pub struct DnsCache {
    resolver: Resolver<MarkedRuntime>,
    settings: DnsSettings,
    entries: Mutex<HashMap<String, Entry>>,
}

impl DnsCache {
    pub fn new(settings: DnsSettings) -> Result<Arc<Self>, DnsSetupError> {
        let (config, mut options) = if settings.servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(DnsSetupError::SystemConfig)?
        } else {
            let servers = settings
                .servers
                .iter()
                .map(|server| {
                    let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                        .into_iter()
                        .map(|mut connection| {
                            connection.port = server.port();
                            connection
                        })
                        .collect();
                    NameServerConfig::new(server.ip(), true, connections)
                })
                .collect();
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
            )
        };
        // This cache owns TTL handling; a second cache below it would serve answers
        // past the point where this one decided to refresh.
        options.cache_size = 0;
        options.timeout = settings.query_timeout;
        options.attempts = 2;
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver =
            Resolver::builder_with_config(config, MarkedRuntime::new(settings.bypass_mark))
                .with_options(options)
                .build()
                .map_err(DnsSetupError::Build)?;
        Ok(Arc::new(Self {
            resolver,
            settings,
            entries: Mutex::new(HashMap::new()),
        }))
    }

    /// The addresses of `host`, IPv4 first (connect4 clients are IPv4). Served from
    /// the cache when fresh; a host seen for the first time, or not used for longer
    /// than its TTL, waits for one lookup.
    pub async fn lookup(self: &Arc<Self>, host: &str) -> Answer {
        let now = Instant::now();
        {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = entries.get_mut(host) {
                if now < entry.expires_at {
                    if now >= entry.refresh_at && !entry.refreshing {
                        entry.refreshing = true;
                        let cache = Arc::clone(self);
                        let host = host.to_owned();
                        tokio::spawn(async move { cache.refresh(&host).await });
                    }
                    return entry.answer.clone();
                }
                // A refresh started while the answer was valid is still running: keep
                // serving the answer it will replace rather than wait for it, for as
                // long as a lookup may take.
                if entry.refreshing
                    && entry.answer.is_ok()
                    && now < entry.expires_at + self.settings.query_timeout * 4
                {
                    return entry.answer.clone();
                }
            }
        }
        self.refresh(host).await
    }

    async fn refresh(&self, host: &str) -> Answer {
        let started = Instant::now();
        let result = self.resolver.lookup_ip(host).await;
        let now = Instant::now();
        let (answer, ttl) = match result {
            Ok(lookup) => {
                let mut addresses: Vec<IpAddr> = lookup.iter().collect();
                addresses.sort_by_key(|address| address.is_ipv6());
                addresses.dedup();
                let ttl = lookup.valid_until().saturating_duration_since(now);
                if addresses.is_empty() {
                    (
                        Err(LookupError::NoRecords {
                            host: host.to_owned(),
                        }),
                        self.settings.negative_ttl,
                    )
                } else {
                    (
                        Ok(Arc::from(addresses)),
                        ttl.clamp(self.settings.min_ttl, self.settings.max_ttl),
                    )
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(_))) => (
                Err(LookupError::NoRecords {
                    host: host.to_owned(),
                }),
                self.settings.negative_ttl,
            ),
            Err(error) => (
                Err(LookupError::Failed {
                    host: host.to_owned(),
                    message: error.to_string(),
                }),
                self.settings.negative_ttl,
            ),
        };
        crate::metrics::DNS.record_lookup(&answer);
        match &answer {
            Ok(addresses) => {
                debug!(host, ?addresses, ?ttl, elapsed = ?started.elapsed(), "resolved")
            }
            Err(error) => warn!(host, %error, "DNS lookup failed"),
        }

        let failed = answer.is_err();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = settle(entries.get(host), answer, ttl, now, &self.settings);
        if failed && entry.answer.is_ok() {
            debug!(host, "keeping the last good answer");
        }
        let answer = entry.answer.clone();
        entries.insert(host.to_owned(), entry);
        answer
    }
}

/// What the cache holds for a host once a lookup at `now` came back with `answer`,
/// good for `ttl`, given what it held before.
///
/// A lookup that got no answer at all (a server that stays silent, or a local error
/// such as no free descriptor for the query's socket) says nothing about the host,
/// so the last good answer stays in use, even past its TTL, until a server answers
/// or `stale_ttl` past its expiry; the lookup is retried after the negative TTL.
/// Envoy keeps a strict DNS cluster's hosts the same way. An answer that the host
/// has no address (NXDOMAIN, no records) is the server's word and ends it at once.
fn settle(
    previous: Option<&Entry>,
    answer: Answer,
    ttl: Duration,
    now: Instant,
    settings: &DnsSettings,
) -> Entry {
    if let (Err(LookupError::Failed { .. }), Some(previous)) = (&answer, previous)
        && previous.answer.is_ok()
        && now < previous.stale_until
    {
        let retry = settings.negative_ttl;
        return Entry {
            answer: previous.answer.clone(),
            refresh_at: now + retry.mul_f32(0.75),
            expires_at: previous
                .expires_at
                .max((now + retry).min(previous.stale_until)),
            stale_until: previous.stale_until,
            refreshing: false,
        };
    }
    let expires_at = now + ttl;
    Entry {
        stale_until: if answer.is_ok() {
            expires_at + settings.stale_ttl
        } else {
            expires_at
        },
        answer,
        refresh_at: now + ttl.mul_f32(0.75),
        expires_at,
        refreshing: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(1);
    /// What a failed lookup is cached for, as `refresh` passes it.
    const NEGATIVE: Duration = Duration::from_secs(5);

    fn settings() -> DnsSettings {
        DnsSettings {
            negative_ttl: NEGATIVE,
            stale_ttl: Duration::from_secs(60),
            ..DnsSettings::default()
        }
    }

    fn good(address: &str) -> Answer {
        Ok(Arc::from([address.parse::<IpAddr>().unwrap()]))
    }

    fn failed() -> Answer {
        Err(LookupError::Failed {
            host: "api.test".to_owned(),
            message: "no connections available".to_owned(),
        })
    }

    fn no_records() -> Answer {
        Err(LookupError::NoRecords {
            host: "api.test".to_owned(),
        })
    }

    fn addresses(entry: &Entry) -> Option<Vec<IpAddr>> {
        entry
            .answer
            .as_ref()
            .ok()
            .map(|addresses| addresses.to_vec())
    }

    #[test]
    fn a_lookup_without_an_answer_keeps_the_last_good_one_past_its_ttl() {
        let settings = settings();
        let start = Instant::now();
        let resolved = settle(None, good("198.18.0.1"), TTL, start, &settings);
        assert_eq!(resolved.expires_at, start + TTL);

        // Long after the TTL, a lookup that failed locally or timed out: the answer
        // stays, served without waiting until the retry after the negative TTL.
        let later = start + Duration::from_secs(30);
        let kept = settle(Some(&resolved), failed(), NEGATIVE, later, &settings);
        assert_eq!(addresses(&kept), addresses(&resolved));
        assert_eq!(kept.expires_at, later + NEGATIVE);
        assert!(kept.refresh_at > later && kept.refresh_at < kept.expires_at);
        // Failures in a row keep it too, and do not push the limit out.
        let again = settle(Some(&kept), failed(), NEGATIVE, later + TTL, &settings);
        assert_eq!(addresses(&again), addresses(&resolved));
        assert_eq!(again.stale_until, resolved.stale_until);

        // The next answer replaces it.
        let moved = settle(
            Some(&again),
            good("198.18.0.2"),
            TTL,
            later + TTL,
            &settings,
        );
        assert_eq!(
            addresses(&moved),
            Some(vec!["198.18.0.2".parse::<IpAddr>().unwrap()])
        );
    }

    #[test]
    fn the_server_saying_no_address_or_the_stale_limit_ends_a_good_answer() {
        let settings = settings();
        let start = Instant::now();
        let resolved = settle(None, good("198.18.0.1"), TTL, start, &settings);

        let gone = settle(
            Some(&resolved),
            no_records(),
            NEGATIVE,
            start + TTL,
            &settings,
        );
        assert!(matches!(gone.answer, Err(LookupError::NoRecords { .. })));

        // A kept answer never outlives its limit, however the retries fall.
        let near = resolved.stale_until - Duration::from_secs(1);
        let kept = settle(Some(&resolved), failed(), NEGATIVE, near, &settings);
        assert!(kept.answer.is_ok());
        assert_eq!(kept.expires_at, resolved.stale_until);
        let past = settle(
            Some(&kept),
            failed(),
            NEGATIVE,
            resolved.stale_until,
            &settings,
        );
        assert!(matches!(past.answer, Err(LookupError::Failed { .. })));
        // A failure is no good answer to keep.
        let still = settle(
            Some(&past),
            failed(),
            NEGATIVE,
            resolved.stale_until,
            &settings,
        );
        assert!(still.answer.is_err());
        assert_eq!(still.expires_at, resolved.stale_until + NEGATIVE);
    }
}
