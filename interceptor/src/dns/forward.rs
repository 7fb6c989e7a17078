//! Relaying queries the server does not answer to the upstream servers, as they are,
//! from sockets with the bypass mark so the capture programs let them through.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UdpSocket,
};
use tracing::debug;

use crate::socket::connect_bypassing;

/// Within this a query gets an answer or SERVFAIL, whatever the upstreams do; a
/// stub resolver's own timeout is 5 s.
pub const FORWARD_DEADLINE: Duration = Duration::from_millis(4500);

#[derive(Debug, Clone)]
pub struct Forwarder {
    pub upstreams: Vec<SocketAddr>,
    pub bypass_mark: u32,
}

impl Forwarder {
    /// The first answer from the upstreams, tried in turn, each for its share of what
    /// is left of the deadline. `None` when every one failed.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + FORWARD_DEADLINE;
        for (index, upstream) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / (self.upstreams.len() - index) as u32;
            let attempt = async {
                if tcp {
                    self.over_tcp(*upstream, query, share).await
                } else {
                    self.over_udp(*upstream, query).await
                }
            };
            match tokio::time::timeout(share, attempt).await {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(error)) => debug!(%upstream, %error, "upstream DNS server failed"),
                Err(_) => debug!(%upstream, "upstream DNS server timed out"),
            }
        }
        None
    }

    async fn over_udp(&self, upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
        let socket = Socket::new(
            Domain::for_address(upstream),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        socket.set_mark(self.bypass_mark)?;
        socket.set_nonblocking(true)?;
        // A fresh socket per query: a random source port, and an ICMP unreachable
        // surfaces as a refused receive instead of a wait.
        let socket = UdpSocket::from_std(socket.into())?;
        socket.connect(upstream).await?;
        socket.send(query).await?;
        let mut buffer = vec![0; 65_535];
        loop {
            let len = socket.recv(&mut buffer).await?;
            // Only the answer to this query, by its id; anything else is stale or
            // spoofed.
            if len >= 2 && buffer[..2] == query[..2] {
                buffer.truncate(len);
                return Ok(buffer);
            }
        }
    }

    async fn over_tcp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        timeout: Duration,
    ) -> io::Result<Vec<u8>> {
        let mut stream = connect_bypassing(upstream, self.bypass_mark, timeout).await?;
        write_framed(&mut stream, query).await?;
        read_framed(&mut stream)
            .await?
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

/// One DNS message over TCP: a two-byte length, then the message (RFC 1035 4.2.2).
pub async fn read_framed(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> io::Result<Option<Vec<u8>>> {
    let mut length = [0; 2];
    match stream.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let mut message = vec![0; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

pub async fn write_framed(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    message: &[u8],
) -> io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}
