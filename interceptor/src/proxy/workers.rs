//! The proxy's worker threads: each runs its own single-threaded runtime and accepts
//! on its own listener, all bound to the proxy address with SO_REUSEPORT, so the
//! kernel spreads new connections over the threads and a connection stays on the
//! thread that accepted it (as in Envoy and HAProxy).
//!
//! Nothing moves between threads on the per-connection path, which costs the proxy
//! less CPU per round trip than one work-stealing runtime with one accept loop.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
    thread::{self, JoinHandle},
    time::Duration,
};

use nix::errno::Errno;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use super::{Shared, busy_poll, port_claim::PortClaim, serve};

/// Pending connections each listener holds before the kernel refuses more.
const BACKLOG: i32 = 4096;

/// The proxy's listening sockets: one per worker on the IPv4 address, and one per
/// worker on each of the IPv6 address and the addresses for containers it has.
pub struct ProxyListeners {
    pub v4: SocketAddrV4,
    pub v6: Option<SocketAddrV6>,
    pub containers: ContainerAddrs,
    per_worker: Vec<Vec<std::net::TcpListener>>,
    /// Held while any worker accepts: a daemon started during this one's drain may
    /// take the port back.
    claims: Arc<Vec<PortClaim>>,
}

/// Where connects from other network namespaces (containers) go, per family.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContainerAddrs {
    pub v4: Option<SocketAddrV4>,
    pub v6: Option<SocketAddrV6>,
}

impl ProxyListeners {
    /// Binds both families. If IPv6 is unavailable on this host (disabled, or no
    /// ::1), the proxy runs without its IPv6 listener and native IPv6 connects stay
    /// direct. An error names the address that could not be bound.
    pub fn bind(
        v4: SocketAddrV4,
        v6: Option<SocketAddrV6>,
        containers: ContainerAddrs,
        workers: usize,
    ) -> Result<Self, (SocketAddr, io::Error)> {
        let mut claims = Vec::new();
        let v4_bound = bind(v4.into(), workers).map_err(|error| (v4.into(), error))?;
        let SocketAddr::V4(v4) = v4_bound.addr else {
            unreachable!("bound to an IPv4 address")
        };
        let v4_listeners = v4_bound.take(&mut claims);
        let (v6_listeners, v6) = match v6 {
            None => (Vec::new(), None),
            Some(addr) => match bind(addr.into(), workers) {
                Ok(bound) => {
                    let SocketAddr::V6(bound_addr) = bound.addr else {
                        unreachable!("bound to an IPv6 address")
                    };
                    (bound.take(&mut claims), Some(bound_addr))
                }
                Err(error) if ipv6_unavailable(&error) => {
                    warn!(
                        %addr, %error,
                        "IPv6 is unavailable: native IPv6 destinations are not intercepted"
                    );
                    (Vec::new(), None)
                }
                Err(error) => return Err((addr.into(), error)),
            },
        };
        let (container_v4_listeners, container_v4) =
            bind_optional(containers.v4.map(Into::into), workers, &mut claims)?;
        let (container_v6_listeners, container_v6) =
            bind_optional(containers.v6.map(Into::into), workers, &mut claims)?;
        let mut others =
            [v6_listeners, container_v4_listeners, container_v6_listeners].map(Vec::into_iter);
        let per_worker = v4_listeners
            .into_iter()
            .map(|listener| {
                let mut listeners = vec![listener];
                listeners.extend(others.iter_mut().filter_map(Iterator::next));
                listeners
            })
            .collect();
        Ok(Self {
            v4,
            v6,
            containers: ContainerAddrs {
                v4: container_v4.map(|addr| match addr {
                    SocketAddr::V4(addr) => addr,
                    SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
                }),
                v6: container_v6.map(|addr| match addr {
                    SocketAddr::V6(addr) => addr,
                    SocketAddr::V4(_) => unreachable!("bound to an IPv6 address"),
                }),
            },
            per_worker,
            claims: Arc::new(claims),
        })
    }

    /// Listening sockets over all workers.
    pub fn count(&self) -> usize {
        self.per_worker.iter().map(Vec::len).sum()
    }

    /// Every address the proxy listens on.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(SocketAddr::V4(self.v4))
            .chain(self.v6.map(SocketAddr::V6))
            .chain(self.containers.v4.map(SocketAddr::V4))
            .chain(self.containers.v6.map(SocketAddr::V6))
            .collect()
    }
}

/// Listeners on `addr` if there is one; unlike the proxy's own IPv6 address, an
/// address given for containers must be bound.
fn bind_optional(
    addr: Option<SocketAddr>,
    workers: usize,
    claims: &mut Vec<PortClaim>,
) -> Result<(Vec<std::net::TcpListener>, Option<SocketAddr>), (SocketAddr, io::Error)> {
    match addr {
        None => Ok((Vec::new(), None)),
        Some(addr) => bind(addr, workers)
            .map(|bound| {
                let bound_addr = bound.addr;
                (bound.take(claims), Some(bound_addr))
            })
            .map_err(|error| (addr, error)),
    }
}

fn ipv6_unavailable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::EADDRNOTAVAIL | Errno::EAFNOSUPPORT)
    )
}

/// One listener per worker on `addr`, TCP_NODELAY inherited by accepted sockets.
/// Returns them with the address they listen on.
///
/// If another process (a previous interceptor, still draining or not yet stopped)
/// listens on `addr`, or another interceptor has claimed it ([`PortClaim`]), the
/// listeners take the port after it on the same IP. Each
/// daemon's programs redirect to its own port and keep their records in its own
/// maps, so two daemons never receive each other's connections: the one attached
/// first keeps redirecting, and the newer one takes over the moment the older one
/// detaches, which makes "start the new one, then stop the old one" a restart without
/// a gap. Successive restarts alternate between the two ports, which a firewall or an
/// egress NetworkPolicy can allow; a third port could be anything, which they would
/// not, so with both taken the daemon refuses to start (and a rolling update waits
/// with the old daemon still serving).
fn bind(addr: SocketAddr, workers: usize) -> io::Result<Bound> {
    let (addr, claim) = if addr.port() == 0 {
        (addr, None)
    } else if let Some(claim) = claim_if_free(addr)? {
        (addr, claim)
    } else {
        let next = addr
            .port()
            .checked_add(1)
            .map(|port| SocketAddr::new(addr.ip(), port));
        let claimed_next = match next {
            Some(next) => claim_if_free(next)?.map(|claim| (next, claim)),
            None => None,
        };
        match claimed_next {
            Some((next, claim)) => {
                warn!(
                    taken = %addr,
                    addr = %next,
                    "the proxy address is in use (a previous interceptor?); listening on the \
                     port after it: this daemon redirects there once the other one detaches"
                );
                (next, claim)
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "it and the port after it are both in use (two interceptors running \
                     already?); a restart without a gap alternates between these two \
                     ports, so stop one of them first",
                ));
            }
        }
    };
    let first = reuseport_listener(addr)?;
    // With port 0 the first listener picked the port; the others join it.
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers.max(1) {
        listeners.push(reuseport_listener(addr)?);
    }
    Ok(Bound {
        listeners,
        addr,
        claim,
    })
}

/// The listeners on one proxy address, and this daemon's claim on it.
struct Bound {
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    claim: Option<PortClaim>,
}

impl Bound {
    /// The listeners; the claim joins the others this daemon holds.
    fn take(self, claims: &mut Vec<PortClaim>) -> Vec<std::net::TcpListener> {
        claims.extend(self.claim);
        self.listeners
    }
}

/// `Some` if this daemon may listen on `addr`: nothing listens there and no other
/// interceptor claims it. The claim comes first, so of two daemons starting at once
/// only one can pass; the listen check then covers other programs, and interceptors
/// from before claims existed. The inner `None` is an address used without a claim,
/// on a host where abstract unix sockets are denied (the check alone still applies).
fn claim_if_free(addr: SocketAddr) -> io::Result<Option<Option<PortClaim>>> {
    let claim = match PortClaim::take(addr) {
        Ok(Some(claim)) => Some(claim),
        Ok(None) => return Ok(None),
        Err(error) => {
            warn!(%addr, %error, "cannot claim the proxy address; relying on the listen check alone");
            None
        }
    };
    Ok(is_free(addr)?.then_some(claim))
}

/// SO_REUSEPORT alone would let a second daemon join another's port and receive
/// connections whose records live in the first one's maps; a plain bind tells
/// whether anything listens there.
fn is_free(addr: SocketAddr) -> io::Result<bool> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => Ok(false),
        Err(error) => Err(error),
    }
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_cloexec(true)?;
    if addr.is_ipv6() {
        // The IPv4 listener takes IPv4 and dual-stack clients; this one only native IPv6.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Linux copies it to every accepted socket: a system call less per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    #[error("building a worker's runtime")]
    Runtime(#[source] io::Error),
    #[error("starting a worker thread")]
    Spawn(#[source] io::Error),
}

/// The running worker threads.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    /// One message per worker whose accept loop has returned.
    stopped_accepting: mpsc::UnboundedReceiver<()>,
    /// Cancelled once the connections are drained (or given up on): each worker then
    /// drops its runtime, closing whatever connections it still holds.
    release: CancellationToken,
}

/// Starts one worker per IPv4 listener, which also accepts on one IPv6 listener. Each
/// accepts until `shutdown` fires and runs its connections on `connections`, so the
/// caller can wait for them to drain.
pub fn start(
    listeners: ProxyListeners,
    busy_poll: Duration,
    shared: &Arc<Shared>,
    connections: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Workers, WorkersError> {
    let (stopped_sender, stopped_accepting) = mpsc::unbounded_channel();
    let release = CancellationToken::new();
    let group = busy_poll::SpinGroup::new();
    let runtimes = (0..listeners.per_worker.len())
        .map(|index| {
            let spun = shared.connections.metrics().busy_poll_spin.clone();
            busy_poll::worker_runtime(busy_poll, spun, Arc::clone(&group), index)
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(WorkersError::Runtime)?;
    group.join(
        runtimes
            .iter()
            .map(|runtime| runtime.handle().clone())
            .collect(),
    );
    let mut threads = Vec::with_capacity(runtimes.len());
    for (index, (runtime, worker_listeners)) in
        runtimes.into_iter().zip(listeners.per_worker).enumerate()
    {
        let shared = Arc::clone(shared);
        let connections = connections.clone();
        let shutdown = shutdown.clone();
        let release = release.clone();
        let stopped = stopped_sender.clone();
        let claims = Arc::clone(&listeners.claims);
        let thread = thread::Builder::new()
            .name(format!("proxy-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // Ends with the runtime, when the thread does.
                    tokio::spawn(keep_next_wake_near());
                    // A task per listener, so an accept on one never polls the other.
                    let accept_loops: Vec<_> = worker_listeners
                        .into_iter()
                        .filter_map(|listener| match TcpListener::from_std(listener) {
                            Ok(listener) => Some(tokio::spawn(serve(
                                listener,
                                Arc::clone(&shared),
                                connections.clone(),
                                shutdown.clone(),
                            ))),
                            Err(error) => {
                                error!(%error, "worker cannot use its listener");
                                None
                            }
                        })
                        .collect();
                    for accept_loop in accept_loops {
                        let _ = accept_loop.await;
                    }
                    drop(claims);
                    let _ = stopped.send(());
                    release.cancelled().await;
                });
            })
            .map_err(WorkersError::Spawn)?;
        threads.push(thread);
    }
    info!(workers = threads.len(), "proxy workers started");
    Ok(Workers {
        threads,
        stopped_accepting,
        release,
    })
}

/// How far ahead a worker's time driver may plan its next wake.
const NEXT_WAKE_HORIZON: Duration = Duration::from_secs(1);

/// tokio writes to a runtime's eventfd whenever a timer is armed earlier than the
/// wake its time driver last planned, so that a parked thread would re-plan. With no
/// timer pending the plan is "never", and every connect timeout a busy worker arms
/// (one per connection) costs that write, and a spurious return from epoll_wait
/// later. A timer that always fires within a second keeps the planned wake earlier
/// than any connect deadline, for one wake-up a second when idle.
async fn keep_next_wake_near() {
    loop {
        tokio::time::sleep(NEXT_WAKE_HORIZON).await;
    }
}

impl Workers {
    /// Returns once every worker has stopped accepting (after `shutdown` fired).
    pub async fn stopped_accepting(&mut self) {
        for _ in 0..self.threads.len() {
            // None: a worker is gone without saying so (it panicked), and so are
            // the others' senders only once all are; either way nobody accepts.
            if self.stopped_accepting.recv().await.is_none() {
                break;
            }
        }
    }

    /// Ends the workers, dropping any connection still open, and waits for them.
    pub async fn finish(self) {
        self.release.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}
