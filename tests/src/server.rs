//! Test upstreams: real TCP listeners on test-host addresses inside the sandbox.
//!
//! A client opens with one command line:
//! - `WHO` → the server answers `<name> <local addr> <peer addr>` and closes;
//! - `GET <target> HTTP/1.1` → an HTTP response whose body is `<name>`;
//! - `ECHO` → the server answers `<name>`, then echoes everything until EOF;
//! - `BULK <n>` → the server reads to EOF, answers `<bytes read> <checksum>`, then
//!   sends `n` bytes of [`pattern`] and closes.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

pub struct TestServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl TestServer {
    pub fn start(name: &str, addr: &str) -> Self {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let name = name.to_owned();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = serve(&name, stream);
                });
            }
        });
        Self { addr, accepted }
    }

    /// Connections this server has accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve(name: &str, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut command = String::new();
    reader.read_line(&mut command)?;
    let mut writer = stream;
    match command.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["WHO"] => {
            writeln!(
                writer,
                "{name} {} {}",
                writer.local_addr()?,
                writer.peer_addr()?
            )?;
        }
        ["BULK", length] => {
            let length: usize = length.parse().unwrap_or(0);
            let mut checksum = Checksum::default();
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let read = reader.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                checksum.update(&buffer[..read]);
            }
            writeln!(writer, "{} {:016x}", checksum.length, checksum.value())?;
            write_pattern(&mut writer, length)?;
        }
        ["GET", _target, _version] => {
            // Consume the request head, then answer with the server's name.
            let mut line = String::new();
            while reader.read_line(&mut line)? > 0 && line != "\r\n" {
                line.clear();
            }
            // X-Peer: the peer the server saw, so the client can tell a proxy was between.
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nX-Peer: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                writer.peer_addr()?,
                name.len()
            )?;
        }
        ["ECHO"] => {
            writeln!(writer, "{name}")?;
            std::io::copy(&mut reader, &mut writer)?;
        }
        _ => {}
    }
    writer.shutdown(Shutdown::Write)?;
    Ok(())
}

/// FNV-1a over the stream, with its length.
#[derive(Debug, Clone, Copy)]
pub struct Checksum {
    pub length: usize,
    state: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self {
            length: 0,
            state: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.state ^= u64::from(*byte);
            self.state = self.state.wrapping_mul(0x0100_0000_01b3);
        }
        self.length += bytes.len();
    }

    pub fn value(&self) -> u64 {
        self.state
    }
}

/// Deterministic, non-repeating-per-block bytes, so a reordered or dropped chunk
/// changes the checksum.
pub fn pattern(offset: usize) -> u8 {
    let x = offset as u64;
    (x.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (x >> 16) as u8
}

pub fn write_pattern(writer: &mut impl std::io::Write, length: usize) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while offset < length {
        let size = chunk.len().min(length - offset);
        for (index, byte) in chunk[..size].iter_mut().enumerate() {
            *byte = pattern(offset + index);
        }
        writer.write_all(&chunk[..size])?;
        offset += size;
    }
    Ok(())
}

pub fn pattern_checksum(length: usize) -> Checksum {
    let mut checksum = Checksum::default();
    let mut buffer = Vec::new();
    write_pattern(&mut buffer, length).expect("write to vec");
    checksum.update(&buffer);
    checksum
}

/// What a `WHO` exchange saw from both ends.
#[derive(Debug, Clone)]
pub struct Who {
    pub server: String,
    /// The server's local address.
    pub server_addr: SocketAddr,
    /// The peer the server saw: the proxy's upstream socket when redirected.
    pub server_peer: SocketAddr,
    /// Where the client's socket says it is connected: its original destination, also
    /// when redirected (getpeername is rewritten).
    pub client_peer: SocketAddr,
    pub client_local: SocketAddr,
}

impl Who {
    /// Through a proxy, the server's peer is the proxy's upstream socket; directly, it
    /// is the client's own socket.
    pub fn went_through_proxy(&self) -> bool {
        self.server_peer != self.client_local
    }
}

pub fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

pub fn who(addr: &str) -> std::io::Result<Who> {
    let mut stream = connect(addr)?;
    let client_peer = stream.peer_addr()?;
    let client_local = stream.local_addr()?;
    stream.write_all(b"WHO\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let fields: Vec<&str> = answer.split_whitespace().collect();
    match fields.as_slice() {
        [server, server_addr, server_peer] => Ok(Who {
            server: (*server).to_owned(),
            server_addr: server_addr.parse().expect("server addr"),
            server_peer: server_peer.parse().expect("server peer"),
            client_peer,
            client_local,
        }),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("bad WHO answer {answer:?} from {addr}"),
        )),
    }
}

/// Sends an HTTP/1.1 GET with `Host: host` and returns the body: the server's name.
pub fn http_get(addr: &str, host: &str) -> std::io::Result<(String, bool)> {
    let mut stream = connect(addr)?;
    let client_local = stream.local_addr()?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("bad response {response:?}"),
            )
        })?;
    // Through a proxy the server's peer is the proxy's upstream socket, not ours.
    let server_peer = response
        .lines()
        .find_map(|line| line.strip_prefix("X-Peer: "))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no X-Peer header"))?;
    let through_proxy = server_peer != client_local.to_string();
    Ok((body, through_proxy))
}

/// Connects to `addr`, sends `request` and asserts the connection is closed without
/// a byte of answer. The proxy may reset it before connect() has even returned, which
/// counts as closed; a refused connect (nothing listening) does not.
pub fn assert_refused_by_proxy(addr: &str, request: &[u8]) {
    match connect(addr) {
        Ok(mut stream) => assert_closed_unanswered(&mut stream, request),
        Err(error) => assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset,
            "connecting to {addr}: {error}"
        ),
    }
}

/// Sends `request` and asserts the connection is closed without a byte of answer,
/// by a reset or an empty EOF: what the proxy does to a connection it will not forward.
pub fn assert_closed_unanswered(stream: &mut TcpStream, request: &[u8]) {
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => assert!(answer.is_empty(), "unexpected answer {answer:?}"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}"),
    }
}
