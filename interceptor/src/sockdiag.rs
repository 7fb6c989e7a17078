//! Live byte counts of the proxy's client sockets, from the kernel's socket
//! diagnostics (NETLINK_SOCK_DIAG, what `ss -ti` reads). Asked on demand for
//! `/connections`, so the data path pays nothing per connection for them.

use std::{
    collections::HashMap,
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// What the kernel counted on one accepted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBytes {
    /// Bytes received from the client.
    pub from_client: u64,
    /// Bytes sent to the client and acknowledged by it.
    pub to_client: u64,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_INFO: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;

#[repr(C)]
struct NetlinkHeader {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SocketId {
    source_port: [u8; 2],
    destination_port: [u8; 2],
    source: [[u8; 4]; 4],
    destination: [[u8; 4]; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
struct InetDiagRequest {
    family: u8,
    protocol: u8,
    extensions: u8,
    _pad: u8,
    states: u32,
    id: SocketId,
}

#[repr(C)]
struct DumpRequest {
    header: NetlinkHeader,
    request: InetDiagRequest,
}

/// The fixed part of each answer (`struct inet_diag_msg`), before its attributes.
const INET_DIAG_MSG_LEN: usize = 72;
const SOCKET_ID_OFFSET: usize = 4;

/// Byte counts of every TCP socket accepted on `listener`, by the client's address.
pub fn accepted_socket_bytes(listener: SocketAddr) -> io::Result<HashMap<SocketAddr, SocketBytes>> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let request = DumpRequest {
        header: NetlinkHeader {
            len: size_of::<DumpRequest>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            seq: 1,
            pid: 0,
        },
        request: InetDiagRequest {
            family: match listener {
                SocketAddr::V4(_) => libc::AF_INET as u8,
                SocketAddr::V6(_) => libc::AF_INET6 as u8,
            },
            protocol: libc::IPPROTO_TCP as u8,
            extensions: 1 << (INET_DIAG_INFO - 1),
            _pad: 0,
            // Every state but LISTEN: half-closed connections still count.
            states: !(1 << TCP_LISTEN),
            id: SocketId {
                source_port: [0; 2],
                destination_port: [0; 2],
                source: [[0; 4]; 4],
                destination: [[0; 4]; 4],
                interface: 0,
                cookie: [u32::MAX; 2],
            },
        },
    };
    // SAFETY: the kernel reads `len` bytes of a repr(C) request we own; a zeroed
    // sockaddr_nl addresses the kernel.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            socket.as_raw_fd(),
            (&request as *const DumpRequest).cast(),
            size_of::<DumpRequest>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut found = HashMap::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv writes at most buffer.len() bytes into the buffer we own.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut messages = &buffer[..received as usize];
        while messages.len() >= size_of::<NetlinkHeader>() {
            let length = u32::from_ne_bytes(messages[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(messages[4..6].try_into().unwrap_or_default());
            if length < size_of::<NetlinkHeader>() || length > messages.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let code = messages
                        .get(16..20)
                        .and_then(|bytes| bytes.try_into().ok())
                        .map_or(0, i32::from_ne_bytes);
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some((client, bytes)) =
                        parse_socket(&messages[size_of::<NetlinkHeader>()..length], listener)
                    {
                        found.insert(client, bytes);
                    }
                }
                _ => {}
            }
            messages = messages.get(align(length)..).unwrap_or_default();
        }
    }
}

/// One `inet_diag_msg`: the socket's client address and byte counts, if the socket
/// was accepted on `listener`.
fn parse_socket(message: &[u8], listener: SocketAddr) -> Option<(SocketAddr, SocketBytes)> {
    let id = message.get(SOCKET_ID_OFFSET..SOCKET_ID_OFFSET + size_of::<SocketId>())?;
    let local_port = u16::from_be_bytes([id[0], id[1]]);
    let remote_port = u16::from_be_bytes([id[2], id[3]]);
    // Both addresses take 16 bytes; an IPv4 one fills the first 4.
    let address = |bytes: &[u8]| -> Option<IpAddr> {
        Some(match listener {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?)),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        })
    };
    let local = address(&id[4..20])?;
    let remote = address(&id[20..36])?;
    if SocketAddr::new(local, local_port) != listener {
        return None;
    }
    let mut attributes = message.get(INET_DIAG_MSG_LEN..)?;
    while attributes.len() >= 4 {
        let length = u16::from_ne_bytes([attributes[0], attributes[1]]) as usize;
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
        if length < 4 || length > attributes.len() {
            return None;
        }
        if kind == INET_DIAG_INFO {
            let info = &attributes[4..length];
            let bytes = SocketBytes {
                from_client: read_u64(
                    info,
                    std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received),
                )?,
                to_client: read_u64(info, std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked))?,
            };
            return Some((SocketAddr::new(remote, remote_port), bytes));
        }
        attributes = attributes.get(align(length)..).unwrap_or_default();
    }
    None
}

fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        bytes.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

/// Netlink messages and attributes start on 4-byte boundaries.
fn align(length: usize) -> usize {
    (length + 3) & !3
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[test]
    fn counts_the_bytes_of_an_accepted_ipv4_socket() {
        counts_the_bytes_of_an_accepted_socket("127.0.0.1:0");
    }

    #[test]
    fn counts_the_bytes_of_an_accepted_ipv6_socket() {
        counts_the_bytes_of_an_accepted_socket("[::1]:0");
    }

    fn counts_the_bytes_of_an_accepted_socket(listen_on: &str) {
        let listener = TcpListener::bind(listen_on).unwrap();
        let address = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(address).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        client.write_all(&[1; 1000]).unwrap();
        let mut received = [0u8; 1000];
        accepted.read_exact(&mut received).unwrap();
        accepted.write_all(&[2; 300]).unwrap();
        let mut echoed = [0u8; 300];
        client.read_exact(&mut echoed).unwrap();

        let client_address = client.local_addr().unwrap();
        // The client's ACK of the 300 bytes may trail its read by a moment.
        for _ in 0..100 {
            let sockets = accepted_socket_bytes(address).unwrap();
            let bytes = sockets
                .get(&client_address)
                .copied()
                .expect("the accepted socket");
            assert_eq!(bytes.from_client, 1000);
            if bytes.to_client == 300 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the 300 bytes to the client were never acknowledged");
    }
}
