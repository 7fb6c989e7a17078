//! DNS capture: where the programs send queries to port 53, set once at load time.

use crate::address::SocketAddress;

/// The symbol of the programs' [`DnsCapture`] global, which the loader overrides.
pub const DNS_CAPTURE_SYMBOL: &str = "DNS_CAPTURE";

/// The port whose UDP and TCP traffic is captured.
pub const DNS_PORT: [u8; 2] = 53u16.to_be_bytes();

/// The daemon's DNS server, where captured queries go: the IPv4 listener
/// (IPv4-mapped) for IPv4 nameservers, the IPv6 one for native IPv6 nameservers. A
/// listener with port zero is not there, and queries it would take go direct; both
/// at zero turn capture off.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsCapture {
    pub v4: SocketAddress,
    pub v6: SocketAddress,
}

impl DnsCapture {
    pub const OFF: Self = Self {
        v4: SocketAddress::NONE,
        v6: SocketAddress::NONE,
    };
}
