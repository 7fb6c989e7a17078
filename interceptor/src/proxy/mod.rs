//! The proxy: accepts redirected connections, recovers where each was going, decides
//! where it goes ([`outbound`]), and then carries that out: reads the client's SNI or
//! Host if the decision asks for it, connects, and forwards bytes both ways.

pub mod balance;
pub mod busy_poll;
pub mod http;
pub mod outbound;
pub mod pool;
mod port_claim;
pub mod sni;
pub mod tls;
pub mod tracking;
pub mod workers;

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, field::Empty, info, info_span, warn};

pub use self::outbound::OutboundPolicy;
use self::{
    outbound::{Decision, Reject, Step},
    tracking::{ConnectionGuard, ConnectionTable},
};
use crate::{
    copy,
    kernel::OriginalDestinations,
    metrics::FailureReason,
    registry::{HostKind, PortRoutes, Registry, UpstreamPolicy},
    resolve::{self, DnsCache, Target},
    socket::{Upstream, connect_bypassing, connect_unix, reset},
};
use http::{HttpRequest, parse_request_head};
use sni::{ClientHello, parse_client_hello};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub bypass_mark: u32,
    pub connect_timeout: Duration,
    pub outbound_policy: OutboundPolicy,
    /// How long a client on a host-routed port has to send its ClientHello or
    /// request head.
    pub sniff_timeout: Duration,
    pub copy_mode: copy::CopyMode,
}

/// State every connection task shares.
pub struct Shared {
    pub registry: Arc<ArcSwap<Registry>>,
    pub original_destinations: Arc<OriginalDestinations>,
    pub dns: Arc<DnsCache>,
    pub config: ProxyConfig,
    /// Live connections, for `/connections` and the connection metrics.
    pub connections: Arc<ConnectionTable>,
    /// One permit per connection the proxy may hold at once, shared by every
    /// listener of every worker.
    pub connection_slots: Arc<Semaphore>,
    /// The splice pipes the descriptors left over allow.
    pub pipes: copy::PipeBudget,
}

/// Accepts until `shutdown` fires; connections run on `connections` so the caller
/// can wait for them to drain.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    // The permits are added once the workers run, so an empty semaphore before this
    // loop first got capacity is not the limit being reached.
    let mut limit_set = false;
    loop {
        // At the limit, stop accepting: clients wait in the kernel's accept queue (and
        // then in SYN retries) instead of being accepted without the descriptors to
        // serve them and reset. Waiting for capacity does not take it, so idle
        // listeners hold no permit.
        if limit_set && shared.connection_slots.available_permits() == 0 {
            shared.connections.metrics().connection_limit_reached.inc();
            if let Some(suppressed) = LIMIT_REACHED_LOG.admit() {
                warn!(
                    suppressed,
                    "connection limit reached; new clients wait in the accept queue"
                );
            }
        }
        let capacity = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                drain_accept_queue(&listener, &shared, &connections);
                break;
            }
            permit = shared.connection_slots.acquire() => permit,
        };
        drop(capacity);
        limit_set = true;
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                drain_accept_queue(&listener, &shared, &connections);
                break;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                // Another listener may have taken the last permit meanwhile: then
                // this one client waits for the next, accepted (the limit leaves a
                // descriptor per listener for this). At shutdown it is served anyway.
                let slot = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => None,
                    slot = Arc::clone(&shared.connection_slots).acquire_owned() => slot.ok(),
                };
                connections.spawn(handle(Arc::clone(&shared), client, peer, slot));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning on the error, and
                // log it once a second, not twenty times per worker.
                if let Some(suppressed) = ACCEPT_FAILED_LOG.admit() {
                    warn!(%error, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    info!("stopped accepting");
}

/// The programs were detached before `shutdown` fired, so nothing new is redirected
/// here; clients already redirected may be queued, and they would get a reset if the
/// listener closed on them. They are served even past the connection limit.
fn drain_accept_queue(listener: &TcpListener, shared: &Arc<Shared>, connections: &TaskTracker) {
    while let Some(Ok((client, peer))) = listener.accept().now_or_never() {
        let slot = Arc::clone(&shared.connection_slots)
            .try_acquire_owned()
            .ok();
        connections.spawn(handle(Arc::clone(shared), client, peer, slot));
    }
}

/// `slot`: the connection's share of the limit, given back when it ends.
///
/// An async block rather than an async fn: an async fn keeps its arguments twice in
/// its state (as arguments, and moved into locals), and this state is part of every
/// connection's task.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn handle(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    slot: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = ()> {
    async move {
        // Named, so that the block owns it (an async block captures only what it
        // uses) and gives it back when the connection ends.
        let _slot = slot;
        let span = info_span!(
            "connection",
            client = %peer,
            original_dst = Empty,
            host = Empty,
            service = Empty,
            endpoint = Empty,
        );
        let conn = shared.connections.open(peer);
        if shared.connections.tracing_cgroups() {
            // Now, while the client's socket surely exists: the line is written when the
            // connection ends. A client in another network namespace is not found here.
            let cgroup = client
                .local_addr()
                .and_then(|local| crate::sockdiag::socket_cgroup(peer, local));
            conn.set_client_cgroup(cgroup.ok().flatten());
        }
        forward(shared, client, peer, &span, &conn)
            .instrument(span.clone())
            .await;
    }
}

/// An async block, as [`handle`] is, for the same reason.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn forward<'a>(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    span: &'a tracing::Span,
    conn: &'a ConnectionGuard,
) -> impl Future<Output = ()> + 'a {
    async move {
        let started = Instant::now();
        let Some((original, record_source)) = shared.original_destinations.take(peer) else {
            // Only connections connect4 redirected have a record; anything else reached
            // the proxy port directly and must not be relayed anywhere. A listener on a
            // host address can be scanned, so the log line is rate-limited; the metric
            // counts every one.
            if let Some(suppressed) = UNREDIRECTED_LOG.admit() {
                warn!(
                    suppressed,
                    "refused: no redirect record for this client (direct connection to the proxy?)"
                );
            }
            conn.failed(FailureReason::no_redirect_record);
            reset(client);
            return;
        };
        span.record("original_dst", tracing::field::display(original));
        conn.set_original_destination(original, record_source);

        // Bytes read to find the SNI or Host; the upstream receives them first, unchanged.
        let mut preface = Vec::new();
        // Boxed, like the connect below: their state is freed once they are done, instead
        // of being part of the task for the connection's whole life.
        let Some(Routed {
            targets,
            originate,
            policy,
        }) = Box::pin(route(
            &shared,
            &mut client,
            &mut preface,
            original,
            span,
            conn,
        ))
        .await
        else {
            reset(client);
            return;
        };

        let pool = policy.as_ref().and_then(|policy| policy.pool.as_ref());
        let _pool_slot = match pool.map(pool::TcpPool::admit) {
            Some(None) => {
                warn!(
                    "refused: the DestinationRule's connectionPool.tcp.maxConnections is reached"
                );
                conn.failed(FailureReason::pool_overflow);
                reset(client);
                return;
            }
            slot => slot,
        };
        let connect_timeout = pool
            .and_then(|pool| pool.connect_timeout)
            .unwrap_or(shared.config.connect_timeout);
        let balancer = policy.as_ref().and_then(|policy| policy.balancer.as_ref());
        // The addresses move into the connect, so they are not kept while bytes flow.
        let connected = Box::pin(connect_any(
            targets,
            &shared.config,
            connect_timeout,
            balancer,
        ))
        .await;
        let (target, upstream) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                conn.failed(FailureReason::of_connect(&error));
                reset(client);
                return;
            }
        };
        span.record("endpoint", tracing::field::display(&target));
        conn.connected(&target);
        let _active = balancer.map(|balancer| balancer.opened(&target));
        if let (Some(pool), Upstream::Tcp(upstream)) = (pool, &upstream)
            && let Err(error) = pool.apply(socket2::SockRef::from(upstream))
        {
            warn!(%error, "cannot set the DestinationRule's TCP keepalive");
        }
        if let Some((policy, server_name)) = originate {
            Box::pin(tls::originate(
                client,
                upstream,
                preface,
                &policy,
                &server_name,
                conn,
                started,
            ))
            .await;
            return;
        }
        let (mode, pipes) = (shared.config.copy_mode, &shared.pipes);
        // Dropping both sockets at the end closes them: with a FIN after a clean end, with
        // a reset when a side reset or failed.
        let copied = match &upstream {
            Upstream::Tcp(upstream) => {
                copy::bidirectional(&client, upstream, preface, mode, pipes).await
            }
            Upstream::Unix(upstream) => {
                copy::bidirectional(&client, upstream, preface, mode, pipes).await
            }
        };
        conn.finished(&copied);
        info!(
            close = %copied.close,
            bytes_sent = copied.sent,
            bytes_received = copied.received,
            duration_ms = started.elapsed().as_millis() as u64,
            error = copied.error.as_ref().map(tracing::field::display),
            "connection closed"
        );
    }
}

/// Where a connection goes: its upstream addresses in the order to try them, and
/// the DestinationRule policy that applies.
struct Routed {
    targets: Vec<Target>,
    /// TLS origination: the policy, and the server name to send.
    originate: Option<(Arc<UpstreamPolicy>, String)>,
    policy: Option<Arc<UpstreamPolicy>>,
}

/// Decides where the connection to `original` goes, reading the client's SNI or Host
/// into `preface` if the port routes by host, and resolves the upstream addresses.
/// `None`: refused, counted and logged; the caller resets the client.
async fn route(
    shared: &Shared,
    client: &mut TcpStream,
    preface: &mut Vec<u8>,
    original: SocketAddr,
    span: &tracing::Span,
    conn: &ConnectionGuard,
) -> Option<Routed> {
    let registry = shared.registry.load_full();
    let policy = shared.config.outbound_policy;
    // The Host an HTTP client sent, which TLS origination may send on as its SNI.
    let mut http_host = None;
    let decision = match outbound::decide(&registry, original, policy) {
        Step::Decided(decision) => decision,
        Step::NeedsHost(routes) => {
            match sniff_host(client, preface, routes, shared.config.sniff_timeout).await {
                Ok((kind, host)) => {
                    if let Some(host) = &host {
                        span.record("host", host.as_str());
                    }
                    if kind == HostKind::Http {
                        http_host.clone_from(&host);
                    }
                    outbound::decide_by_host(
                        &registry,
                        routes,
                        original,
                        kind,
                        host.as_deref(),
                        policy,
                    )
                }
                Err(error) => {
                    warn!(%error, bytes = preface.len(), "closing: cannot route by host");
                    conn.failed(FailureReason::no_host);
                    return None;
                }
            }
        }
    };
    drop(registry);

    let mut originate = None;
    let mut policy = None;
    let targets = match decision {
        Decision::Forward(forward) => {
            originate = tls::plan(&forward.route, http_host.as_deref());
            policy = forward.route.upstream_policy().cloned();
            let service = &forward.route.service;
            span.record("service", service.name.as_str());
            conn.set_service(service);
            if let Some(pattern) = forward.matched_host() {
                conn.set_host(pattern);
            }
            match resolve::targets(&forward.route, original, &shared.dns).await {
                Ok(targets) => match policy.as_ref().and_then(|p| p.balancer.as_ref()) {
                    Some(balancer) => balancer.targets(&forward.route, original, targets),
                    None => targets,
                },
                Err(error) => {
                    warn!(%error, "refused: no upstream");
                    conn.failed(&error);
                    return None;
                }
            }
        }
        Decision::Passthrough(destination) => vec![Target::Tcp(destination)],
        Decision::Reject(reject) => {
            match reject {
                Reject::RegistryOnly => {
                    warn!("refused: no service matches and the outbound policy is REGISTRY_ONLY");
                }
            }
            conn.failed(reject);
            return None;
        }
    };
    Some(Routed {
        targets,
        originate,
        policy,
    })
}

static UNREDIRECTED_LOG: LogLimit = LogLimit::new();
static ACCEPT_FAILED_LOG: LogLimit = LogLimit::new();
static LIMIT_REACHED_LOG: LogLimit = LogLimit::new();

/// At most one log line a second for an event strangers can cause at will.
pub(crate) struct LogLimit {
    /// The second (since the process started) of the last line written, plus one; 0
    /// before the first.
    last_second: AtomicU64,
    /// Events since then that were not logged.
    suppressed: AtomicU64,
}

impl LogLimit {
    pub(crate) const fn new() -> Self {
        Self {
            last_second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events suppressed since the last line)` if this one may be logged.
    pub(crate) fn admit(&self) -> Option<u64> {
        static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let second = STARTED.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let last = self.last_second.load(Ordering::Relaxed);
        if last != second
            && self
                .last_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    #[error("not a TLS ClientHello: {0}")]
    NotTls(&'static str),
    #[error("not an HTTP request: {0}")]
    NotHttp(&'static str),
    #[error("no ClientHello or request head within {0:?}")]
    Timeout(Duration),
    #[error("the client closed before sending a ClientHello or request head")]
    Closed,
    #[error("the ClientHello or request head exceeds {MAX_PREFACE_BYTES} bytes")]
    TooLarge,
    /// The cause is in the message, not a source: the proxy logs this error's
    /// message alone.
    #[error("reading from the client: {0}")]
    Io(std::io::Error),
}

/// Enough for any real ClientHello (post-quantum key shares included) or request head.
const MAX_PREFACE_BYTES: usize = 64 * 1024;

/// Reads the start of the connection into `preface` until it names a host: a TLS
/// ClientHello's SNI, or else (if the port has HTTP routes) a request's Host.
async fn sniff_host(
    client: &mut TcpStream,
    preface: &mut Vec<u8>,
    routes: &PortRoutes,
    timeout: Duration,
) -> Result<(HostKind, Option<String>), SniffError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(&first) = preface.first() {
            if first == TLS_HANDSHAKE_RECORD || routes.http.is_empty() {
                match parse_client_hello(preface) {
                    ClientHello::Complete { server_name } => {
                        return Ok((HostKind::Sni, server_name));
                    }
                    ClientHello::Invalid(reason) => return Err(SniffError::NotTls(reason)),
                    ClientHello::Incomplete => {}
                }
            } else {
                match parse_request_head(preface) {
                    HttpRequest::Complete { host } => return Ok((HostKind::Http, host)),
                    HttpRequest::Invalid(reason) => return Err(SniffError::NotHttp(reason)),
                    HttpRequest::Incomplete => {}
                }
            }
        }
        if preface.len() >= MAX_PREFACE_BYTES {
            return Err(SniffError::TooLarge);
        }
        // Reading straight into the heap buffer keeps a read buffer out of the
        // connection task itself, whose size every connection pays for its whole life.
        preface.reserve(4096);
        let read = tokio::time::timeout_at(deadline, client.read_buf(preface))
            .await
            .map_err(|_| SniffError::Timeout(timeout))?
            .map_err(SniffError::Io)?;
        if read == 0 {
            return Err(SniffError::Closed);
        }
    }
}

const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Tries the targets in order until one accepts, all within one connect deadline;
/// each attempt gets an equal share of what is left, so one black-holed address
/// cannot use up the time of the others.
/// Tries the targets in order within the connect timeout; the error is the last
/// address's, which names the cause the client's reset is counted under.
async fn connect_any(
    targets: Vec<Target>,
    config: &ProxyConfig,
    connect_timeout: Duration,
    balancer: Option<&balance::Balancer>,
) -> io::Result<(Target, Upstream)> {
    let deadline = Instant::now() + connect_timeout;
    let mut last_error = None;
    for (index, target) in targets.iter().enumerate() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            warn!(%target, "connect deadline reached before trying every address");
            last_error = None;
            break;
        }
        let attempt_timeout = remaining / (targets.len() - index) as u32;
        let result = match target {
            Target::Tcp(addr) => connect_bypassing(*addr, config.bypass_mark, attempt_timeout)
                .await
                .map(Upstream::Tcp),
            Target::Unix(path) => connect_unix(path).await.map(Upstream::Unix),
        };
        if result.is_err()
            && balancer.is_some_and(|balancer| {
                balancer.failed(target, targets.len(), std::time::Instant::now())
            })
        {
            let ejected = balancer.map_or(0, |balancer| {
                balancer.ejected(std::time::Instant::now()).len()
            });
            warn!(%target, ejected, "ejected by the DestinationRule's outlierDetection");
        }
        match result {
            Ok(upstream) => return Ok((target.clone(), upstream)),
            Err(error) if index + 1 < targets.len() => {
                warn!(%target, %error, "upstream connect failed; trying the next address");
                last_error = Some(error);
            }
            Err(error) => {
                warn!(%target, %error, "upstream connect failed; resetting the client");
                last_error = Some(error);
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "connect deadline reached")))
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use tokio::{net::TcpStream, sync::OwnedSemaphorePermit};

    use super::{LogLimit, Shared, handle};

    /// The size of the future `connection` returns, without making one.
    fn future_size<F, Fut>(_connection: F) -> usize
    where
        F: FnOnce(Arc<Shared>, TcpStream, SocketAddr, Option<OwnedSemaphorePermit>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every open connection holds this state for its whole life, idle or not, so it
    /// is what the proxy's memory per connection mostly is. Routing, connecting and
    /// failure handling are boxed and freed when done; an await added inline on the
    /// copy path grows every connection.
    #[test]
    fn a_connection_task_holds_little_state() {
        let size = future_size(handle);
        assert!(
            size <= 1_536,
            "a connection's future takes {size} bytes: box what is awaited only \
             briefly or rarely"
        );
    }

    #[test]
    fn a_log_limit_admits_one_event_a_second_and_counts_the_rest() {
        let limit = LogLimit::new();
        assert_eq!(limit.admit(), Some(0));
        assert_eq!(limit.admit(), None);
        assert_eq!(limit.admit(), None);
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        assert_eq!(limit.admit(), Some(2));
        assert_eq!(limit.admit(), None);
    }
}
