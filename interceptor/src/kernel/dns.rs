//! DNS capture: the listeners the programs send port-53 queries to, and attaching
//! the sendmsg and recvmsg hooks (connect4/6 capture TCP and connected UDP).

use std::{
    fs::File,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use interceptor_common::{
    ALLOCATED_VIPS_MAP, Address, DnsCapture, SocketAddress, VipRefuse, address_of,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::{KernelError, program, program_error};

const PROGRAMS: [&str; 4] = [
    "dns_recvmsg4",
    "dns_recvmsg6",
    "dns_sendmsg4",
    "dns_sendmsg6",
];

/// Where captured queries go: the daemon's DNS listeners, on loopback for its own
/// network namespace and on the container proxy addresses for the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsListeners {
    pub v4: Option<SocketAddrV4>,
    pub v6: Option<SocketAddrV6>,
    pub container_v4: Option<SocketAddrV4>,
    pub container_v6: Option<SocketAddrV6>,
}

impl DnsListeners {
    /// The first loopback listener of each family among `bound`, for sockets in the
    /// daemon's own network namespace, and the first of each family among
    /// `containers`, for the others.
    pub fn from_bound(bound: &[SocketAddr], containers: &[SocketAddr]) -> Self {
        let mut listeners = DnsListeners::default();
        for addr in bound.iter().filter(|addr| addr.ip().is_loopback()) {
            match addr {
                SocketAddr::V4(v4) => _ = listeners.v4.get_or_insert(*v4),
                SocketAddr::V6(v6) => _ = listeners.v6.get_or_insert(*v6),
            }
        }
        for addr in containers {
            match addr {
                SocketAddr::V4(v4) => _ = listeners.container_v4.get_or_insert(*v4),
                SocketAddr::V6(v6) => _ = listeners.container_v6.get_or_insert(*v6),
            }
        }
        listeners
    }

    pub(super) fn capture(self) -> DnsCapture {
        let of = |addr: Option<SocketAddr>| addr.map_or(SocketAddress::NONE, SocketAddress::of);
        DnsCapture {
            v4: of(self.v4.map(Into::into)),
            v6: of(self.v6.map(Into::into)),
            container_v4: of(self.container_v4.map(Into::into)),
            container_v6: of(self.container_v6.map(Into::into)),
        }
    }
}

/// Loopback ports held bound and never listened on: a TCP connect to one is refused
/// at once, which is what a connect to an undeclared port of a VIP gets.
pub(super) struct Refusal {
    _sockets: Vec<Socket>,
    pub(super) settings: VipRefuse,
}

impl Refusal {
    pub(super) fn bind() -> Result<Self, KernelError> {
        let hold = |addr: SocketAddr| -> std::io::Result<(Socket, SocketAddress)> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.bind(&addr.into())?;
            let bound = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
            Ok((socket, SocketAddress::of(bound)))
        };
        let (v4, v4_addr) =
            hold(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(KernelError::Refusal)?;
        let mut sockets = vec![v4];
        // Without IPv6 on the host there are no IPv6 connects to refuse.
        let v6_addr = match hold(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))) {
            Ok((v6, addr)) => {
                sockets.push(v6);
                addr
            }
            Err(_) => SocketAddress::NONE,
        };
        Ok(Refusal {
            _sockets: sockets,
            settings: VipRefuse {
                v4: v4_addr,
                v6: v6_addr,
            },
        })
    }
}

/// The allocated VIPs the programs refuse undeclared ports of.
pub(super) struct AllocatedVips {
    map: HashMap<MapData, Address, u8>,
    current: std::collections::HashSet<Address>,
}

impl AllocatedVips {
    pub(super) fn new(map: HashMap<MapData, Address, u8>) -> Self {
        AllocatedVips {
            map,
            current: Default::default(),
        }
    }

    /// New VIPs first, then stale ones out; a failed step is redone by the next sync,
    /// which rewrites every wanted key.
    pub(super) fn sync(&mut self, wanted: &[std::net::IpAddr]) -> Result<(), KernelError> {
        let wanted: std::collections::HashSet<Address> =
            wanted.iter().map(|&ip| address_of(ip)).collect();
        let error = |source| KernelError::Map {
            name: ALLOCATED_VIPS_MAP,
            source,
        };
        for vip in &wanted {
            self.map.insert(vip, 1, 0).map_err(error)?;
            self.current.insert(*vip);
        }
        let stale: Vec<Address> = self.current.difference(&wanted).copied().collect();
        for vip in stale {
            match self.map.remove(&vip) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                    self.current.remove(&vip);
                }
                Err(source) => return Err(error(source)),
            }
        }
        Ok(())
    }
}

/// Attaches the recvmsg hooks first, so no captured query's reply ever shows the
/// listener as its source, then the sendmsg ones.
pub(super) fn attach(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), KernelError> {
    for name in PROGRAMS {
        let hook: &mut CgroupSockAddr = program(ebpf, name)?;
        hook.load().map_err(program_error(name))?;
        hook.attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_listeners_serve_the_own_namespace_and_container_ones_the_rest() {
        let parse = |addrs: &[&str]| -> Vec<SocketAddr> {
            addrs.iter().map(|addr| addr.parse().unwrap()).collect()
        };
        let bound = parse(&[
            "10.0.0.1:53",
            "127.0.0.1:15053",
            "[::1]:15053",
            "198.18.5.1:15053",
        ]);
        let listeners = DnsListeners::from_bound(&bound, &parse(&["198.18.5.1:15053"]));
        assert_eq!(listeners.v4, Some("127.0.0.1:15053".parse().unwrap()));
        assert_eq!(listeners.v6, Some("[::1]:15053".parse().unwrap()));
        assert_eq!(
            listeners.container_v4,
            Some("198.18.5.1:15053".parse().unwrap())
        );
        assert_eq!(listeners.container_v6, None);
        let capture = listeners.capture();
        assert_eq!(
            capture.container_v4,
            SocketAddress::of("198.18.5.1:15053".parse().unwrap())
        );
        assert_eq!(capture.container_v6, SocketAddress::NONE);
        assert_eq!(DnsListeners::default().capture(), DnsCapture::OFF);
    }
}
