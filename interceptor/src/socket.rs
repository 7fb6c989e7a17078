//! Socket options the data path needs and tokio does not expose.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd as _, IntoRawFd as _},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::socket::{SockaddrStorage, connect, setsockopt, sockopt},
};

use tokio::{
    io::Interest,
    net::{TcpSocket, TcpStream},
};

/// Opens an upstream connection marked so that connect4 lets it through, even when the
/// programs are attached to a cgroup that contains the daemon itself.
///
/// tokio's `TcpSocket::connect` asks for SO_ERROR after every connect; here the epoll
/// event alone tells success (writable) from failure (hang-up), so only a failed
/// connect pays for the extra system call that fetches its error.
pub async fn connect_bypassing(
    destination: SocketAddr,
    bypass_mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match destination {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    set_mark(&socket, bypass_mark)?;
    socket.set_nodelay(true)?;
    start_connect(&socket, destination)?;
    // SAFETY: the descriptor moves from `socket` to the std stream, which owns it now.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) };
    let stream = TcpStream::from_std(stream)?;
    let connected = async {
        let ready = stream.ready(Interest::WRITABLE).await?;
        if ready.is_write_closed() {
            return Err(stream
                .take_error()?
                .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, connected).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// A non-blocking connect(2): Ok once the handshake is under way (or, rarely, done).
fn start_connect(socket: &impl AsRawFd, destination: SocketAddr) -> io::Result<()> {
    match connect(socket.as_raw_fd(), &SockaddrStorage::from(destination)) {
        Ok(()) | Err(Errno::EINPROGRESS) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn set_mark(socket: &impl AsFd, mark: u32) -> io::Result<()> {
    Ok(setsockopt(socket, sockopt::Mark, &mark)?)
}

/// Closes with a RST instead of a FIN, so the client sees at once that the
/// connection failed rather than a clean, empty response.
pub fn reset(stream: TcpStream) {
    let _ = reset_on_close(&stream);
    drop(stream);
}

/// Makes the socket's close send a RST instead of a FIN (SO_LINGER on, 0 seconds),
/// throwing away whatever it still holds to send. A unix socket has no reset: its
/// peer sees a close.
pub fn reset_on_close(socket: &impl AsFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    Ok(setsockopt(socket, sockopt::Linger, &linger)?)
}

/// An upstream connection: TCP, or a unix socket for `unix://` endpoints.
pub enum Upstream {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Connects to a unix socket path, or to an abstract socket for names starting with `@`.
pub async fn connect_unix(path: &std::path::Path) -> io::Result<tokio::net::UnixStream> {
    use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
    let name = path.as_os_str().as_bytes();
    match name.strip_prefix(b"@") {
        Some(abstract_name) => {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            // A unix connect completes or fails at once; it never waits on a network.
            let stream = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            stream.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(stream)
        }
        None => tokio::net::UnixStream::connect(path).await,
    }
}
