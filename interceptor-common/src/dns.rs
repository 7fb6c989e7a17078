//! DNS capture: where the programs send queries to port 53, set once at load time.

use crate::address::SocketAddress;

/// The symbol of the programs' [`DnsCapture`] global, which the loader overrides.
pub const DNS_CAPTURE_SYMBOL: &str = "DNS_CAPTURE";

/// The port whose UDP and TCP traffic is captured.
pub const DNS_PORT: [u8; 2] = 53u16.to_be_bytes();

/// The daemon's DNS server, where captured queries go: the IPv4 listener
/// (IPv4-mapped) for IPv4 nameservers, the IPv6 one for native IPv6 nameservers;
/// for sockets in other network namespaces (containers, pods), which cannot reach
/// the daemon's loopback, the listeners on the container proxy addresses. A listener
/// with port zero is not there, and queries it would take go direct; all at zero
/// turn capture off.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsCapture {
    pub v4: SocketAddress,
    pub v6: SocketAddress,
    pub container_v4: SocketAddress,
    pub container_v6: SocketAddress,
}

impl DnsCapture {
    pub const OFF: Self = Self {
        v4: SocketAddress::NONE,
        v6: SocketAddress::NONE,
        container_v4: SocketAddress::NONE,
        container_v6: SocketAddress::NONE,
    };
}

/// The symbol of the programs' [`VipRefuse`] global, which the loader overrides.
pub const VIP_REFUSE_SYMBOL: &str = "VIP_REFUSE";

/// Where a TCP connect to a port no entry declares on an allocated VIP is sent: a loopback port the daemon holds bound
/// and never listens on, so the connect is refused at once instead of hanging on an
/// address that exists nowhere. Port zero: left alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipRefuse {
    pub v4: SocketAddress,
    pub v6: SocketAddress,
}

impl VipRefuse {
    pub const OFF: Self = Self {
        v4: SocketAddress::NONE,
        v6: SocketAddress::NONE,
    };
}

/// The hash map of allocated VIPs (IPv4-mapped or IPv6 address → 1): only these are
/// refused on undeclared ports, never another address in the ranges.
pub const ALLOCATED_VIPS_MAP: &str = "ALLOCATED_VIPS";
/// Two per host: 32,768 hosts.
pub const ALLOCATED_VIPS_CAPACITY: u32 = 65_536;
