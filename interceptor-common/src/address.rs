//! Addresses of both families in one form.
//!
//! Addresses are IPv6-sized for both families: an IPv4 address is held IPv4-mapped
//! (::ffff:a.b.c.d), which is also how a dual-stack socket shows it. One key type, one
//! LPM trie and one record format then serve connect4, connect6 and both kinds of
//! socket connect6 sees; the daemon's address table uses the same space.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
    let octets = mapped_bits(ip).to_be_bytes();
    core::array::from_fn(|word| {
        u32::from_ne_bytes([
            octets[4 * word],
            octets[4 * word + 1],
            octets[4 * word + 2],
            octets[4 * word + 3],
        ])
    })
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

/// An IP address as a number in the one space both families share: IPv4 mapped into
/// IPv6, so an IPv4 destination never matches an IPv6 network and the other way round.
pub fn mapped_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(ip) => u128::from(ip.to_ipv6_mapped()),
        IpAddr::V6(ip) => u128::from(ip),
    }
}

/// The prefix length of a network whose address is `ip`, once held as [`mapped_bits`].
pub fn mapped_prefix_len(ip: IpAddr, prefix_len: u8) -> u8 {
    match ip {
        IpAddr::V4(_) => IPV4_MAPPED_PREFIX_BITS + prefix_len,
        IpAddr::V6(_) => prefix_len,
    }
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
    /// No address: port zero tells the programs a listener is not there.
    pub const NONE: Self = Self {
        addr: [0; 4],
        port: [0; 2],
        _pad: [0; 2],
    };

    pub fn of(addr: SocketAddr) -> Self {
        Self {
            addr: address_of(addr.ip()),
            port: addr.port().to_be_bytes(),
            _pad: [0; 2],
        }
    }

    /// The address as the proxy uses it: IPv4 if it is IPv4-mapped.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(ip_of(self.addr), u16::from_be_bytes(self.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn mapped_bits_and_prefixes_put_ipv4_inside_ipv6() {
        let ipv4: IpAddr = "240.240.0.0".parse().unwrap();
        let ipv6: IpAddr = "2001:2::".parse().unwrap();
        assert_eq!(
            mapped_bits(ipv4),
            u128::from("::ffff:240.240.0.0".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(
            mapped_bits(ipv6),
            u128::from("2001:2::".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(mapped_prefix_len(ipv4, 16), 112);
        assert_eq!(mapped_prefix_len(ipv4, 0), IPV4_MAPPED_PREFIX_BITS);
        assert_eq!(mapped_prefix_len(ipv6, 64), 64);
        // The kernel's key words and the daemon's numbers hold the same bytes.
        for ip in [ipv4, ipv6] {
            assert_eq!(
                address_of(ip),
                address_of(IpAddr::V6(mapped_bits(ip).into()))
            );
        }
    }
}
