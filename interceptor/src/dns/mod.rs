//! The DNS server: answers A and AAAA for ServiceEntry hosts from the registry, and
//! relays everything else to the upstream servers.
//!
//! Queries reach it on its own addresses, or, captured by the cgroup programs, on
//! their way to port 53. Each query is decided as a plain value
//! ([`packet::decide`]); only forwarding touches the network.

mod forward;
mod names;
pub mod packet;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use self::{
    forward::Forwarder,
    names::NameTable,
    packet::{Decision, Outcome},
};
use crate::{registry::Registry, reload::AllocationRequest};

/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long a lookup under a DYNAMIC_DNS wildcard waits for its VIPs (a reload)
/// before it is relayed instead, well within a stub resolver's 5 s.
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub outcome: &'static str,
}

/// The server's state, shared by its UDP and TCP tasks.
pub struct DnsServer {
    registry: Arc<ArcSwap<Registry>>,
    /// The name table and the snapshot it was built from: rebuilt on the first query
    /// after a reload swapped the snapshot, so a reload needs no step of its own here.
    names: ArcSwap<(Arc<Registry>, NameTable)>,
    search_domains: Vec<String>,
    forwarder: Forwarder,
    queries: Family<QueryLabels, Counter>,
    /// Where names under a DYNAMIC_DNS wildcard host go for VIPs of their own.
    allocations: Option<mpsc::Sender<AllocationRequest>>,
}

impl DnsServer {
    pub fn new(
        registry: Arc<ArcSwap<Registry>>,
        search_domains: Vec<String>,
        forwarder: Forwarder,
        queries: Family<QueryLabels, Counter>,
        allocations: Option<mpsc::Sender<AllocationRequest>>,
    ) -> Self {
        let snapshot = registry.load_full();
        let table = NameTable::build(&snapshot, &search_domains);
        DnsServer {
            registry,
            names: ArcSwap::from_pointee((snapshot, table)),
            search_domains,
            forwarder,
            queries,
            allocations,
        }
    }

    fn names(&self) -> Arc<(Arc<Registry>, NameTable)> {
        let names = self.names.load_full();
        let current = self.registry.load_full();
        if Arc::ptr_eq(&names.0, &current) {
            return names;
        }
        let table = NameTable::build(&current, &self.search_domains);
        let names = Arc::new((current, table));
        self.names.store(Arc::clone(&names));
        names
    }

    /// The reply to one query, or `None` when it gets none.
    pub async fn answer(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let mut decision = packet::decide(&self.names().1, query, udp);
        if let Decision::Allocate(name) = &decision {
            self.allocate(name).await;
            decision = packet::decide(&self.names().1, query, udp);
        }
        let (reply, outcome) = match decision {
            Decision::Reply { bytes, outcome } => (Some(bytes), outcome),
            Decision::Drop => (None, Outcome::Failed),
            // Still without VIPs (no address left, or the reload failed): upstream
            // may know the name.
            Decision::Forward | Decision::Allocate(_) => {
                match self.forwarder.forward(query, !udp).await {
                    Some(reply) if udp => (packet::fit_udp_reply(query, reply), Outcome::Forwarded),
                    Some(reply) => (Some(reply), Outcome::Forwarded),
                    None => (packet::servfail(query), Outcome::Failed),
                }
            }
        };
        self.queries
            .get_or_create(&QueryLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        reply
    }

    /// Asks for VIPs for `name` and waits until they are in the registry, or the
    /// attempt failed, or [`ALLOCATE_TIMEOUT`].
    async fn allocate(&self, name: &str) {
        let Some(allocations) = &self.allocations else {
            return;
        };
        let (done, tried) = oneshot::channel();
        let request = allocations.send((name.to_owned(), done));
        let _ = tokio::time::timeout(ALLOCATE_TIMEOUT, async {
            if request.await.is_ok() {
                let _ = tried.await;
            }
        })
        .await;
    }

    /// Serves UDP and TCP on `addr` until `shutdown`. Binding is done by the caller,
    /// so a port in use is an error at start.
    pub fn serve(self: &Arc<Self>, udp: UdpSocket, tcp: TcpListener, shutdown: CancellationToken) {
        let udp = Arc::new(udp);
        let server = Arc::clone(self);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; 65_535];
            loop {
                let (len, client) = tokio::select! {
                    () = stop.cancelled() => return,
                    received = udp.recv_from(&mut buffer) => match received {
                        Ok(received) => received,
                        Err(error) => {
                            debug!(%error, "DNS UDP receive failed");
                            continue;
                        }
                    },
                };
                let query = buffer[..len].to_vec();
                let server = Arc::clone(&server);
                let udp = Arc::clone(&udp);
                tokio::spawn(async move {
                    if let Some(reply) = server.answer(&query, true).await
                        && let Err(error) = udp.send_to(&reply, client).await
                    {
                        debug!(%client, %error, "DNS UDP reply failed");
                    }
                });
            }
        });
        let server = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let (stream, client) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = tcp.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            warn!(%error, "DNS TCP accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                tokio::spawn(Arc::clone(&server).serve_tcp(stream, client));
            }
        });
    }

    async fn serve_tcp(self: Arc<Self>, mut stream: TcpStream, client: SocketAddr) {
        loop {
            let query =
                match tokio::time::timeout(TCP_IDLE, forward::read_framed(&mut stream)).await {
                    Ok(Ok(Some(query))) => query,
                    Ok(Ok(None)) | Err(_) => return,
                    Ok(Err(error)) => {
                        debug!(%client, %error, "DNS TCP read failed");
                        return;
                    }
                };
            let Some(reply) = self.answer(&query, false).await else {
                return;
            };
            if forward::write_framed(&mut stream, &reply).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where the server listens; an IPv6 address on a host without IPv6 is skipped.
    pub listen: Vec<SocketAddr>,
    /// The container proxy addresses: the server listens there too, at the port of
    /// its listener of the same family, so that processes in other network
    /// namespaces, which cannot reach its loopback, get their queries answered.
    pub container_ips: Vec<IpAddr>,
    /// The upstream servers; empty means /etc/resolv.conf's.
    pub upstreams: Vec<SocketAddr>,
    pub bypass_mark: u32,
    /// How many names under DYNAMIC_DNS wildcards may get VIPs: each keeps a VIP
    /// pair for good, so clients asking for random names must not exhaust the range.
    pub wildcard_names: usize,
}

/// The addresses the server listens on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bound {
    pub listeners: Vec<SocketAddr>,
    /// Those on the container proxy addresses.
    pub containers: Vec<SocketAddr>,
}

/// Where the server listens for containers: each container address at the port of
/// the first bound listener of its family, or of any family if it has none.
fn container_listeners(bound: &[SocketAddr], container_ips: &[IpAddr]) -> Vec<SocketAddr> {
    container_ips
        .iter()
        .filter_map(|&ip| {
            let port = bound
                .iter()
                .find(|addr| addr.is_ipv4() == ip.is_ipv4())
                .or_else(|| bound.first())?
                .port();
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum DnsStartError {
    #[error("cannot read the system resolver configuration (/etc/resolv.conf)")]
    SystemConfig(#[source] hickory_resolver::net::NetError),
    #[error("the DNS server cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the listeners and serves until `shutdown`; returns the addresses bound.
pub fn start(
    config: &DnsConfig,
    registry: Arc<ArcSwap<Registry>>,
    queries: Family<QueryLabels, Counter>,
    allocations: mpsc::Sender<AllocationRequest>,
    shutdown: &CancellationToken,
) -> Result<Bound, DnsStartError> {
    let system = hickory_resolver::system_conf::read_system_conf();
    let search_domains: Vec<String> = match &system {
        Ok((resolver, _)) => resolver
            .search()
            .iter()
            .map(|name| name.to_ascii())
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut upstreams = config.upstreams.clone();
    if upstreams.is_empty() {
        let (resolver, _) = system.map_err(DnsStartError::SystemConfig)?;
        for server in resolver.name_servers() {
            let port = server
                .connections
                .first()
                .map_or(53, |connection| connection.port);
            let upstream = SocketAddr::new(server.ip, port);
            if !upstreams.contains(&upstream) {
                upstreams.push(upstream);
            }
        }
    }
    // Relaying to itself would loop until the deadline.
    upstreams.retain(|upstream| {
        !config.listen.contains(upstream) && !config.container_ips.contains(&upstream.ip())
    });
    let server = Arc::new(DnsServer::new(
        registry,
        search_domains,
        Forwarder {
            upstreams,
            bypass_mark: config.bypass_mark,
        },
        queries,
        Some(allocations),
    ));
    let mut bound = Bound::default();
    for &addr in &config.listen {
        match bind(addr) {
            Ok((udp, tcp)) => {
                bound.listeners.push(udp.local_addr().unwrap_or(addr));
                server.serve(udp, tcp, shutdown.clone());
            }
            Err(error) if addr.is_ipv6() && error.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                warn!(%addr, "no IPv6 on this host: the DNS server does not listen there");
            }
            Err(source) => return Err(DnsStartError::Listen { addr, source }),
        }
    }
    // A container address is one the operator named: failing to listen there is an
    // error, whatever its family.
    for addr in container_listeners(&bound.listeners, &config.container_ips) {
        let (udp, tcp) = bind(addr).map_err(|source| DnsStartError::Listen { addr, source })?;
        bound.listeners.push(addr);
        bound.containers.push(addr);
        server.serve(udp, tcp, shutdown.clone());
    }
    Ok(bound)
}

/// Binds UDP and TCP on one address, with SO_REUSEPORT: a daemon started next to a
/// running one (a restart without a gap) serves the same port at once.
pub fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |kind, protocol, addr: SocketAddr| -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        Ok(socket)
    };
    let udp = open(Type::DGRAM, Protocol::UDP, addr)?;
    // The same port for TCP, also when `addr` asked for any port.
    let bound = udp.local_addr()?.as_socket().unwrap_or(addr);
    let tcp = open(Type::STREAM, Protocol::TCP, bound)?;
    tcp.listen(1024)?;
    Ok((
        UdpSocket::from_std(udp.into())?,
        TcpListener::from_std(tcp.into())?,
    ))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::{
        op::{Message, Query, ResponseCode},
        rr::{Name, RData, Record, RecordType, rdata},
    };

    use super::*;
    use crate::registry::test_support::{config, entry};

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        message.to_vec().unwrap()
    }

    /// A real upstream on loopback that answers every query with one A record.
    async fn upstream() -> SocketAddr {
        let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = udp.local_addr().unwrap();
        let answer = |query: &[u8]| {
            let query = Message::from_vec(query).unwrap();
            let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
            reply.queries = query.queries.clone();
            reply.add_answer(Record::from_rdata(
                query.queries[0].name().clone(),
                60,
                RData::A(rdata::A(Ipv4Addr::new(198, 18, 9, 9))),
            ));
            reply.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buffer = vec![0; 4096];
            loop {
                let (len, from) = udp.recv_from(&mut buffer).await.unwrap();
                udp.send_to(&answer(&buffer[..len]), from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                while let Ok(Some(query)) = forward::read_framed(&mut stream).await {
                    forward::write_framed(&mut stream, &answer(&query))
                        .await
                        .unwrap();
                }
            }
        });
        addr
    }

    async fn server(upstreams: Vec<SocketAddr>) -> (SocketAddr, Arc<DnsServer>) {
        let (registry, _) = Registry::build(&config(&[&entry(
            "db",
            "  addresses: [240.240.5.1]\n  ports: [{number: 5432, name: tcp}]\n",
        )]))
        .unwrap();
        let server = Arc::new(DnsServer::new(
            Arc::new(ArcSwap::from_pointee(registry)),
            Vec::new(),
            Forwarder {
                upstreams,
                bypass_mark: 0,
            },
            Family::default(),
            None,
        ));
        let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = udp.local_addr().unwrap();
        server.serve(udp, tcp, CancellationToken::new());
        (addr, server)
    }

    async fn ask_udp(server: SocketAddr, query: &[u8]) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(query, server).await.unwrap();
        let mut buffer = vec![0; 65_535];
        let len = tokio::time::timeout(Duration::from_secs(6), socket.recv(&mut buffer))
            .await
            .expect("an answer within 6 s")
            .unwrap();
        Message::from_vec(&buffer[..len]).unwrap()
    }

    #[tokio::test]
    async fn local_names_are_answered_and_others_forwarded_over_udp_and_tcp() {
        let (addr, server) = server(vec![upstream().await]).await;
        let local = ask_udp(addr, &query("db.example.", RecordType::A)).await;
        assert!(local.metadata.authoritative);
        assert_eq!(
            local.answers[0].data,
            RData::A(rdata::A(Ipv4Addr::new(240, 240, 5, 1)))
        );
        let forwarded = ask_udp(addr, &query("else.example.", RecordType::A)).await;
        assert_eq!(
            forwarded.answers[0].data,
            RData::A(rdata::A(Ipv4Addr::new(198, 18, 9, 9)))
        );

        let mut stream = TcpStream::connect(addr).await.unwrap();
        for name in ["db.example.", "else.example."] {
            let query = query(name, RecordType::A);
            forward::write_framed(&mut stream, &query).await.unwrap();
            let reply = forward::read_framed(&mut stream).await.unwrap().unwrap();
            let reply = Message::from_vec(&reply).unwrap();
            assert_eq!(
                reply.metadata.id,
                Message::from_vec(&query).unwrap().metadata.id
            );
            assert_eq!(reply.answers.len(), 1, "{name}");
        }
        let count = |outcome| server.queries.get_or_create(&QueryLabels { outcome }).get();
        assert_eq!((count("local"), count("forwarded")), (2, 2));
    }

    #[tokio::test]
    async fn dead_upstreams_give_servfail_within_five_seconds() {
        // A bound socket that never answers, and a port with nothing on it.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (addr, _server) = server(vec![closed, silent.local_addr().unwrap()]).await;
        let started = std::time::Instant::now();
        let reply = ask_udp(addr, &query("else.example.", RecordType::A)).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn containers_are_served_at_the_port_of_their_family() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|addr| addr.parse().unwrap()).collect()
        };
        let ips = ["198.18.5.1".parse().unwrap(), "fd00:5::1".parse().unwrap()];
        assert_eq!(
            container_listeners(&addrs(&["127.0.0.1:15053", "[::1]:15054"]), &ips),
            addrs(&["198.18.5.1:15053", "[fd00:5::1]:15054"])
        );
        // Without an IPv6 listener (no IPv6 on the host), the IPv4 one's port.
        assert_eq!(
            container_listeners(&addrs(&["127.0.0.1:15053"]), &ips),
            addrs(&["198.18.5.1:15053", "[fd00:5::1]:15053"])
        );
        assert!(container_listeners(&[], &ips).is_empty());
    }

    #[tokio::test]
    async fn garbage_does_not_stop_the_server() {
        let (addr, _server) = server(vec![]).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(&[0xff; 5], addr).await.unwrap();
        let reply = ask_udp(addr, &query("db.example.", RecordType::A)).await;
        assert_eq!(reply.answers.len(), 1);
    }
}
