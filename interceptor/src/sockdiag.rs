//! What the kernel's socket diagnostics (NETLINK_SOCK_DIAG, what `ss -ti` reads) say
//! of the proxy's clients: live byte counts for `/connections`, and a client socket's
//! cgroup for `interceptor trace --cgroup`. Asked on demand, so the data path pays
//! nothing per connection for them.

use std::{collections::HashMap, io, net::SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// What the kernel counted on one accepted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBytes {
    /// Bytes received from the client.
    pub from_client: u64,
    /// Bytes sent to the client and acknowledged by it.
    pub to_client: u64,
}

/// Byte counts of every TCP socket accepted on `listener`, by the client's address.
pub fn accepted_socket_bytes(listener: SocketAddr) -> io::Result<HashMap<SocketAddr, SocketBytes>> {
    let unspecified = match listener {
        SocketAddr::V4(_) => SocketId::new_v4(),
        SocketAddr::V6(_) => SocketId::new_v6(),
    };
    let mut found = HashMap::new();
    inet_diag(
        InetRequest {
            family: family_of(listener),
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            // Every state but LISTEN: half-closed connections still count.
            states: StateFlags::from_bits_retain(!StateFlags::LISTEN.bits()),
            socket_id: SocketId {
                cookie: NO_COOKIE,
                ..unspecified
            },
        },
        true,
        |response| {
            if let Some((client, bytes)) = accepted_on(response, listener) {
                found.insert(client, bytes);
            }
        },
    )?;
    Ok(found)
}

/// The cgroup id of the socket at `local` connected to `remote` in this network
/// namespace (Linux 5.7's INET_DIAG_CGROUP_ID); `None` if there is no such socket or
/// the kernel does not say.
pub fn socket_cgroup(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
    let mut cgroup = None;
    let asked = inet_diag(
        InetRequest {
            family: family_of(local),
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                cookie: NO_COOKIE,
            },
        },
        false,
        |response| {
            cgroup = response.nlas.iter().find_map(|nla| match nla {
                Nla::Other(attribute)
                    if attribute.kind() == INET_DIAG_CGROUP_ID && attribute.value_len() == 8 =>
                {
                    let mut value = [0; 8];
                    attribute.emit_value(&mut value);
                    Some(u64::from_ne_bytes(value))
                }
                _ => None,
            });
        },
    );
    match asked {
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        asked => asked.map(|()| cgroup),
    }
}

/// `enum inet_diag_attrs`: the socket's cgroup id, a u64.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// INET_DIAG_NOCOOKIE: match the socket by its addresses alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

fn family_of(address: SocketAddr) -> u8 {
    match address {
        SocketAddr::V4(_) => AF_INET,
        SocketAddr::V6(_) => AF_INET6,
    }
}

/// Sends `request` and hands each socket the kernel answers with to `each`: every
/// matching one for a `dump`, else the one socket `request` names (ENOENT: none).
fn inet_diag(
    request: InetRequest,
    dump: bool,
    mut each: impl FnMut(&InetResponse),
) -> io::Result<()> {
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    // Port 0 is the kernel.
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = if dump {
        NLM_F_REQUEST | NLM_F_DUMP
    } else {
        NLM_F_REQUEST
    };
    let mut request = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    request.finalize();
    let mut sent = vec![0; request.buffer_len()];
    request.serialize(&mut sent);
    socket.send(&sent, 0)?;

    let mut buffer = Vec::with_capacity(64 * 1024);
    loop {
        buffer.clear();
        socket.recv(&mut buffer, 0)?;
        let mut messages = &buffer[..];
        while !messages.is_empty() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(messages)
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => return Err(error.to_io()),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    each(&response);
                    // A lookup of one socket is answered by one message, with no Done.
                    if !dump {
                        return Ok(());
                    }
                }
                _ => {}
            }
            messages = messages.get(align(length)..).unwrap_or_default();
        }
    }
}

/// The socket's client address and byte counts, if it was accepted on `listener`.
fn accepted_on(response: &InetResponse, listener: SocketAddr) -> Option<(SocketAddr, SocketBytes)> {
    let id = &response.header.socket_id;
    if SocketAddr::new(id.source_address, id.source_port) != listener {
        return None;
    }
    let client = SocketAddr::new(id.destination_address, id.destination_port);
    response.nlas.iter().find_map(|nla| match nla {
        // Raw, as the kernel's struct tcp_info grows between versions and only two
        // of its fields matter here.
        Nla::TcpInfo(info) => Some((
            client,
            SocketBytes {
                from_client: read_u64(
                    info,
                    std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received),
                )?,
                to_client: read_u64(info, std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked))?,
            },
        )),
        _ => None,
    })
}

fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        bytes.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

/// Netlink messages start on 4-byte boundaries.
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

    #[test]
    fn a_client_socket_is_in_the_cgroup_of_its_process() {
        use std::os::unix::fs::MetadataExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let client = TcpStream::connect(address).unwrap();
        let _accepted = listener.accept().unwrap();

        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let relative = cgroup
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .expect("a cgroup2 line");
        let root = interceptor_common::host::cgroup2_root().unwrap();
        let expected = std::fs::metadata(root.join(relative.trim_start_matches('/')))
            .unwrap()
            .ino();
        let local = client.local_addr().unwrap();
        assert_eq!(socket_cgroup(local, address).unwrap(), Some(expected));
        // No socket has these addresses.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(socket_cgroup(nobody, address).unwrap(), None);
    }
}
