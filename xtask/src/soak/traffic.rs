//! The soak's clients: one or more threads per [`Class`], each opening connections
//! through the daemon until told to stop, verifying every byte that comes back, and
//! recording every failure with when the connection opened and when it failed.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    str::FromStr as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{
    backends::{
        ECHO_PORT, FLAKY_PORT, HOST_B, HTTP_PORT, NONE_PORT, ORIGIN_PORT, SINK_PORT, TLS_PORT,
    },
    config::{
        CAPTURE_HOST, CAPTURE_RESOLVER, DNS_VIP, HTTP_HOST, KERNEL_VIP, ORIGIN_VIP,
        PORT_ONLY_DESTINATION, STATIC_VIP, TLS_HOST,
    },
    model::{Class, FailKind, Failure, Fnv, payload},
};

/// No exchange may take longer: past it, a connection counts as hung. Longer than any
/// stall the faults cause, shorter than the daemon's drain.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// The whole of one bulk stream, which makes progress all along: shorter than the
/// daemon's drain too.
const BULK_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Sizes {
    pub bulk_bytes: u64,
    pub bulk_streams: usize,
    pub idle_connections: usize,
    /// Threads sharing the idle connections, each opening and closing its part: one
    /// thread alone falls behind at 10,000, and its connections then outlive the drain.
    pub idle_threads: usize,
    /// How long each idle connection stays open: shorter than the daemon's drain, so
    /// a handover never has to cut one.
    pub idle_lifetime: Duration,
    pub churn_threads: usize,
}

#[derive(Debug, Default, Clone)]
pub struct ClassTally {
    pub completed: u64,
    pub bytes_verified: u64,
    pub failures: Vec<Failure>,
    /// The kernel path's completed connections, (opened, closed) in seconds since the
    /// soak began: those open across a SIGKILL show that it has no proxy hop.
    pub spans: Vec<(f64, f64)>,
}

pub struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tally: Arc<Mutex<BTreeMap<Class, ClassTally>>>,
    /// Idle connections open now.
    pub idle_open: Arc<AtomicU64>,
}

struct Worker {
    class: Class,
    origin: Instant,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<BTreeMap<Class, ClassTally>>>,
    seed: u64,
}

impl Worker {
    fn seconds(&self, at: Instant) -> f64 {
        at.duration_since(self.origin).as_secs_f64()
    }

    fn next_seed(&mut self) -> u64 {
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.seed
    }

    fn record(&self, opened: Instant, result: Result<u64, Failed>) {
        let failed = result.is_err();
        {
            let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            let entry = tally.entry(self.class).or_default();
            record_in(entry, self, opened, result);
        }
        if failed {
            // As real clients back off, so a fault's tally counts attempts, not spins.
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn record_in(
    entry: &mut ClassTally,
    worker: &Worker,
    opened: Instant,
    result: Result<u64, Failed>,
) {
    let (class, start) = (worker.class, worker.seconds(opened));
    {
        match result {
            Ok(bytes) => {
                entry.completed += 1;
                entry.bytes_verified += bytes;
                if class == Class::Kernel {
                    entry.spans.push((start, worker.seconds(Instant::now())));
                }
            }
            Err(failed) => entry.failures.push(Failure {
                class,
                kind: failed.kind,
                start,
                end: worker.seconds(Instant::now()),
                detail: failed.detail,
            }),
        }
    }
}

#[derive(Debug)]
struct Failed {
    kind: FailKind,
    detail: String,
}

impl From<io::Error> for Failed {
    fn from(error: io::Error) -> Self {
        Self {
            kind: FailKind::of(&error),
            detail: error.to_string(),
        }
    }
}

fn corrupt(detail: String) -> Failed {
    Failed {
        kind: FailKind::Corrupt,
        detail,
    }
}

impl Traffic {
    pub fn start(origin: Instant, sizes: &Sizes) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(BTreeMap::new()));
        let idle_open = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut seed = 1u64;
        for class in Class::ALL {
            let copies = match class {
                Class::Bulk => sizes.bulk_streams,
                Class::Churn => sizes.churn_threads,
                Class::Idle => sizes.idle_threads,
                _ => 1,
            };
            for copy in 0..copies {
                seed += 1;
                let mut worker = Worker {
                    class,
                    origin,
                    stop: Arc::clone(&stop),
                    tally: Arc::clone(&tally),
                    seed: seed << 32,
                };
                let sizes = sizes.clone();
                let idle_open = Arc::clone(&idle_open);
                let thread = thread::Builder::new()
                    .name(format!("soak-{class:?}-{copy}").to_lowercase())
                    .spawn(move || run(&mut worker, &sizes, &idle_open))
                    .expect("spawning a soak client thread");
                threads.push(thread);
            }
        }
        Self {
            stop,
            threads,
            tally,
            idle_open,
        }
    }

    /// Stops every client after its current exchange and returns the tallies.
    pub fn finish(self) -> BTreeMap<Class, ClassTally> {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            let _ = thread.join();
        }
        let tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        tally.clone()
    }
}

fn run(worker: &mut Worker, sizes: &Sizes, idle_open: &AtomicU64) {
    match worker.class {
        Class::Idle => idle(worker, sizes, idle_open),
        Class::RequestResponse | Class::Flaky | Class::Kernel => persistent(worker),
        Class::DnsCapture => dns_capture(worker),
        _ => {
            while !worker.stopping() {
                let opened = Instant::now();
                let seed = worker.next_seed();
                let result = one_shot(worker.class, seed, sizes);
                worker.record(opened, result);
                if worker.class != Class::Churn && worker.class != Class::Bulk {
                    // The other classes are for variety, not load.
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream, Failed> {
    let stream = TcpStream::connect_timeout(&addr, DEADLINE)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_write_timeout(Some(DEADLINE))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes `prefix` and `size` bytes of the connection's payload, and checks that the
/// echo brings back exactly those bytes.
fn echo(stream: &mut TcpStream, prefix: &[u8], seed: u64, size: usize) -> Result<u64, Failed> {
    let mut sent = prefix.to_vec();
    let start = sent.len();
    sent.resize(start + size, 0);
    payload(seed, 0, &mut sent[start..]);
    stream.write_all(&sent)?;
    let mut received = vec![0u8; sent.len()];
    stream.read_exact(&mut received)?;
    if received != sent {
        let at = received.iter().zip(&sent).position(|(a, b)| a != b);
        return Err(corrupt(format!(
            "echo of {} bytes differs first at byte {at:?}",
            sent.len()
        )));
    }
    Ok(sent.len() as u64)
}

/// A connection opened, used once and closed.
fn one_shot(class: Class, seed: u64, sizes: &Sizes) -> Result<u64, Failed> {
    match class {
        Class::Bulk => bulk(seed, sizes.bulk_bytes),
        Class::Churn => {
            let mut stream = connect(SocketAddr::new(STATIC_VIP.into(), ECHO_PORT))?;
            echo(&mut stream, &[], seed, 64)
        }
        Class::TlsSni => {
            let mut stream = connect(SocketAddr::new(PORT_ONLY_DESTINATION.into(), TLS_PORT))?;
            echo(&mut stream, &client_hello(TLS_HOST), seed, 4096)
        }
        Class::HttpHost => {
            let mut stream = connect(SocketAddr::new(PORT_ONLY_DESTINATION.into(), HTTP_PORT))?;
            let head =
                format!("POST /soak HTTP/1.1\r\nHost: {HTTP_HOST}\r\nContent-Length: 4096\r\n\r\n");
            echo(&mut stream, head.as_bytes(), seed, 4096)
        }
        Class::Dns => {
            let mut stream = connect(SocketAddr::new(DNS_VIP.into(), ECHO_PORT))?;
            echo(&mut stream, &[], seed, 1024)
        }
        Class::None => {
            let mut stream = connect(SocketAddr::new(HOST_B.into(), NONE_PORT))?;
            echo(&mut stream, &[], seed, 1024)
        }
        // The origin answers only over TLS with the right SNI: an echo that comes
        // back shows the proxy originated it.
        Class::TlsOrigination => {
            let mut stream = connect(SocketAddr::new(ORIGIN_VIP.into(), ORIGIN_PORT))?;
            echo(&mut stream, &[], seed, 4096)
        }
        Class::RequestResponse | Class::Flaky | Class::Idle | Class::Kernel | Class::DnsCapture => {
            unreachable!("{class:?} keeps its connections or state")
        }
    }
}

/// `bytes` of payload to the sink, whose answer must name the same count and checksum.
fn bulk(seed: u64, bytes: u64) -> Result<u64, Failed> {
    let started = Instant::now();
    let mut stream = connect(SocketAddr::new(STATIC_VIP.into(), SINK_PORT))?;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut checksum = Fnv::default();
    let mut offset = 0u64;
    while offset < bytes {
        let chunk = (bytes - offset).min(buffer.len() as u64) as usize;
        payload(seed, offset, &mut buffer[..chunk]);
        checksum.update(&buffer[..chunk]);
        stream.write_all(&buffer[..chunk])?;
        offset += chunk as u64;
        if started.elapsed() > BULK_DEADLINE {
            return Err(Failed {
                kind: FailKind::Hung,
                detail: format!("sent only {offset} of {bytes} bytes within {BULK_DEADLINE:?}"),
            });
        }
    }
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let expected = format!("OK {bytes} {:016x}\n", checksum.0);
    if answer.is_empty() {
        return Err(Failed {
            kind: FailKind::EarlyEof,
            detail: "the sink closed without an answer".into(),
        });
    }
    if answer != expected {
        return Err(corrupt(format!(
            "the sink answered {answer:?}, expected {expected:?}"
        )));
    }
    Ok(bytes)
}

/// Round trips on one connection for a few seconds, then a new connection. A
/// connection never outlives the daemon's drain.
fn persistent(worker: &mut Worker) {
    // The kernel path's connections live longer and pause between round trips, so
    // that some are open across each SIGKILL without spinning a CPU.
    let (vip, port, size, lifetime, pause) = match worker.class {
        Class::Flaky => (STATIC_VIP, FLAKY_PORT, 4096, 3, None),
        Class::Kernel => (
            KERNEL_VIP,
            ECHO_PORT,
            1024,
            6,
            Some(Duration::from_millis(20)),
        ),
        _ => (STATIC_VIP, ECHO_PORT, 1024, 3, None),
    };
    let addr = SocketAddr::new(vip.into(), port);
    while !worker.stopping() {
        let opened = Instant::now();
        let result = (|| {
            let mut stream = connect(addr)?;
            if worker.class == Class::Kernel {
                // getpeername answers the VIP the application dialled, not the
                // endpoint connect4 rewrote it to.
                let peer = stream.peer_addr()?;
                if peer != addr {
                    return Err(Failed {
                        kind: FailKind::WrongPeer,
                        detail: format!("getpeername answered {peer}, not {addr}"),
                    });
                }
            }
            let mut bytes = 0;
            while opened.elapsed() < Duration::from_secs(lifetime) && !worker.stopping() {
                let seed = worker.next_seed();
                bytes += echo(&mut stream, &[], seed, size)?;
                if let Some(pause) = pause {
                    thread::sleep(pause);
                }
            }
            Ok(bytes)
        })();
        worker.record(opened, result);
    }
}

/// As a stub resolver does: an A query for [`CAPTURE_HOST`] to a port-53 server
/// (which the programs take to the daemon), then one exchange with the VIP it
/// answers. The VIP is allocated once and kept in the state file, so every answer,
/// across every restart, must name the first one.
fn dns_capture(worker: &mut Worker) {
    let mut first: Option<Ipv4Addr> = None;
    while !worker.stopping() {
        let opened = Instant::now();
        let seed = worker.next_seed();
        let result = resolve(CAPTURE_HOST).and_then(|vip| {
            let first = *first.get_or_insert(vip);
            if vip != first {
                return Err(corrupt(format!(
                    "{CAPTURE_HOST} moved from {first} to {vip}"
                )));
            }
            let mut stream = connect(SocketAddr::new(vip.into(), ECHO_PORT))?;
            echo(&mut stream, &[], seed, 1024)
        });
        worker.record(opened, result);
        thread::sleep(Duration::from_millis(5));
    }
}

/// One UDP A query, tried twice with a second's timeout each, as glibc's resolver
/// does by default; returns the first A record.
fn resolve(host: &str) -> Result<Ipv4Addr, Failed> {
    use hickory_proto::{
        op::{Message, Query, ResponseCode},
        rr::{Name, RData, RecordType},
    };
    let name = Name::from_str(&format!("{host}.")).map_err(|error| Failed {
        kind: FailKind::Other,
        detail: format!("{host}: {error}"),
    })?;
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name, RecordType::A));
    let id = query.metadata.id;
    let wire = query.to_vec().map_err(|error| Failed {
        kind: FailKind::Other,
        detail: format!("encoding a query: {error}"),
    })?;
    let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))?;
    socket.connect(CAPTURE_RESOLVER)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buffer = [0u8; 1500];
    for _ in 0..2 {
        socket.send(&wire)?;
        let length = match socket.recv(&mut buffer) {
            Ok(length) => length,
            Err(error) if FailKind::of(&error) == FailKind::Hung => continue,
            Err(error) => return Err(error.into()),
        };
        let answer = Message::from_vec(&buffer[..length])
            .map_err(|error| corrupt(format!("an answer that does not parse: {error}")))?;
        if answer.metadata.id != id {
            continue;
        }
        let vip = answer.answers.iter().find_map(|record| match &record.data {
            RData::A(a) => Some(a.0),
            _ => None,
        });
        return match (answer.metadata.response_code, vip) {
            (ResponseCode::NoError, Some(vip)) => Ok(vip),
            (code, _) => Err(Failed {
                kind: FailKind::NoAnswer,
                detail: format!("{host} answered {code} without an A record"),
            }),
        };
    }
    Err(Failed {
        kind: FailKind::Hung,
        detail: format!("no answer for {host} from {CAPTURE_RESOLVER} in two tries"),
    })
}

/// Holds up to `idle_connections` connections, each pinged when it opens and again
/// before it closes at the end of its lifetime.
fn idle(worker: &mut Worker, sizes: &Sizes, idle_open: &AtomicU64) {
    let addr = SocketAddr::new(STATIC_VIP.into(), ECHO_PORT);
    let share = sizes.idle_connections / sizes.idle_threads.max(1);
    let mut open: VecDeque<(Instant, u64, TcpStream)> = VecDeque::new();
    // Spread opening over a lifetime, so that closes are spread too.
    let interval = sizes.idle_lifetime / share.max(1) as u32;
    let mut next_open = Instant::now();
    while !worker.stopping() {
        let now = Instant::now();
        if let Some((opened, _, _)) = open.front()
            && now.duration_since(*opened) >= sizes.idle_lifetime
        {
            let (opened, seed, mut stream) = open.pop_front().expect("front exists");
            idle_open.fetch_sub(1, Ordering::Relaxed);
            let result = echo(&mut stream, &[], seed, 16);
            worker.record(opened, result);
        } else if open.len() < share && now >= next_open {
            next_open += interval;
            let seed = worker.next_seed();
            let opened = Instant::now();
            match connect(addr).and_then(|mut stream| {
                echo(&mut stream, &[], seed, 16)?;
                Ok(stream)
            }) {
                Ok(stream) => {
                    open.push_back((opened, seed, stream));
                    idle_open.fetch_add(1, Ordering::Relaxed);
                }
                Err(failed) => worker.record(opened, Err(failed)),
            }
        } else {
            thread::sleep(Duration::from_millis(2).min(interval));
        }
    }
    // The last ones close early, still verified.
    for (opened, seed, mut stream) in open {
        idle_open.fetch_sub(1, Ordering::Relaxed);
        let result = echo(&mut stream, &[], seed, 16);
        worker.record(opened, result);
    }
}

/// A minimal TLS 1.2 ClientHello record naming `host` in its SNI extension: all the
/// proxy reads before it forwards the bytes unchanged.
fn client_hello(host: &str) -> Vec<u8> {
    let name = host.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut extensions = vec![0, 0];
    extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}
