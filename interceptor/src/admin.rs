//! The admin server: readiness, the effective config, live connections and metrics,
//! over plain HTTP/1.1 on a loopback address.
//!
//! It is bound before anything else starts, so a probe during start-up gets an
//! honest 503 rather than a refused connection, and it keeps serving through the
//! drain, so the 503 of shutdown and the last metrics stay visible.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, Ordering},
    },
};

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    kernel::MapOccupancy,
    metrics::Metrics,
    proxy::tracking::{ConnectionInfo, ConnectionTable},
    registry::Registry,
    sockdiag,
    trace::{self, Tracer},
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
pub const INSTANCE_HEADER: &str = "x-interceptor-instance";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin address {0} is not loopback: it exposes the config and live connections; pass --admin-allow-non-loopback to allow it"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on the admin address {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the daemon is in its life, as `/healthz/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Loading config, attaching programs: not intercepting yet.
    Starting = 0,
    /// Programs attached and the proxy accepting.
    Serving = 1,
    /// Shutdown began: programs detached, open connections draining.
    Draining = 2,
}

#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicU8>);

impl Readiness {
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            1 => Phase::Serving,
            2 => Phase::Draining,
            _ => Phase::Starting,
        }
    }
}

/// What the admin server reads; filled in as the daemon starts.
pub struct AdminState {
    /// This daemon's [`crate::address_file::Addresses::instance`], in every readiness
    /// answer's [`INSTANCE_HEADER`].
    pub instance: u64,
    pub readiness: Readiness,
    pub config_paths: Vec<PathBuf>,
    /// The proxy listener, whose accepted sockets the kernel reports live bytes for.
    /// The proxy's listeners (IPv4, and IPv6 if it has one).
    pub proxy_addrs: Vec<SocketAddr>,
    /// The snapshot the proxy routes with; empty until the config is loaded.
    pub registry: Arc<ArcSwap<Registry>>,
    pub connections: Arc<ConnectionTable>,
    pub metrics: Arc<Metrics>,
    /// Set once the programs are loaded.
    pub maps: OnceLock<MapOccupancy>,
    /// What `/explain` needs besides the snapshot; set once the DNS cache exists.
    pub explain: OnceLock<ExplainContext>,
    /// Where `/trace` streams come from.
    pub tracer: Arc<Tracer>,
}

/// A body sent whole, or a `/trace` stream.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long a `/trace` stream may stay silent before it sends an empty line: a
/// write is how the server learns that the client went away, and closes the stream.
const TRACE_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// The daemon settings an explanation depends on.
pub struct ExplainContext {
    pub datapath: crate::datapath::DatapathMode,
    pub outbound_policy: crate::proxy::OutboundPolicy,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    pub dns: Arc<crate::resolve::DnsCache>,
    /// Where rules are scoped by `exportTo`: how a client's namespace is found.
    pub scope: Option<ExportScope>,
}

/// How `exportTo` finds a client's namespace: its pod's, or the host's.
pub struct ExportScope {
    pub host_namespace: String,
    pub pods: Arc<crate::config::kubernetes::KubeSource>,
}

/// Binds the admin listener, refusing a non-loopback address unless allowed.
pub async fn bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<TcpListener, AdminError> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(AdminError::NotLoopback(addr));
    }
    match TcpListener::bind(addr).await {
        // A previous interceptor still serving there (see proxy::workers::bind): take
        // a free port rather than refuse to start next to it.
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                .await
                .map_err(|source| AdminError::Listen { addr, source })?;
            warn!(
                taken = %addr,
                addr = %listener.local_addr().map_err(|source| AdminError::Listen { addr, source })?,
                "the admin address is in use (a previous interceptor?); serving on a free port instead"
            );
            Ok(listener)
        }
        result => result.map_err(|source| AdminError::Listen { addr, source }),
    }
}

/// For a daemon that found its configured admin address taken by the one it
/// replaces: waits for that daemon to leave, then serves at the configured address
/// too (keeping the free port), so the scrape configs and probes that name it reach
/// this daemon again.
/// `taken` is called with the address once it is.
pub async fn reclaim(
    addr: SocketAddr,
    state: Arc<AdminState>,
    retry: std::time::Duration,
    taken: impl FnOnce(SocketAddr),
) {
    let listener = loop {
        tokio::time::sleep(retry).await;
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(error) => {
                warn!(%addr, %error, "cannot take over the configured admin address; staying on the free port");
                return;
            }
        }
    };
    info!(%addr, "the configured admin address is free again; serving there too");
    taken(addr);
    serve(listener, state).await;
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin server listening");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, request).await) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}

async fn route(state: &AdminState, request: Request<Incoming>) -> Response<Body> {
    if request.method() == Method::GET && request.uri().path() == "/trace" {
        return trace(state, request.uri().query().unwrap_or_default());
    }
    answer(state, request).await.map(BodyExt::boxed_unsync)
}

async fn answer(state: &AdminState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into());
    }
    match request.uri().path() {
        "/healthz/ready" => ready(state),
        "/config_dump" => {
            let registry = state.registry.load();
            json(&ConfigDump {
                config_paths: &state.config_paths,
                services: registry.services().iter().map(AsRef::as_ref).collect(),
            })
        }
        "/connections" => json(&connections(state).await),
        "/explain" => explain(state, request.uri().query().unwrap_or_default()).await,
        "/metrics" => metrics(state).await,
        "/" => respond(
            StatusCode::OK,
            TEXT,
            "/healthz/ready\n/config_dump\n/connections\n/explain?dest=ADDR:PORT[&sni=NAME|&host=NAME][&cgroup=PATH][&output=json]\n/metrics\n/trace[?cgroup=PATH][&dest=CIDR][&port=N][&output=json]\n".into(),
        ),
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    let mut response = match state.readiness.phase() {
        Phase::Serving => respond(StatusCode::OK, TEXT, "ready\n".into()),
        Phase::Starting => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n".into()),
        Phase::Draining => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n".into()),
    };
    response
        .headers_mut()
        .insert(INSTANCE_HEADER, HeaderValue::from(state.instance));
    response
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    config_paths: &'a [PathBuf],
    /// In precedence order (oldest first), each with its file and document index.
    services: Vec<&'a crate::registry::Service>,
}

/// The live connections, with the bytes the kernel has counted on each so far.
async fn connections(state: &AdminState) -> Vec<ConnectionInfo> {
    let mut connections = state.connections.snapshot();
    if connections.is_empty() {
        return connections;
    }
    let listeners = state.proxy_addrs.clone();
    let diagnostics = tokio::task::spawn_blocking(move || {
        let mut sockets = std::collections::HashMap::new();
        for listener in listeners {
            sockets.extend(sockdiag::accepted_socket_bytes(listener)?);
        }
        Ok::<_, std::io::Error>(sockets)
    });
    match diagnostics.await {
        Ok(Ok(sockets)) => {
            for connection in &mut connections {
                if let (None, Some(bytes)) =
                    (connection.sent_bytes, sockets.get(&connection.client))
                {
                    connection.sent_bytes = Some(bytes.from_client);
                    connection.received_bytes = Some(bytes.to_client);
                }
            }
        }
        Ok(Err(error)) => warn!(%error, "cannot read socket diagnostics; bytes are left out"),
        Err(error) => warn!(%error, "socket diagnostics task failed"),
    }
    connections
}

async fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    if let Some(maps) = state.maps.get() {
        let maps = maps.clone();
        // Walking a map's keys is a syscall per key: keep it off the runtime threads.
        match tokio::task::spawn_blocking(move || (maps.read(), maps.events.read())).await {
            Ok((usage, events)) => {
                state.metrics.set_map_usage(&usage);
                state.metrics.set_kernel_events(&events);
            }
            Err(error) => warn!(%error, "reading BPF map occupancy failed"),
        }
    }
    respond(StatusCode::OK, OPENMETRICS, state.metrics.encode().into())
}

/// `/explain?dest=ADDR:PORT[&sni=NAME|&host=NAME][&cgroup=PATH][&output=json]`: see
/// [`crate::explain`].
async fn explain(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let bad =
        |message: String| respond(StatusCode::BAD_REQUEST, TEXT, format!("{message}\n").into());
    let Some(context) = state.explain.get() else {
        return respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n".into());
    };
    let mut asked = crate::explain::Query {
        destination: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        name: None,
        cgroup: None,
        ipv6_proxy: state.proxy_addrs.iter().any(std::net::SocketAddr::is_ipv6),
        namespace: None,
    };
    let mut destination = None;
    let mut as_json = false;
    for (key, value) in crate::explain::query_pairs(query) {
        match key.as_str() {
            "dest" => match value.parse() {
                Ok(parsed) => destination = Some(parsed),
                Err(_) => return bad(format!("dest={value} is not ADDR:PORT")),
            },
            "sni" => asked.name = Some((crate::registry::HostKind::Sni, value)),
            "host" => asked.name = Some((crate::registry::HostKind::Http, value)),
            "cgroup" => match cgroup_path(&value)
                .and_then(|client| Ok((client, std::fs::canonicalize(&context.cgroup)?)))
            {
                Ok(cgroups) => asked.cgroup = Some(cgroups),
                Err(error) => return bad(format!("cgroup {value}: {error}")),
            },
            "output" => as_json = value == "json",
            other => return bad(format!("unknown parameter {other}")),
        }
    }
    let Some(destination) = destination else {
        return bad("dest=ADDR:PORT is required".into());
    };
    asked.destination = destination;
    asked.namespace = context.scope.as_ref().map(|scope| {
        asked
            .cgroup
            .as_ref()
            .and_then(|(client, _)| crate::pods::namespace_of(client, &scope.pods.pod_namespaces()))
            .unwrap_or_else(|| scope.host_namespace.clone())
    });
    let registry = state.registry.load_full();
    let first = crate::explain::explain(
        &registry,
        context.datapath,
        context.outbound_policy,
        &asked,
        &crate::datapath::Resolved::new(),
    );
    let resolved = crate::explain::lookups(first.hosts(), &context.dns).await;
    let explanation = crate::explain::explain(
        &registry,
        context.datapath,
        context.outbound_policy,
        &asked,
        &resolved,
    );
    if as_json {
        json(&explanation)
    } else {
        respond(
            StatusCode::OK,
            TEXT,
            crate::explain::render(&explanation).into(),
        )
    }
}

/// `/trace[?cgroup=PATH][&dest=CIDR][&port=N][&output=json]`: one line per traced
/// decision (see [`crate::trace`]), until the client goes away. The first line says
/// what is traced; once it is sent, the programs emit what the stream asked for.
fn trace(state: &AdminState, query: &str) -> Response<Body> {
    let bad = |message: String| {
        respond(StatusCode::BAD_REQUEST, TEXT, format!("{message}\n").into())
            .map(BodyExt::boxed_unsync)
    };
    let mut filter = trace::Filter::default();
    let mut as_json = false;
    for (key, value) in crate::explain::query_pairs(query) {
        match key.as_str() {
            "cgroup" => match cgroup_path(&value).and_then(|path| {
                trace::Cgroup::of(&path, &interceptor_common::host::cgroup2_root()?)
            }) {
                Ok(cgroup) => filter.cgroup = Some(cgroup),
                Err(error) => return bad(format!("cgroup {value}: {error}")),
            },
            "dest" => match parse_network(&value) {
                Some(net) => filter.dest = Some(net),
                None => return bad(format!("dest={value} is not an address or CIDR")),
            },
            "port" => match value.parse() {
                Ok(port) => filter.port = Some(port),
                Err(_) => return bad(format!("port={value} is not a port number")),
            },
            "output" => as_json = value == "json",
            other => return bad(format!("unknown parameter {other}")),
        }
    }
    let first = if as_json {
        let mut line = serde_json::json!({ "tracing": &filter }).to_string();
        line.push('\n');
        line
    } else {
        format!(
            "tracing {} (one line per decision; ^C to stop)\n",
            describe(&filter)
        )
    };
    let stream = state.tracer.subscribe(filter);
    let lines = futures_util::stream::unfold(
        (Some(first), stream),
        move |(first, mut stream)| async move {
            if let Some(first) = first {
                return Some((Ok(Frame::data(Bytes::from(first))), (None, stream)));
            }
            let chunk = match tokio::time::timeout(TRACE_HEARTBEAT, stream.next()).await {
                Err(_) => "\n".to_owned(),
                Ok(trace::Next::Closed) => return None,
                Ok(trace::Next::Lost(lost)) if as_json => {
                    format!("{}\n", serde_json::json!({ "lost": lost }))
                }
                Ok(trace::Next::Lost(lost)) => {
                    format!("({lost} lines lost: this stream fell behind)\n")
                }
                Ok(trace::Next::Line(line)) if as_json => {
                    let mut text = serde_json::to_string(&*line).unwrap_or_default();
                    text.push('\n');
                    text
                }
                Ok(trace::Next::Line(line)) => format!("{}\n", trace::render(&line)),
            };
            Some((Ok(Frame::data(Bytes::from(chunk))), (None, stream)))
        },
    );
    let mut response = Response::new(StreamBody::new(lines).boxed_unsync());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(if as_json {
            "application/x-ndjson"
        } else {
            TEXT
        }),
    );
    response
}

/// `ADDR` or `ADDR/LEN`.
fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    text.parse()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(Into::into))
}

/// What a trace stream shows, in words.
fn describe(filter: &trace::Filter) -> String {
    let mut parts = Vec::new();
    if let Some(cgroup) = &filter.cgroup {
        parts.push(format!(
            "connects from cgroup {} (id {}) and below",
            cgroup.path.display(),
            cgroup.id
        ));
    }
    if let Some(net) = filter.dest {
        parts.push(format!("to {net}"));
    }
    if let Some(port) = filter.port {
        parts.push(format!("to port {port}"));
    }
    if parts.is_empty() {
        "every decision".to_owned()
    } else {
        parts.join(", ")
    }
}

/// A cgroup as a path under the cgroup2 mount, or absolute.
fn cgroup_path(raw: &str) -> std::io::Result<PathBuf> {
    let path = PathBuf::from(raw);
    let path = if path.is_absolute() && path.exists() {
        path
    } else {
        interceptor_common::host::cgroup2_root()?.join(raw.trim_start_matches('/'))
    };
    std::fs::canonicalize(path)
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(StatusCode::OK, JSON, body.into())
        }
        Err(error) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("cannot serialize: {error}\n").into(),
        ),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
