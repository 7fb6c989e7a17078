//! Real TLS for the SNI tests: a CA made per test with rcgen, rustls servers on test
//! hosts, and a rustls client that can also send its ClientHello in awkward pieces.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::danger::ClientCertVerifier,
};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    certificate_pem: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "interceptor test CA");
        let key = KeyPair::generate().expect("CA key");
        let signed = params.self_signed(&key).expect("CA certificate");
        Self {
            issuer: Issuer::new(params, key),
            certificate: signed.der().clone(),
            certificate_pem: signed.pem(),
        }
    }

    /// The CA certificate, PEM, as a `caCertificates` file holds it.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// A leaf certificate for `names` (DNS SANs) signed by this CA: (DER, PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> (CertificateDer<'static>, String, String) {
        let (certificate, key) = self.leaf(names, None);
        (
            certificate.der().clone(),
            certificate.pem(),
            key.serialize_pem(),
        )
    }

    /// A leaf for `names`, with serial number `serial` when given, and its key.
    fn leaf(&self, names: &[&str], serial: Option<u64>) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(ToString::to_string).collect::<Vec<_>>())
                .expect("leaf params");
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        let certificate = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (certificate, key)
    }

    /// A server for `names` whose certificate has serial number `serial`.
    pub fn server_config_with_serial(&self, names: &[&str], serial: u64) -> Arc<ServerConfig> {
        self.server(names, Some(serial), None)
    }

    /// A CRL, PEM, from this CA revoking the certificates with these serial numbers.
    pub fn revocation_list_pem(&self, serials: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .expect("revocation list")
            .pem()
            .expect("revocation list PEM")
    }

    /// A server for `names` that requires a client certificate from this CA.
    pub fn server_config_requiring_clients(&self, names: &[&str]) -> Arc<ServerConfig> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
                .build()
                .expect("client verifier");
        self.server(names, None, Some(verifier))
    }

    pub fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        self.server(names, None, None)
    }

    /// A server with a fresh leaf for `names`, verifying clients with `clients` when
    /// given.
    fn server(
        &self,
        names: &[&str],
        serial: Option<u64>,
        clients: Option<Arc<dyn ClientCertVerifier>>,
    ) -> Arc<ServerConfig> {
        let (certificate, key) = self.leaf(names, serial);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        Arc::new(
            builder
                .with_single_cert(vec![certificate.der().clone()], key)
                .expect("server config"),
        )
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(self.roots())
                .with_no_client_auth(),
        )
    }

    /// Roots that trust this CA alone.
    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.certificate.clone())
            .expect("trust the test CA");
        Arc::new(roots)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A TLS server that completes the handshake and answers `<name> <sni>`.
pub fn start_tls_server(name: &str, addr: &str, config: Arc<ServerConfig>) {
    let name = name.to_owned();
    serve_tls(addr, config, move |tls| {
        let sni = tls.conn.server_name().unwrap_or("-").to_owned();
        let _ = writeln!(tls, "{name} {sni}");
    });
}

/// Accepts connections on `addr`, each on a thread of its own, completes their
/// handshake with `config` and hands the stream to `serve`; then closes it cleanly
/// (close_notify and a FIN). A failed handshake closes the connection unserved.
pub fn serve_tls(
    addr: &str,
    config: Arc<ServerConfig>,
    serve: impl Fn(&mut StreamOwned<ServerConnection, TcpStream>) + Send + Sync + 'static,
) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (config, serve) = (Arc::clone(&config), Arc::clone(&serve));
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(connection) = ServerConnection::new(config) else {
                    return;
                };
                let mut tls = StreamOwned::new(connection, stream);
                while tls.conn.is_handshaking() {
                    if tls.conn.complete_io(&mut tls.sock).is_err() {
                        return;
                    }
                }
                serve(&mut tls);
                tls.conn.send_close_notify();
                let _ = tls.flush();
                let _ = tls.sock.shutdown(Shutdown::Write);
            });
        }
    });
}

/// How the client sends its ClientHello.
#[derive(Debug, Clone, Copy)]
pub enum HelloDelivery {
    /// As rustls writes it.
    Whole,
    /// Re-framed into TLS records of at most this many bytes, each written in its own
    /// TCP segment with a pause in between.
    Fragmented(usize),
}

/// Completes a TLS handshake with `sni` to `addr` (possibly through the proxy) and
/// returns what the server answered: its name and the SNI it saw.
pub fn tls_who(
    addr: &str,
    sni: &str,
    config: &Arc<ClientConfig>,
    delivery: HelloDelivery,
) -> std::io::Result<String> {
    let mut stream = crate::server::connect(addr)?;
    stream.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_owned()).expect("valid SNI");
    let mut connection =
        ClientConnection::new(Arc::clone(config), name).map_err(std::io::Error::other)?;
    if let HelloDelivery::Fragmented(size) = delivery {
        let mut hello = Vec::new();
        connection.write_tls(&mut hello)?;
        send_fragmented(&mut stream, &hello, size)?;
    }
    let mut tls = StreamOwned::new(connection, stream);
    let mut answer = String::new();
    tls.read_to_string(&mut answer)?;
    Ok(answer.trim().to_owned())
}

fn send_fragmented(stream: &mut TcpStream, hello: &[u8], size: usize) -> std::io::Result<()> {
    assert_eq!(hello[0], 0x16, "rustls wrote a handshake record");
    let payload = &hello[5..];
    for piece in payload.chunks(size) {
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(piece.len() as u16).to_be_bytes());
        record.extend_from_slice(piece);
        // Split each record across two writes too, so record and segment boundaries differ.
        let (head, tail) = record.split_at(3.min(record.len()));
        stream.write_all(head)?;
        std::thread::sleep(Duration::from_millis(20));
        stream.write_all(tail)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
