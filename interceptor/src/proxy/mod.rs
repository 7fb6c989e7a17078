//! The proxy: accepts redirected connections, recovers where each was going, picks
//! the upstream from the registry snapshot, and forwards bytes both ways.

pub mod tracking;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, field::Empty, info, info_span, warn};

use self::tracking::{ConnectionGuard, ConnectionTable};
use crate::{
    kernel::OriginalDestinations,
    metrics::FailureReason,
    registry::Registry,
    resolve::{self, DnsCache, Target},
    socket::{Upstream, connect_bypassing, connect_unix, reset},
};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub bypass_mark: u32,
    pub connect_timeout: Duration,
}

/// State every connection task shares.
pub struct Shared {
    pub registry: Arc<ArcSwap<Registry>>,
    pub original_destinations: Arc<OriginalDestinations>,
    pub dns: Arc<DnsCache>,
    pub config: ProxyConfig,
    /// Live connections, for `/connections` and the connection metrics.
    pub connections: Arc<ConnectionTable>,
}

/// Accepts until `shutdown` fires; connections run on `connections` so the caller
/// can wait for them to drain.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => {
                // The programs were detached before `shutdown` fired, so nothing new
                // is redirected here; clients already redirected may be queued, and
                // they would get a reset if the listener closed on them.
                while let Some(Ok((client, peer))) = listener.accept().now_or_never() {
                    connections.spawn(handle(Arc::clone(&shared), client, peer));
                }
                break;
            }
        };
        match accepted {
            Ok((client, peer)) => {
                connections.spawn(handle(Arc::clone(&shared), client, peer));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning on the error.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    info!("stopped accepting");
}

async fn handle(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    let span = info_span!(
        "connection",
        client = %peer,
        original_dst = Empty,
        service = Empty,
        endpoint = Empty,
    );
    let conn = shared.connections.open(peer);
    forward(shared, client, peer, &span, &conn)
        .instrument(span.clone())
        .await;
}

async fn forward(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    span: &tracing::Span,
    conn: &ConnectionGuard,
) {
    let started = Instant::now();
    let original = match peer {
        SocketAddr::V4(peer) => shared.original_destinations.take(peer),
        SocketAddr::V6(_) => None,
    };
    let Some(original) = original else {
        // Only connections connect4 redirected have a record; anything else reached
        // the proxy port directly and must not be relayed anywhere.
        warn!("refused: no redirect record for this client (direct connection to the proxy?)");
        conn.failed(FailureReason::no_redirect_record);
        reset(client);
        return;
    };
    span.record("original_dst", tracing::field::display(original));
    conn.set_original_destination(original);

    let registry = shared.registry.load_full();
    let targets = match registry.route(original) {
        Some(route) => {
            span.record("service", route.service.name.as_str());
            conn.set_service(&route.service);
            match resolve::targets(&route, original, &shared.dns).await {
                Ok(targets) => targets,
                Err(error) => {
                    warn!(%error, "refused: no upstream");
                    conn.failed(&error);
                    reset(client);
                    return;
                }
            }
        }
        // The config changed between the redirect and now; outbound traffic policy
        // ALLOW_ANY sends unmatched traffic to where it was going.
        None => vec![Target::Tcp(SocketAddr::V4(original))],
    };
    drop(registry);

    let Some((target, upstream)) = connect_any(&targets, &shared.config).await else {
        conn.failed(FailureReason::upstream_connect);
        reset(client);
        return;
    };
    span.record("endpoint", tracing::field::display(&target));
    conn.connected(&target);
    let _ = client.set_nodelay(true);
    let copied = match upstream {
        Upstream::Tcp(mut upstream) => {
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        }
        Upstream::Unix(mut upstream) => {
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        }
    };
    conn.finished(&copied);
    match copied {
        Ok((sent, received)) => info!(
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        ),
        Err(error) => info!(
            %error,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed with an error"
        ),
    }
}

/// Tries the targets in order until one accepts, all within one connect deadline;
/// each attempt gets an equal share of what is left, so one black-holed address
/// cannot use up the time of the others.
async fn connect_any(targets: &[Target], config: &ProxyConfig) -> Option<(Target, Upstream)> {
    let deadline = Instant::now() + config.connect_timeout;
    for (index, target) in targets.iter().enumerate() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            warn!(%target, "connect deadline reached before trying every address");
            break;
        }
        let attempt_timeout = remaining / (targets.len() - index) as u32;
        let result = match target {
            Target::Tcp(addr) => connect_bypassing(*addr, config.bypass_mark, attempt_timeout)
                .await
                .map(Upstream::Tcp),
            Target::Unix(path) => connect_unix(path).await.map(Upstream::Unix),
        };
        match result {
            Ok(upstream) => return Some((target.clone(), upstream)),
            Err(error) if index + 1 < targets.len() => {
                warn!(%target, %error, "upstream connect failed; trying the next address");
            }
            Err(error) => warn!(%target, %error, "upstream connect failed; resetting the client"),
        }
    }
    None
}
