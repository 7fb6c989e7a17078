//! Socket options the data path needs and tokio does not expose.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd as _, IntoRawFd as _},
    time::Duration,
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
    let (storage, length) = sockaddr(destination);
    // SAFETY: `storage` holds a valid sockaddr of `length` bytes for the call's duration.
    let result = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            length,
        )
    };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(())
    } else {
        Err(error)
    }
}

fn sockaddr(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match address {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

fn set_mark(socket: &impl AsRawFd, mark: u32) -> io::Result<()> {
    set_u32_option(socket, libc::SOL_SOCKET, libc::SO_MARK, mark)
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
