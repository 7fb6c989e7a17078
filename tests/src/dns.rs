//! A real DNS server on loopback for the DNS tests: UDP and TCP on one port, real
//! wire format (hickory-proto), records the test changes while the daemon runs, and a
//! silent mode that makes every query time out. Also a stub resolver's two ways of
//! asking ([`ask_udp`], [`ask_tcp`]) for tests that need the whole reply.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    str::FromStr as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

/// How long [`ask_udp`] and [`ask_tcp`] wait for a reply, and how often UDP sends:
/// glibc's defaults (resolv.conf `timeout:5 attempts:2`). Past the daemon's 4.5 s
/// forwarding deadline, so a SERVFAIL is seen as one rather than as a timeout.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
const UDP_ATTEMPTS: usize = 2;

#[derive(Default)]
struct Zone {
    /// Name (lower case, no trailing dot) → (addresses, TTL in seconds).
    records: HashMap<String, (Vec<IpAddr>, u32)>,
    queries: HashMap<String, usize>,
    /// Those of `queries` that came over TCP.
    tcp_queries: HashMap<String, usize>,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    silent: Arc<AtomicBool>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// A server on a given address, such as a test host's port 53.
    pub fn start_on(addr: SocketAddr) -> Self {
        let socket = UdpSocket::bind(addr).expect("bind DNS socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local addr");
        // The same port for TCP, as a nameserver has.
        let tcp = TcpListener::bind(addr).expect("bind DNS TCP listener");
        tcp.set_nonblocking(true).expect("non-blocking listener");
        let zone = Arc::new(Mutex::new(Zone::default()));
        let silent = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (thread_zone, thread_silent, thread_stop, thread_delay) = (
            Arc::clone(&zone),
            Arc::clone(&silent),
            Arc::clone(&stop),
            Arc::clone(&delay_ms),
        );
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while !thread_stop.load(Ordering::SeqCst) {
                let Ok((length, peer)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                if thread_silent.load(Ordering::SeqCst) {
                    continue;
                }
                let delay = thread_delay.load(Ordering::SeqCst);
                if delay > 0 {
                    std::thread::sleep(Duration::from_millis(delay));
                }
                if let Some(answer) = answer(&thread_zone, &buffer[..length], false) {
                    let _ = socket.send_to(&answer, peer);
                }
            }
        });
        let (thread_zone, thread_silent, thread_stop) =
            (Arc::clone(&zone), Arc::clone(&silent), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !thread_stop.load(Ordering::SeqCst) {
                let Ok((stream, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (zone, silent) = (Arc::clone(&thread_zone), Arc::clone(&thread_silent));
                std::thread::spawn(move || serve_tcp(stream, &zone, &silent));
            }
        });
        Self {
            addr,
            zone,
            silent,
            delay_ms,
            stop,
        }
    }

    /// Sets the A/AAAA records of `name`, replacing what it had.
    pub fn set(&self, name: &str, addresses: &[&str], ttl: u32) {
        let addresses = addresses.iter().map(|a| a.parse().expect("IP")).collect();
        self.zone
            .lock()
            .unwrap()
            .records
            .insert(name.trim_end_matches('.').to_lowercase(), (addresses, ttl));
    }

    /// Makes `name` answer NXDOMAIN.
    pub fn remove(&self, name: &str) {
        self.zone.lock().unwrap().records.remove(name);
    }

    /// While silent, the server reads queries and answers none.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }

    /// Answers every query only after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many queries for `name` came, over either transport.
    pub fn queries(&self, name: &str) -> usize {
        self.zone
            .lock()
            .unwrap()
            .queries
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// How many queries for `name` came over TCP.
    pub fn tcp_queries(&self, name: &str) -> usize {
        self.zone
            .lock()
            .unwrap()
            .tcp_queries
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

/// Answers the queries of one TCP client until it closes (RFC 1035 4.2.2 framing).
fn serve_tcp(mut stream: TcpStream, zone: &Mutex<Zone>, silent: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    while let Ok(query) = read_framed(&mut stream) {
        if silent.load(Ordering::SeqCst) {
            continue;
        }
        let Some(answer) = answer(zone, &query, true) else {
            return;
        };
        if write_framed(&mut stream, &answer).is_err() {
            return;
        }
    }
}

fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut length = [0; 2];
    stream.read_exact(&mut length)?;
    let mut message = vec![0; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut message)?;
    Ok(message)
}

fn write_framed(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let mut framed = u16::try_from(message.len())
        .expect("a DNS message under 64 KiB")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed)
}

/// A recursive query for `name` (a trailing dot is added).
fn query(name: &str, kind: RecordType) -> Message {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    let name = Name::from_str(&format!("{}.", name.trim_end_matches('.'))).expect("a DNS name");
    query.add_query(Query::query(name, kind));
    query
}

/// Asks `nameserver` over UDP from a connected socket, as glibc does (sending again
/// after a timeout, as a datagram may be lost), and returns the reply, checked to be
/// for this query and to come from `nameserver`, as every stub resolver checks.
pub fn ask_udp(nameserver: SocketAddr, name: &str, kind: RecordType) -> std::io::Result<Message> {
    let query = query(name, kind);
    let wire = query.to_vec().map_err(std::io::Error::other)?;
    let bind: SocketAddr = if nameserver.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("an address");
    let socket = UdpSocket::bind(bind)?;
    socket.connect(nameserver)?;
    socket.set_read_timeout(Some(ASK_TIMEOUT))?;
    let mut buffer = [0u8; 65_535];
    let mut last_error = None;
    for _ in 0..UDP_ATTEMPTS {
        socket.send(&wire)?;
        match socket.recv_from(&mut buffer) {
            Ok((_, from)) if from != nameserver => {
                return Err(std::io::Error::other(format!(
                    "the reply came from {from}, not {nameserver}"
                )));
            }
            Ok((length, _)) => return reply_to(&query, &buffer[..length]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                last_error = Some(error);
            }
            Err(error) => return Err(error),
        }
    }
    Err(last_error.expect("at least one attempt"))
}

/// Asks `nameserver` over TCP, as a resolver does after a truncated UDP answer,
/// checking that the socket shows `nameserver` as its peer.
pub fn ask_tcp(nameserver: SocketAddr, name: &str, kind: RecordType) -> std::io::Result<Message> {
    let query = query(name, kind);
    let mut stream = TcpStream::connect_timeout(&nameserver, ASK_TIMEOUT)?;
    stream.set_read_timeout(Some(ASK_TIMEOUT))?;
    // A resolver may check whom it is connected to, as it checks a reply's source.
    let peer = stream.peer_addr()?;
    if peer != nameserver {
        return Err(std::io::Error::other(format!(
            "connected to {peer}, not {nameserver}"
        )));
    }
    write_framed(&mut stream, &query.to_vec().map_err(std::io::Error::other)?)?;
    reply_to(&query, &read_framed(&mut stream)?)
}

fn reply_to(query: &Message, reply: &[u8]) -> std::io::Result<Message> {
    let reply = Message::from_vec(reply).map_err(std::io::Error::other)?;
    if reply.metadata.id != query.metadata.id {
        return Err(std::io::Error::other("a reply to another query"));
    }
    Ok(reply)
}

/// The A records of a reply.
pub fn ipv4_answers(reply: &Message) -> Vec<std::net::Ipv4Addr> {
    reply
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn answer(zone: &Mutex<Zone>, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let name = question
        .name()
        .to_string()
        .trim_end_matches('.')
        .to_lowercase();
    let mut zone = zone.lock().unwrap();
    *zone.queries.entry(name.clone()).or_default() += 1;
    if tcp {
        *zone.tcp_queries.entry(name.clone()).or_default() += 1;
    }
    let mut response = match zone.records.get(&name) {
        None => Message::error_msg(request.metadata.id, OpCode::Query, ResponseCode::NXDomain),
        Some((addresses, ttl)) => {
            let mut response = Message::response(request.metadata.id, OpCode::Query);
            let owner = Name::from_str(&format!("{name}.")).ok()?;
            for address in addresses {
                let data = match (address, question.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*v6)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(owner.clone(), *ttl, data));
            }
            response
        }
    };
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(question);
    response.to_vec().ok()
}
