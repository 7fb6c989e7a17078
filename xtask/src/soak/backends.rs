//! The soak's upstreams, in the harness process inside the sandbox: echo servers, a
//! checksumming sink, a flaky echo server whose behaviour the faults switch, and a
//! real DNS server (UDP, hickory wire format) whose records and liveness they switch.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::model::Fnv;

/// The backend hosts, on `lo` in the sandbox. DNS answers alternate between them.
pub const HOST_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const HOST_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The upstream DNS server the daemon asks.
pub const DNS_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
pub const DNS_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(DNS_HOST), 53);
/// The name the DNS ServiceEntry resolves.
pub const DNS_NAME: &str = "dns.soak.internal";
/// Short, so that record changes and outages reach the daemon within seconds.
pub const DNS_TTL: u32 = 1;

pub const SINK_PORT: u16 = 5001;
pub const ECHO_PORT: u16 = 5003;
pub const FLAKY_PORT: u16 = 5004;
pub const NONE_PORT: u16 = 5006;
pub const HTTP_PORT: u16 = 5080;
pub const TLS_PORT: u16 = 5443;
/// The TLS origin: it speaks only TLS, which the proxy originates for plaintext
/// clients as the DestinationRule says.
pub const ORIGIN_PORT: u16 = 5445;
/// The name in the origin's certificate, and the SNI it requires.
pub const ORIGIN_NAME: &str = "origin.soak.internal";
/// The CA that signed it, PEM, next to the config directory (not in it: the daemon
/// reads every file there as config).
pub const ORIGIN_CA_FILE: &str = "origin-ca.pem";

/// What the flaky backend does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Flaky {
    Serve = 0,
    /// No listener: connects are refused.
    Refuse = 1,
    /// Every connection with traffic is reset (SO_LINGER 0, close).
    Reset = 2,
    /// Reads and writes nothing until the mode changes.
    Stall = 3,
}

pub struct Backends {
    _runtime: tokio::runtime::Runtime,
    flaky: Arc<AtomicU8>,
    dns: Arc<DnsState>,
}

struct DnsState {
    down: AtomicBool,
    /// Which host the DNS name resolves to: false A, true B.
    moved: AtomicBool,
    stop: AtomicBool,
}

impl Backends {
    /// Starts every backend; the TLS origin's CA goes to `workdir`/[`ORIGIN_CA_FILE`].
    pub fn start(workdir: &std::path::Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("soak-backend")
            .enable_all()
            .build()
            .context("starting the backend runtime")?;
        for port in [ECHO_PORT, NONE_PORT, HTTP_PORT, TLS_PORT] {
            let listener = bind(&runtime, port)?;
            runtime.spawn(accept_loop(listener, |stream| async move {
                let _ = echo(stream, None).await;
            }));
        }
        let sink_listener = bind(&runtime, SINK_PORT)?;
        runtime.spawn(accept_loop(sink_listener, |stream| async move {
            let _ = sink(stream).await;
        }));
        let origin_listener = bind(&runtime, ORIGIN_PORT)?;
        let acceptor = tls_origin(&workdir.join(ORIGIN_CA_FILE))?;
        runtime.spawn(accept_loop(origin_listener, move |stream| {
            let acceptor = acceptor.clone();
            async move {
                let _ = tls_echo(&acceptor, stream).await;
            }
        }));
        let flaky = Arc::new(AtomicU8::new(Flaky::Serve as u8));
        runtime.spawn(flaky_server(Arc::clone(&flaky)));
        let dns = Arc::new(DnsState {
            down: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        start_dns(Arc::clone(&dns))?;
        Ok(Self {
            _runtime: runtime,
            flaky,
            dns,
        })
    }

    pub fn set_flaky(&self, mode: Flaky) {
        self.flaky.store(mode as u8, Ordering::SeqCst);
    }

    pub fn set_dns_down(&self, down: bool) {
        self.dns.down.store(down, Ordering::SeqCst);
    }

    /// Moves the DNS name to the other backend host.
    pub fn move_dns(&self) {
        self.dns.moved.fetch_xor(true, Ordering::SeqCst);
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.dns.stop.store(true, Ordering::SeqCst);
    }
}

/// On every address, so that both backend hosts (and any address the DNS answer
/// names) serve.
fn bind(runtime: &tokio::runtime::Runtime, port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
    runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(4096)
        })
        .with_context(|| format!("binding the backend on {addr}"))
}

async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Echoes to EOF; with `flaky`, obeys its mode before each write.
async fn echo(mut stream: TcpStream, flaky: Option<&AtomicU8>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Small: this backend holds thousands of idle connections.
    let mut buffer = [0u8; 4096];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return stream.shutdown().await;
        }
        if let Some(flaky) = flaky {
            loop {
                match flaky.load(Ordering::SeqCst) {
                    mode if mode == Flaky::Reset as u8 => {
                        reset(&stream);
                        return Ok(());
                    }
                    mode if mode == Flaky::Stall as u8 => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
        }
        stream.write_all(&buffer[..read]).await?;
    }
}

/// A CA made for this run, written to `ca_file`, and an acceptor presenting a leaf
/// certificate for [`ORIGIN_NAME`] that it signed.
fn tls_origin(ca_file: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "interceptor soak CA");
    let ca_key = KeyPair::generate()?;
    let ca_certificate = ca.self_signed(&ca_key)?;
    std::fs::write(ca_file, ca_certificate.pem())
        .with_context(|| format!("writing {}", ca_file.display()))?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec![ORIGIN_NAME.to_owned()])?.signed_by(&key, &issuer)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Echoes over TLS to EOF, for a handshake that named [`ORIGIN_NAME`]: anything
/// else is closed unanswered, so the client sees that the proxy got it wrong.
async fn tls_echo(acceptor: &tokio_rustls::TlsAcceptor, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut tls = acceptor.accept(stream).await?;
    if tls.get_ref().1.server_name() != Some(ORIGIN_NAME) {
        return tls.shutdown().await;
    }
    let mut buffer = [0u8; 4096];
    loop {
        let read = tls.read(&mut buffer).await?;
        if read == 0 {
            return tls.shutdown().await;
        }
        tls.write_all(&buffer[..read]).await?;
    }
}

/// Closes with a RST instead of a FIN.
fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Reads to EOF, then answers `OK <bytes> <fnv64 hex>` and closes.
async fn sink(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut checksum = Fnv::default();
    let mut bytes = 0u64;
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        checksum.update(&buffer[..read]);
        bytes += read as u64;
    }
    stream
        .write_all(format!("OK {bytes} {:016x}\n", checksum.0).as_bytes())
        .await?;
    stream.shutdown().await
}

async fn flaky_server(mode: Arc<AtomicU8>) {
    let mut listener: Option<TcpListener> = None;
    loop {
        if mode.load(Ordering::SeqCst) == Flaky::Refuse as u8 {
            listener = None;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let Some(bound) = &listener else {
            let addr = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), FLAKY_PORT);
            listener = async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                socket.bind(addr)?;
                socket.listen(1024)
            }
            .await
            .ok();
            if listener.is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            continue;
        };
        if let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::from_millis(10), bound.accept()).await
        {
            let mode = Arc::clone(&mode);
            tokio::spawn(async move {
                let _ = echo(stream, Some(&mode)).await;
            });
        }
    }
}

fn start_dns(state: Arc<DnsState>) -> Result<()> {
    let socket = UdpSocket::bind(DNS_SERVER)
        .with_context(|| format!("binding the DNS server on {DNS_SERVER}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    std::thread::Builder::new()
        .name("soak-dns".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            while !state.stop.load(Ordering::SeqCst) {
                let Ok((length, peer)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                if state.down.load(Ordering::SeqCst) {
                    continue;
                }
                let host = if state.moved.load(Ordering::SeqCst) {
                    HOST_B
                } else {
                    HOST_A
                };
                if let Some(answer) = answer(&buffer[..length], host) {
                    let _ = socket.send_to(&answer, peer);
                }
            }
        })?;
    Ok(())
}

/// `host` for A queries of [`DNS_NAME`], no records for its AAAA, NXDOMAIN otherwise.
fn answer(query: &[u8], host: Ipv4Addr) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let name = question
        .name()
        .to_string()
        .trim_end_matches('.')
        .to_lowercase();
    let mut response = if name == DNS_NAME {
        let mut response = Message::response(request.metadata.id, OpCode::Query);
        if question.query_type() == RecordType::A {
            let owner = Name::from_str(&format!("{name}.")).ok()?;
            response.add_answer(Record::from_rdata(owner, DNS_TTL, RData::A(rdata::A(host))));
        }
        response
    } else {
        Message::error_msg(request.metadata.id, OpCode::Query, ResponseCode::NXDomain)
    };
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(question);
    response.to_vec().ok()
}
