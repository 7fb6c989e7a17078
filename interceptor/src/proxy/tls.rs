//! TLS origination on the upstream connection, as a DestinationRule's
//! `trafficPolicy.tls` asks: SIMPLE or MUTUAL, with the roots, client certificate,
//! CRL, subject alternative names and SNI it names. Nothing falls back to plaintext:
//! a connection whose handshake fails is reset.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{
        CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
        pem::PemObject as _,
    },
    sign::{CertifiedKey, SingleCertAndKey},
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::warn;

use std::time::Instant;

use tokio::net::TcpStream;
use tracing::info;

use super::tracking::ConnectionGuard;
use crate::copy::{Close, Copied, How, Side};
use crate::{
    config::{ClientTlsSettings, TlsMode},
    metrics::FailureReason,
    registry::{Route, UpstreamPolicy},
    socket::{Upstream, reset},
};

/// What a DestinationRule's `tls` field makes of one service port's upstream
/// connections, with the material loaded from its files.
#[derive(Serialize)]
pub struct Origination {
    #[serde(flatten)]
    spec: Spec,
    #[serde(skip)]
    built: Mutex<Built>,
}

/// The settings as they apply to one service port.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    mode: TlsMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<String>,
    /// From the DestinationRule, or else the ServiceEntry; empty: the SNI is verified.
    subject_alt_names: Vec<String>,
    insecure_skip_verify: bool,
    /// (field, path) of every file the material comes from.
    files: Vec<(&'static str, PathBuf)>,
}

struct Built {
    config: Arc<ClientConfig>,
    /// The files' modification times when `config` was built.
    stamps: Vec<Option<SystemTime>>,
}

/// A file the settings name that cannot be used; `field` is relative to the `tls`
/// object.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct MaterialError {
    pub field: &'static str,
    pub message: String,
    /// The file could not be read for want of descriptors or memory: the daemon's
    /// trouble, not the configuration's, and gone once it passes.
    pub shortage: bool,
}

impl fmt::Debug for Origination {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Origination")
            .field("mode", &self.spec.mode)
            .field("sni", &self.spec.sni)
            .field("subject_alt_names", &self.spec.subject_alt_names)
            .finish_non_exhaustive()
    }
}

impl Origination {
    /// `None` for DISABLE (plaintext). The caller refuses ISTIO_MUTUAL and
    /// `credentialName` first; `service_sans` are the ServiceEntry's, used when the
    /// rule names none.
    pub fn load(
        settings: &ClientTlsSettings,
        service_sans: &[String],
    ) -> Result<Option<Self>, MaterialError> {
        if !matches!(settings.mode, TlsMode::Simple | TlsMode::Mutual) {
            return Ok(None);
        }
        let mut files = Vec::new();
        let mut push = |field, path: &str| {
            if !path.is_empty() {
                files.push((field, PathBuf::from(path)));
            }
        };
        push("caCertificates", &settings.ca_certificates);
        push("caCrl", &settings.ca_crl);
        if settings.mode == TlsMode::Mutual {
            push("clientCertificate", &settings.client_certificate);
            push("privateKey", &settings.private_key);
        }
        let subject_alt_names = if settings.subject_alt_names.is_empty() {
            service_sans.to_vec()
        } else {
            settings.subject_alt_names.clone()
        };
        let insecure_skip_verify = settings.insecure_skip_verify == Some(true);
        let spec = Spec {
            mode: settings.mode,
            sni: (!settings.sni.is_empty()).then(|| settings.sni.clone()),
            subject_alt_names,
            insecure_skip_verify,
            files,
        };
        let stamps = spec.stamps();
        let config = Arc::new(spec.build()?);
        Ok(Some(Self {
            spec,
            built: Mutex::new(Built { config, stamps }),
        }))
    }

    /// The client config for a new connection. Certificate files are rotated in
    /// place, so a changed modification time rebuilds the config: new connections
    /// use the new files, open ones keep theirs. Material that no longer loads keeps
    /// the last good config and says why; a stat per handshake is nothing beside the
    /// handshake itself.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let stamps = self.spec.stamps();
        let mut built = self
            .built
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if built.stamps != stamps {
            match self.spec.build() {
                Ok(config) => {
                    built.config = Arc::new(config);
                    tracing::info!(files = ?self.spec.paths(), "TLS origination material reloaded");
                }
                Err(error) => {
                    warn!(%error, field = error.field, "rotated TLS material does not load; keeping the previous");
                }
            }
            built.stamps = stamps;
        }
        Arc::clone(&built.config)
    }

    /// The name sent as SNI and, without subject alternative names, verified: the
    /// rule's `sni`, else the HTTP Host the client sent, else the ServiceEntry host.
    pub fn server_name(&self, http_host: Option<&str>, service_host: &str) -> String {
        if let Some(sni) = &self.spec.sni {
            return sni.clone();
        }
        match http_host {
            Some(host) => strip_port(host).to_owned(),
            None => service_host.to_owned(),
        }
    }
}

impl Spec {
    fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|(_, path)| path.as_path()).collect()
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.files
            .iter()
            .map(|(_, path)| fs::metadata(path).and_then(|meta| meta.modified()).ok())
            .collect()
    }

    fn file(&self, field: &str) -> Option<&Path> {
        self.files
            .iter()
            .find(|(name, _)| *name == field)
            .map(|(_, path)| path.as_path())
    }

    fn build(&self) -> Result<ClientConfig, MaterialError> {
        let provider = provider();
        let chain = if self.insecure_skip_verify {
            None
        } else {
            let roots = self.roots()?;
            let crls = match self.file("caCrl") {
                Some(path) => read_pem_all::<CertificateRevocationListDer>(path, "caCrl", "CRL")?,
                None => Vec::new(),
            };
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .with_crls(crls)
                    .build()
                    .map_err(|error| MaterialError {
                        field: "caCertificates",
                        message: format!("cannot build a verifier: {error}"),
                        shortage: false,
                    })?;
            Some(webpki)
        };
        let verifier = Arc::new(RuleVerifier {
            provider: Arc::clone(&provider),
            chain,
            names: self
                .subject_alt_names
                .iter()
                .filter_map(|name| ServerName::try_from(name.clone()).ok())
                .collect(),
        });
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| MaterialError {
                field: "mode",
                message: error.to_string(),
                shortage: false,
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (self.file("clientCertificate"), self.file("privateKey")) {
            (Some(cert_path), Some(key_path)) => {
                let certified = client_certificate(cert_path, key_path, &provider)?;
                builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(config)
    }

    fn roots(&self) -> Result<RootCertStore, MaterialError> {
        let mut roots = RootCertStore::empty();
        match self.file("caCertificates") {
            Some(path) => {
                for certificate in
                    read_pem_all::<CertificateDer>(path, "caCertificates", "certificate")?
                {
                    roots.add(certificate).map_err(|error| MaterialError {
                        field: "caCertificates",
                        message: format!("{}: {error}", path.display()),
                        shortage: false,
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    warn!(%error, "reading the system's root certificates");
                }
                let (added, _ignored) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    return Err(MaterialError {
                        field: "caCertificates",
                        message: "unset, and the system has no root certificates".into(),
                        shortage: false,
                    });
                }
            }
        }
        Ok(roots)
    }
}

/// `host[:port]` or `[v6]:port` → the host.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => name,
        _ => host,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The MUTUAL client certificate chain and its key, loaded once and checked to
/// belong together, so a wrong key is refused when the rule loads, not at the first
/// handshake.
fn client_certificate(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, MaterialError> {
    let chain = read_pem_all::<CertificateDer>(cert_path, "clientCertificate", "certificate")?;
    let key = read_file(key_path, "privateKey")?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|error| MaterialError {
        field: "privateKey",
        message: format!("{}: no usable private key: {error}", key_path.display()),
        shortage: false,
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| MaterialError {
            field: "privateKey",
            message: format!("{}: unsupported private key: {error}", key_path.display()),
            shortage: false,
        })?;
    let certified = CertifiedKey::new(chain, key);
    // Unlike rustls's own loading, a key whose match cannot be checked is refused too.
    certified.keys_match().map_err(|error| MaterialError {
        field: "privateKey",
        message: format!(
            "{} does not match {}: {error}",
            key_path.display(),
            cert_path.display()
        ),
        shortage: false,
    })?;
    Ok(certified)
}

fn read_file(path: &Path, field: &'static str) -> Result<Vec<u8>, MaterialError> {
    fs::read(path).map_err(|error| MaterialError {
        field,
        message: format!("cannot read {}: {error}", path.display()),
        shortage: crate::limits::is_shortage(&error),
    })
}

fn read_pem_all<T: rustls::pki_types::pem::PemObject>(
    path: &Path,
    field: &'static str,
    what: &str,
) -> Result<Vec<T>, MaterialError> {
    let bytes = read_file(path, field)?;
    let items = T::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| MaterialError {
            field,
            message: format!("{}: not PEM: {error}", path.display()),
            shortage: false,
        })?;
    if items.is_empty() {
        return Err(MaterialError {
            field,
            message: format!("{} holds no PEM {what}", path.display()),
            shortage: false,
        });
    }
    Ok(items)
}

/// The server certificate check a rule asks for. The handshake signatures are
/// always checked against the presented certificate, as webpki's own verifier does.
#[derive(Debug)]
struct RuleVerifier {
    provider: Arc<CryptoProvider>,
    /// The roots and CRLs; `None` for `insecureSkipVerify`: any certificate passes.
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// When set, the certificate must carry one of these instead of the SNI, as
    /// Envoy's `match_subject_alt_names`.
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for RuleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        if self.names.is_empty() {
            return chain.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        let mut last = rustls::Error::General("no subject alternative name to verify".into());
        for name in &self.names {
            match chain.verify_server_cert(end_entity, intermediates, name, ocsp_response, now) {
                Ok(verified) => return Ok(verified),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether a routed connection's upstream gets TLS, and the server name it sends:
/// `Some` when a DestinationRule asks for SIMPLE or MUTUAL on the route's port.
pub fn plan(route: &Route, http_host: Option<&str>) -> Option<(Arc<UpstreamPolicy>, String)> {
    let policy = route.upstream_policy()?;
    let origination = policy.tls.as_ref()?;
    let service_host = route
        .host
        .as_deref()
        .or_else(|| route.service.hosts.first().map(String::as_str))
        .unwrap_or_default();
    let server_name = origination.server_name(http_host, service_host);
    Some((Arc::clone(policy), server_name))
}

/// Carries a connection whose upstream gets TLS: the handshake, then the relay. A
/// handshake that fails resets the client; nothing is ever sent in plaintext.
pub async fn originate(
    client: TcpStream,
    upstream: Upstream,
    preface: Vec<u8>,
    policy: &UpstreamPolicy,
    server_name: &str,
    conn: &ConnectionGuard,
    started: Instant,
) {
    let Some(origination) = &policy.tls else {
        return;
    };
    let result = match upstream {
        Upstream::Tcp(upstream) => {
            carry(client, upstream, &preface, origination, server_name, conn).await
        }
        Upstream::Unix(upstream) => {
            carry(client, upstream, &preface, origination, server_name, conn).await
        }
    };
    if let Some((sent, received)) = result {
        info!(
            tls = %origination.spec.mode.as_str(),
            server_name,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
}

/// `None` when the connection failed (and the client was reset).
async fn carry<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: TcpStream,
    upstream: S,
    preface: &[u8],
    origination: &Origination,
    server_name: &str,
    conn: &ConnectionGuard,
) -> Option<(u64, u64)> {
    let upstream = match handshake(origination, server_name, upstream).await {
        Ok(upstream) => upstream,
        Err(error) => {
            warn!(%error, server_name, mode = origination.spec.mode.as_str(), "upstream TLS handshake failed; resetting the client");
            conn.failed(FailureReason::upstream_tls);
            reset(client);
            return None;
        }
    };
    match relay(&mut client, upstream, preface).await {
        Ok((sent, received)) => {
            // Both directions ended cleanly; which FIN came first is not tracked here.
            conn.finished(&Copied {
                sent,
                received,
                close: Close {
                    side: Side::Client,
                    how: How::Fin,
                },
                error: None,
            });
            Some((sent, received))
        }
        Err(error) => {
            warn!(%error, "TLS-originated connection failed; resetting the client");
            conn.finished(&Copied {
                sent: 0,
                received: 0,
                // Either side's failure ends up here; the upstream's is the one a
                // handshake-protected stream reports (a bad record, a reset).
                close: Close {
                    side: Side::Upstream,
                    how: How::of(&error),
                },
                error: None,
            });
            reset(client);
            None
        }
    }
}

/// Opens TLS over a connected upstream socket.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    origination: &Origination,
    server_name: &str,
    upstream: S,
) -> io::Result<TlsStream<S>> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|error| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{server_name:?} is no valid server name: {error}"),
        )
    })?;
    TlsConnector::from(origination.client_config())
        .connect(name, upstream)
        .await
}

/// Copies `client` ↔ `upstream` (the preface first) until both directions end.
/// Returns (bytes sent, bytes received) or the first error, after which the caller
/// resets the client.
pub async fn relay<C, S>(
    client: &mut C,
    upstream: TlsStream<S>,
    preface: &[u8],
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let up = async {
        upstream_write.write_all(preface).await?;
        let copied = tokio::io::copy(&mut client_read, &mut upstream_write).await?;
        // close_notify, then the FIN: the server sees a clean end of the request.
        upstream_write.shutdown().await?;
        Ok::<_, io::Error>(preface.len() as u64 + copied)
    };
    let down = async {
        let mut buffer = vec![0; 16 * 1024];
        let mut copied = 0u64;
        loop {
            let read = match upstream_read.read(&mut buffer).await {
                Ok(0) => break,
                Ok(read) => read,
                // Many servers close without close_notify; what they sent arrived
                // whole (TLS records are authenticated), so this is their end of
                // stream, not a truncation.
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(error) => return Err(error),
            };
            client_write.write_all(&buffer[..read]).await?;
            copied += read as u64;
        }
        client_write.shutdown().await?;
        Ok::<_, io::Error>(copied)
    };
    tokio::try_join!(up, down)
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn the_host_header_loses_its_port() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[2001:db8::1]:80"), "2001:db8::1");
    }
}
