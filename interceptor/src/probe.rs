//! `interceptor ready`: asks a daemon's admin server whether it is serving, for exec
//! probes and scripts, without curl in the image.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// Under the kubelet's default probe timeout (1 s), so a hung daemon is reported by
/// this command rather than by the kubelet killing it.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no admin server answers at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin server at {addr} did not answer in time: {source}")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin server at {addr} sent no HTTP status line: {head:?}")]
    Malformed { addr: SocketAddr, head: String },
    #[error("not ready ({status}): {body}")]
    NotReady { status: u16, body: String },
}

/// GET /healthz/ready; Ok with the body if it answered 200.
pub fn ready(addr: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let exchange = |source| ProbeError::Exchange { addr, source };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(exchange)?;
    stream.set_write_timeout(Some(left)).map_err(exchange)?;
    stream
        .write_all(
            format!("GET /healthz/ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(exchange)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(exchange)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::Malformed {
            addr,
            head: head.lines().next().unwrap_or_default().to_owned(),
        })?;
    let body = body.trim().to_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(ProbeError::NotReady { status, body })
    }
}
