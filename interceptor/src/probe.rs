//! `interceptor ready`: asks a daemon's admin server whether it is serving, for exec
//! probes and scripts, without curl in the image.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use crate::admin::INSTANCE_HEADER;

/// Under the manifest's probe timeout (3 s), which also covers the container
/// runtime's exec, so a daemon too busy to answer is reported as such.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no admin server answers at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("asking the admin server at {addr} failed")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin server at {addr} sent no HTTP status line: {head:?}")]
    Malformed { addr: SocketAddr, head: String },
    #[error(
        "the admin server at {addr} is another daemon's, not the one that wrote the address file (it has gone)"
    )]
    SomeoneElse { addr: SocketAddr },
    #[error("not ready ({status} from {addr}): {body}")]
    NotReady {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
}

/// GET /healthz/ready, within `timeout` in all; Ok with the body if it answered 200
/// (and, with `instance`, came from that daemon).
pub fn ready(
    addr: SocketAddr,
    instance: Option<u64>,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let answer = get(addr, "/healthz/ready", timeout)?;
    if let Some(expected) = instance {
        let answered = answer.head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(INSTANCE_HEADER)
                .then(|| value.trim().parse::<u64>().ok())
                .flatten()
        });
        if answered != Some(expected) {
            return Err(ProbeError::SomeoneElse { addr });
        }
    }
    let body = answer.body.trim().to_owned();
    if answer.status == 200 {
        Ok(body)
    } else {
        Err(ProbeError::NotReady {
            addr,
            status: answer.status,
            body,
        })
    }
}

/// An admin server's answer.
pub struct Answer {
    pub status: u16,
    /// The header lines after the status line.
    pub head: String,
    pub body: String,
}

/// GET `path` (with its query) from the admin server at `addr`, within `timeout` in all.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Answer, ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let exchange = |source| ProbeError::Exchange { addr, source };
    let time_left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(exchange(std::io::ErrorKind::TimedOut.into()))
        } else {
            Ok(left)
        }
    };
    stream
        .set_write_timeout(Some(time_left()?))
        .map_err(exchange)?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(exchange)?;
    let mut response = Vec::new();
    let mut chunk = [0; 1024];
    loop {
        stream
            .set_read_timeout(Some(time_left()?))
            .map_err(exchange)?;
        match stream.read(&mut chunk).map_err(exchange)? {
            0 => break,
            read => response.extend_from_slice(&chunk[..read]),
        }
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let (status_line, head) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::Malformed {
            addr,
            head: status_line.to_owned(),
        })?;
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// GET `path` from the admin server at `addr` and hand each line of its streamed
/// (chunked) answer to `line`, without the newline, until the server ends it. An
/// answer other than 200 is an error with its body. Waits as long as the server
/// keeps the stream open.
pub fn stream(
    addr: SocketAddr,
    path: &str,
    mut line: impl FnMut(&str) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let exchange = |source| ProbeError::Exchange { addr, source };
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(exchange)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).map_err(exchange)?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::Malformed {
            addr,
            head: status_line.trim_end().to_owned(),
        })?;
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).map_err(exchange)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<u64>().ok();
            }
        }
    }
    if status != 200 || !chunked {
        let mut body = String::new();
        match length {
            Some(length) => reader.take(length).read_to_string(&mut body),
            None => reader.read_to_string(&mut body),
        }
        .map_err(exchange)?;
        anyhow::bail!(
            "the admin server at {addr} answered {status}: {}",
            body.trim()
        );
    }
    // Chunks need not end at line ends: lines are cut from the bytes they carry.
    let mut pending = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).map_err(exchange)?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).map_err(
            |_| anyhow::anyhow!("the admin server at {addr} sent a bad chunk size {size:?}"),
        )?;
        if size == 0 {
            return Ok(());
        }
        let start = pending.len();
        pending.resize(start + size, 0);
        reader.read_exact(&mut pending[start..]).map_err(exchange)?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf).map_err(exchange)?;
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            line(String::from_utf8_lossy(&text[..end]).as_ref()).map_err(exchange)?;
        }
    }
}
