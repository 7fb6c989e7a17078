//! A DNS cache over hickory-resolver that the per-connection path reads without
//! waiting: answers are kept for their TTL (clamped), refreshed in the background
//! once a host in use is three quarters through its TTL, and failures are cached
//! as negative answers for a short time.

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

#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Name servers to use instead of /etc/resolv.conf's. Empty means the system's.
    pub servers: Vec<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
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

struct Entry {
    answer: Answer,
    refresh_at: Instant,
    expires_at: Instant,
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

        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // A failed refresh keeps a still-valid good answer, as Envoy keeps a strict DNS
        // cluster's hosts when resolution fails; it is retried after the negative TTL.
        if let (Err(LookupError::Failed { .. }), Some(previous)) = (&answer, entries.get_mut(host))
            && previous.answer.is_ok()
            && now < previous.expires_at
        {
            previous.refreshing = false;
            previous.refresh_at = now + self.settings.negative_ttl;
            return previous.answer.clone();
        }
        entries.insert(
            host.to_owned(),
            Entry {
                answer: answer.clone(),
                refresh_at: now + ttl.mul_f32(0.75),
                expires_at: now + ttl,
                refreshing: false,
            },
        );
        answer
    }
}
