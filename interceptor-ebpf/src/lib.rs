//! Map types and names shared by the kernel programs and the daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding, so the two sides agree on the
//! layout byte for byte. Ports are kept in network byte order, exactly as the kernel
//! hands them to the programs, so the hot path never converts.
//!
//! Addresses are IPv6-sized for both families: an IPv4 address is held IPv4-mapped
//! (::ffff:a.b.c.d), which is also how a dual-stack socket shows it. One key type, one
//! LPM trie and one record format then serve connect4, connect6 and both kinds of
//! socket connect6 sees.
#![no_std]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// LPM trie of ServiceEntry `addresses` (IPs and CIDRs), each combined with one port.
pub const SERVICE_ADDRS_MAP: &str = "SERVICE_ADDRS";
/// Ports intercepted for every destination: ServiceEntries without `addresses`.
pub const SERVICE_PORTS_MAP: &str = "SERVICE_PORTS";
/// Two bitmaps over the 65,536 ports, in 64-bit words: which ports have address
/// rules (words `0..PORT_WORDS`), and which have a rule for every destination (words
/// `PORT_WORDS..`). connect4/6 read them first, so a connect to a port no
/// ServiceEntry names costs two array reads, not a trie walk and a hash lookup.
pub const PORT_FILTER_MAP: &str = "PORT_FILTER";
/// 64-bit words per bitmap of [`PORT_FILTER_MAP`].
pub const PORT_WORDS: u32 = 65_536 / 64;

/// Where `port`'s bit is in [`PORT_FILTER_MAP`]: the word of the address-rules
/// bitmap (add [`PORT_WORDS`] for the port-rules one) and the bit's mask.
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}
/// Socket storage: each redirected socket's original destination, recorded by
/// connect4/6, handed to the proxy by sockops and shown by getpeername.
pub const ORIGINAL_DST_STORAGE: &str = "ORIGINAL_DST";
/// Original destinations keyed by the client's address, where the proxy can find them.
pub const ORIG_BY_CLIENT_MAP: &str = "ORIG_BY_CLIENT";
/// The ring buffer through which sockops hands [`RedirectRecord`]s to the proxy.
pub const REDIRECTS_RING: &str = "REDIRECTS";
/// Per-CPU counters of what the programs could not do, indexed by [`KernelEvent`].
pub const KERNEL_EVENTS_MAP: &str = "KERNEL_EVENTS";

/// What the programs count in [`KERNEL_EVENTS_MAP`]: failures they cannot report to
/// anyone at the time, because they fail open or happen before the proxy is involved.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// connect4/6 could not allocate the socket's storage for its record, so the
    /// connect went direct instead of to the proxy.
    StorageUnavailable = 0,
    /// sockops found the ring and the fallback map full: the record was lost and the
    /// proxy refuses that connection.
    RecordLost = 1,
}

impl KernelEvent {
    pub const ALL: [Self; 2] = [Self::StorageUnavailable, Self::RecordLost];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The value of the `event` label in the daemon's metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::StorageUnavailable => "storage_unavailable",
            Self::RecordLost => "record_lost",
        }
    }
}

/// Global: the proxy's IPv4 listener address, network byte order.
pub const PROXY_ADDR4_GLOBAL: &str = "PROXY_ADDR4";
/// Global: the proxy's IPv4 listener port, network byte order.
pub const PROXY_PORT4_GLOBAL: &str = "PROXY_PORT4";
/// Global: the proxy's IPv6 listener address, as [`Address`] words.
pub const PROXY_ADDR6_GLOBAL: &str = "PROXY_ADDR6";
/// Global: the proxy's IPv6 listener port, network byte order; zero when the proxy has
/// no IPv6 listener, and native IPv6 connects are then left alone.
pub const PROXY_PORT6_GLOBAL: &str = "PROXY_PORT6";
/// Global: sockets carrying this SO_MARK are the daemon's own and are never redirected.
pub const BYPASS_MARK_GLOBAL: &str = "BYPASS_MARK";
/// Global: the cookie of the network namespace the proxy listens in. Only sockets in
/// it are redirected, since the proxy's loopback address means nothing in another
/// one; zero (a kernel without SO_NETNS_COOKIE) redirects in every namespace.
pub const PROXY_NETNS_COOKIE_GLOBAL: &str = "PROXY_NETNS_COOKIE";
/// Global: where IPv4 connects from other network namespaces (containers) are sent,
/// an address of the host they can reach, network byte order.
pub const CONTAINER_PROXY_ADDR4_GLOBAL: &str = "CONTAINER_PROXY_ADDR4";
/// Global: its port, network byte order; zero leaves other namespaces' connects alone.
pub const CONTAINER_PROXY_PORT4_GLOBAL: &str = "CONTAINER_PROXY_PORT4";
/// Global: the same for native IPv6 connects from other namespaces, as [`Address`]
/// words.
pub const CONTAINER_PROXY_ADDR6_GLOBAL: &str = "CONTAINER_PROXY_ADDR6";
/// Global: its port, network byte order; zero leaves them alone.
pub const CONTAINER_PROXY_PORT6_GLOBAL: &str = "CONTAINER_PROXY_PORT6";

pub const SERVICE_ADDRS_CAPACITY: u32 = 65_536;
pub const SERVICE_PORTS_CAPACITY: u32 = 65_536;
pub const ORIG_DST_CAPACITY: u32 = 262_144;
/// Bytes (a power of two, a multiple of the page size). A record takes 64 bytes with
/// its header, so the proxy may fall 32,768 connections behind before sockops falls
/// back to [`ORIG_BY_CLIENT_MAP`].
pub const REDIRECTS_RING_BYTES: u32 = 1 << 21;

/// Bits of [`ServiceAddrKey`] before the address: the port and its padding, always
/// zero. The port comes first in the key, so every stored prefix covers the whole port
/// and a lookup only ever matches entries for the destination's own port; the longest
/// address prefix among those wins.
pub const SERVICE_ADDR_PORT_BITS: u32 = 32;
/// Prefix length for a lookup of one exact destination.
pub const SERVICE_ADDR_LOOKUP_PREFIX: u32 = SERVICE_ADDR_PORT_BITS + 128;
/// Prefix bits an IPv4 network gains when held IPv4-mapped.
pub const IPV4_MAPPED_PREFIX_BITS: u8 = 96;

/// An IPv6 address, or an IPv4 one mapped into IPv6, as the four 32-bit words BPF
/// contexts expose (`user_ip6`, `local_ip6`): the address's bytes in network order, as
/// they sit in memory. Words rather than bytes because programs compare and copy them
/// a word at a time, as the verifier wants context fields read.
pub type Address = [u32; 4];

/// The third word of an IPv4-mapped address.
const MAPPED_MARKER: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `addr` (network byte order) as an IPv4-mapped [`Address`].
#[inline(always)]
pub const fn ipv4_mapped(addr: [u8; 4]) -> Address {
    [0, 0, MAPPED_MARKER, u32::from_ne_bytes(addr)]
}

/// The IPv4 address (network byte order) inside an IPv4-mapped [`Address`].
#[inline(always)]
pub const fn ipv4_in_mapped(address: Address) -> Option<[u8; 4]> {
    if address[0] == 0 && address[1] == 0 && address[2] == MAPPED_MARKER {
        Some(address[3].to_ne_bytes())
    } else {
        None
    }
}

/// An IP address as an [`Address`]: IPv4 mapped, IPv6 as is.
pub fn address_of(ip: IpAddr) -> Address {
    match ip {
        IpAddr::V4(ip) => ipv4_mapped(ip.octets()),
        IpAddr::V6(ip) => {
            let octets = ip.octets();
            core::array::from_fn(|word| {
                u32::from_ne_bytes([
                    octets[4 * word],
                    octets[4 * word + 1],
                    octets[4 * word + 2],
                    octets[4 * word + 3],
                ])
            })
        }
    }
}

/// The IP address an [`Address`] holds: IPv4 if it is IPv4-mapped.
pub fn ip_of(address: Address) -> IpAddr {
    if let Some(ipv4) = ipv4_in_mapped(address) {
        return IpAddr::V4(Ipv4Addr::from(ipv4));
    }
    let mut octets = [0; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(address) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(octets))
}

/// The data part of an LPM trie key for [`SERVICE_ADDRS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAddrKey {
    /// Destination port, network byte order.
    pub port: [u8; 2],
    /// Zero, and part of every prefix (see [`SERVICE_ADDR_PORT_BITS`]).
    pub _pad: [u8; 2],
    pub addr: Address,
}

/// Value of the interception maps: which registry rule claimed the destination.
/// The kernel only needs to know that something matched; the id helps when reading
/// the maps with bpftool.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterceptRule {
    pub rule_id: u32,
}

/// A TCP socket address of either family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketAddress {
    pub addr: Address,
    /// Port, network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

impl SocketAddress {
    pub fn of(addr: core::net::SocketAddr) -> Self {
        Self {
            addr: address_of(addr.ip()),
            port: addr.port().to_be_bytes(),
            _pad: [0; 2],
        }
    }

    /// The address as the proxy uses it: IPv4 if it is IPv4-mapped.
    pub fn socket_addr(&self) -> core::net::SocketAddr {
        core::net::SocketAddr::new(ip_of(self.addr), u16::from_be_bytes(self.port))
    }
}

/// Where a redirected connection was going before connect4/6 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    pub dst: SocketAddress,
    pub _pad: [u8; 4],
    /// CLOCK_MONOTONIC time of the redirect, so the daemon can sweep records whose
    /// connection never reached it.
    pub redirected_at_ns: u64,
}

/// A redirected connection's record as sockops hands it to the proxy: read from a
/// ring buffer in the proxy's memory, it costs the proxy no system call. `client` is
/// the client's end of its connection to the proxy: the peer address the proxy sees
/// on the accepted socket (IPv4-mapped for IPv4, as everywhere).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectRecord {
    pub client: SocketAddress,
    pub _pad: [u8; 4],
    pub original: OriginalDst,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::ServiceAddrKey {}
    unsafe impl aya::Pod for super::InterceptRule {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::SocketAddress {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<ServiceAddrKey>(), 2 + 2 + 16);
        assert_eq!(size_of::<SocketAddress>(), 16 + 2 + 2);
        assert_eq!(size_of::<OriginalDst>(), 20 + 4 + 8);
        assert_eq!(size_of::<RedirectRecord>(), 20 + 4 + 32);
    }

    #[test]
    fn addresses_round_trip_and_ipv4_is_mapped() {
        for ip in ["198.18.0.10", "0.0.0.0", "2001:2::1", "::1", "::ffff:0:1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = ip_of(address_of(ip));
            // ::ffff:0:1 is IPv4-mapped 0.0.0.1: the one spelling that changes family.
            let expected = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                IpAddr::V4(_) => ip,
            };
            assert_eq!(back, expected);
        }
        let mapped = address_of("240.240.3.3".parse().unwrap());
        assert_eq!(ipv4_in_mapped(mapped), Some([240, 240, 3, 3]));
        assert_eq!(
            mapped,
            address_of("::ffff:240.240.3.3".parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            ipv4_in_mapped(address_of("2001:2::1".parse().unwrap())),
            None
        );
    }
}
