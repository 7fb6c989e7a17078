//! The address table: which service port an original destination names by its
//! address, the longest prefix on the destination port winning.

use std::{
    collections::{HashMap, hash_map::Entry},
    net::SocketAddr,
};

use interceptor_common::{mapped_bits, mapped_prefix_len};
use ipnet::IpNet;

/// Per destination port, the address rules grouped by prefix length, longest first,
/// so a lookup costs one hash probe per distinct prefix length on that port, however
/// many entries are loaded.
#[derive(Debug, Default)]
pub(super) struct AddressTable {
    by_port: HashMap<u16, Vec<PrefixGroup>>,
}

#[derive(Debug)]
struct PrefixGroup {
    /// In IPv6 bits: IPv4 networks are held IPv4-mapped, as the kernel holds them.
    prefix_len: u8,
    /// Network address (host bits cleared) → (service index, port index).
    networks: HashMap<u128, (usize, usize)>,
}

impl AddressTable {
    /// Claims `network` on `port` for `value` (service index, port index), unless an
    /// older entry already claims it: then `false`, and the older one keeps it.
    pub(super) fn insert(&mut self, network: &IpNet, port: u16, value: (usize, usize)) -> bool {
        let prefix_len = mapped_prefix_len(network.addr(), network.prefix_len());
        let groups = self.by_port.entry(port).or_default();
        let group = match groups
            .iter_mut()
            .position(|group| group.prefix_len == prefix_len)
        {
            Some(position) => &mut groups[position],
            None => {
                groups.push(PrefixGroup {
                    prefix_len,
                    networks: HashMap::new(),
                });
                groups.last_mut().expect("just pushed")
            }
        };
        match group.networks.entry(mapped_bits(network.network())) {
            Entry::Vacant(slot) => {
                slot.insert(value);
                true
            }
            Entry::Occupied(_) => false,
        }
    }

    /// Puts each port's longest prefixes first; called once, after the last insert.
    pub(super) fn finish(&mut self) {
        for groups in self.by_port.values_mut() {
            groups.sort_by_key(|group| std::cmp::Reverse(group.prefix_len));
        }
    }

    /// The value of the longest prefix holding the destination's address on its port.
    pub(super) fn lookup(&self, destination: SocketAddr) -> Option<(usize, usize)> {
        let address = mapped_bits(destination.ip());
        self.by_port.get(&destination.port()).and_then(|groups| {
            groups.iter().find_map(|group| {
                let mask = prefix_mask(group.prefix_len);
                group.networks.get(&(address & mask)).copied()
            })
        })
    }
}

fn prefix_mask(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::{Registry, test_support::*};

    #[test]
    fn the_longest_prefix_on_the_destination_port_wins() {
        let wide = entry(
            "wide",
            "  addresses: [198.18.0.0/16]\n  ports: [{number: 80, name: http}]\n",
        );
        let narrow = entry(
            "narrow",
            "  addresses: [198.18.5.0/24]\n  ports: [{number: 80, name: http}]\n",
        );
        let other_port = entry(
            "other-port",
            "  addresses: [198.18.5.7]\n  ports: [{number: 81, name: http}]\n",
        );
        let (registry, warnings) =
            Registry::build(&config(&[&wide, &narrow, &other_port])).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let name = |destination| route_name(&registry, destination);
        assert_eq!(
            name("198.18.5.7:80").as_deref(),
            Some("ServiceEntry/default/narrow")
        );
        assert_eq!(
            name("198.18.6.7:80").as_deref(),
            Some("ServiceEntry/default/wide")
        );
        assert_eq!(
            name("198.18.5.7:81").as_deref(),
            Some("ServiceEntry/default/other-port")
        );
        assert_eq!(name("198.19.0.1:80"), None);
        assert_eq!(name("198.18.6.7:81"), None);
    }

    #[test]
    fn each_family_matches_only_its_own_networks() {
        let every_ipv6 = entry(
            "every-ipv6",
            "  addresses: [\"::/0\"]\n  ports: [{number: 80, name: http}]\n",
        );
        let every_ipv4 = entry(
            "every-ipv4",
            "  addresses: [0.0.0.0/0]\n  ports: [{number: 80, name: http}]\n",
        );
        let narrow_ipv6 = entry(
            "narrow-ipv6",
            "  addresses: [\"2001:2::/64\"]\n  ports: [{number: 80, name: http}]\n",
        );
        let (registry, warnings) =
            Registry::build(&config(&[&every_ipv6, &every_ipv4, &narrow_ipv6])).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let name = |destination| route_name(&registry, destination);
        assert_eq!(
            name("198.18.0.1:80").as_deref(),
            Some("ServiceEntry/default/every-ipv4")
        );
        assert_eq!(
            name("[2001:2::7]:80").as_deref(),
            Some("ServiceEntry/default/narrow-ipv6")
        );
        assert_eq!(
            name("[2001:3::7]:80").as_deref(),
            Some("ServiceEntry/default/every-ipv6")
        );
        assert_eq!(name("[2001:2::7]:81"), None);
    }
}
