//! Socket options the data path needs and tokio does not expose.

use std::{io, net::SocketAddr, os::fd::AsRawFd, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

/// Opens an upstream connection marked so that connect4 lets it through, even when the
/// programs are attached to a cgroup that contains the daemon itself.
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
    match tokio::time::timeout(timeout, socket.connect(destination)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

fn set_mark(socket: &impl AsRawFd, mark: u32) -> io::Result<()> {
    set_u32_option(socket, libc::SOL_SOCKET, libc::SO_MARK, mark)
}

/// Sets TCP_NODELAY on a listener: Linux copies it to every accepted socket, which
/// saves a system call per connection.
pub fn set_nodelay_for_accepted(listener: &impl AsRawFd) -> io::Result<()> {
    set_u32_option(listener, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

fn set_u32_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: u32,
) -> io::Result<()> {
    // SAFETY: both options take a u32 by pointer and length.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            &value as *const u32 as *const libc::c_void,
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Closes with a RST instead of a FIN, so the client sees at once that the
/// connection failed rather than a clean, empty response.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
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
