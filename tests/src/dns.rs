//! A real DNS server on loopback for the DNS tests: UDP, real wire format
//! (hickory-proto), records the test changes while the daemon runs, and a silent
//! mode that makes every query time out.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    str::FromStr as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

#[derive(Default)]
struct Zone {
    /// Name (lower case, no trailing dot) → (addresses, TTL in seconds).
    records: HashMap<String, (Vec<IpAddr>, u32)>,
    queries: HashMap<String, usize>,
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
                if let Some(answer) = answer(&thread_zone, &buffer[..length]) {
                    let _ = socket.send_to(&answer, peer);
                }
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

    pub fn queries(&self, name: &str) -> usize {
        self.zone
            .lock()
            .unwrap()
            .queries
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn answer(zone: &Mutex<Zone>, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let name = question
        .name()
        .to_string()
        .trim_end_matches('.')
        .to_lowercase();
    let mut zone = zone.lock().unwrap();
    *zone.queries.entry(name.clone()).or_default() += 1;
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
