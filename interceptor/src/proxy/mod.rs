//! The proxy: accepts redirected connections, recovers where each was going, picks
//! the upstream from the registry snapshot, and forwards bytes both ways.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, field::Empty, info, info_span, warn};

use crate::{
    kernel::OriginalDestinations,
    registry::{Registry, upstream_for},
    socket::{connect_bypassing, reset},
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
    pub config: ProxyConfig,
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
            () = shutdown.cancelled() => break,
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
    forward(shared, client, peer, &span)
        .instrument(span.clone())
        .await;
}

async fn forward(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    span: &tracing::Span,
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
        reset(client);
        return;
    };
    span.record("original_dst", tracing::field::display(original));

    let registry = shared.registry.load();
    let upstream = match registry.route(original) {
        Some(route) => {
            span.record("service", route.service.name.as_str());
            match upstream_for(&route, original) {
                Some(upstream) => upstream,
                None => {
                    warn!("refused: the service has no endpoint");
                    reset(client);
                    return;
                }
            }
        }
        // The config changed between the redirect and now; outbound traffic policy
        // ALLOW_ANY sends unmatched traffic to where it was going.
        None => SocketAddr::V4(original),
    };
    drop(registry);
    span.record("endpoint", tracing::field::display(upstream));

    let mut upstream_stream = match connect_bypassing(
        upstream,
        shared.config.bypass_mark,
        shared.config.connect_timeout,
    )
    .await
    {
        Ok(stream) => stream,
        Err(error) => {
            warn!(%error, "upstream connect failed; resetting the client");
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream_stream).await {
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
