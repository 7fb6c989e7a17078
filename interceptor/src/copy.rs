//! Forwarding bytes both ways with half-close, holding buffers only while data flows.
//!
//! A buffer is taken when a socket turns readable and dropped as soon as the socket
//! would block, so an idle connection holds none: its cost is the task and the two
//! sockets. A direction whose reads fill the buffer grows it (16 KiB to 256 KiB, as
//! ztunnel does), so bulk transfers need few system calls.

use std::{io, os::fd::AsRawFd};

use tokio::net::{TcpStream, UnixStream};

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// A socket tokio can wait on and use through a shared reference, so both directions
/// of one connection can run at once.
pub trait Socket: AsRawFd {
    fn readable(&self) -> impl Future<Output = io::Result<()>>;
    fn writable(&self) -> impl Future<Output = io::Result<()>>;
    fn try_read_buf(&self, buffer: &mut Vec<u8>) -> io::Result<usize>;
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
}

macro_rules! socket {
    ($type:ty) => {
        impl Socket for $type {
            fn readable(&self) -> impl Future<Output = io::Result<()>> {
                <$type>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> {
                <$type>::writable(self)
            }
            fn try_read_buf(&self, buffer: &mut Vec<u8>) -> io::Result<usize> {
                <$type>::try_read_buf(self, buffer)
            }
            fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
                <$type>::try_write(self, bytes)
            }
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

/// Copies `client` ↔ `upstream` until both directions reached EOF, or either failed.
/// Returns (bytes client → upstream, bytes upstream → client).
pub async fn bidirectional(client: &impl Socket, upstream: &impl Socket) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(client, upstream), one_way(upstream, client))
}

async fn one_way(from: &impl Socket, to: &impl Socket) -> io::Result<u64> {
    let mut total = 0u64;
    let mut size = INITIAL_BUFFER;
    loop {
        from.readable().await?;
        let mut buffer = Vec::with_capacity(size);
        loop {
            match from.try_read_buf(&mut buffer) {
                Ok(0) => {
                    shutdown_write(to)?;
                    return Ok(total);
                }
                Ok(read) => {
                    write_all(to, &buffer).await?;
                    total += read as u64;
                    if read == buffer.capacity() && size < MAX_BUFFER {
                        size = (size * 4).min(MAX_BUFFER);
                        buffer = Vec::with_capacity(size);
                    } else {
                        buffer.clear();
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
    }
}

pub async fn write_all(to: &impl Socket, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Passes the EOF on: the peer sees the half-close, and the other direction goes on.
fn shutdown_write(socket: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor the socket owns for as long as it is borrowed.
    if unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    // The peer may already be gone; the other direction reports that.
    if error.raw_os_error() == Some(libc::ENOTCONN) {
        Ok(())
    } else {
        Err(error)
    }
}
