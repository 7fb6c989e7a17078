//! Keeping the interception maps, the port filter in front of them and the kernel
//! path's backend sets in step with the wanted [`KernelRules`].

use std::collections::{BTreeSet, HashMap as StdHashMap, HashSet};

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key};
use interceptor_common::{
    AUDIENCES_MAP, AudienceKey, BACKENDS_MAP, BackendSet, InterceptRule, PORT_FILTER_MAP,
    PORT_WORDS, SERVICE_ADDR_PORT_BITS, SERVICE_ADDRS_MAP, SERVICE_PORTS_MAP, ServiceAddrKey,
    address_of, mapped_prefix_len, port_bit,
};
use tracing::debug;

use super::{KernelError, map_error};
use crate::datapath::KernelRules;

/// A rule no plan produces (rule ids are service indexes), standing for "this key may
/// or may not be in the map, with any value".
const UNKNOWN_RULE: InterceptRule = InterceptRule {
    rule_id: u32::MAX,
    backends: u32::MAX,
    audience: u32::MAX,
};

type AddressRules = StdHashMap<(ipnet::IpNet, u16), InterceptRule>;
type PortRules = StdHashMap<u16, InterceptRule>;

pub(super) struct InterceptionMaps {
    addresses: LpmTrie<MapData, ServiceAddrKey, InterceptRule>,
    ports: HashMap<MapData, u16, InterceptRule>,
    port_filter: Array<MapData, u64>,
    /// What `port_filter` holds, word by word.
    port_filter_words: Vec<u64>,
    backends: HashMap<MapData, u32, BackendSet>,
    /// What `backends` holds; `None`: the key may or may not be there, with any value.
    current_backends: StdHashMap<u32, Option<BackendSet>>,
    audiences: HashMap<MapData, AudienceKey, u8>,
    /// What `audiences` holds; `None` after a failed write, when any key may be there.
    current_audiences: Option<BTreeSet<AudienceKey>>,
    current: KernelRules,
}

impl InterceptionMaps {
    /// The maps as the programs were loaded with them: empty.
    pub(super) fn new(
        addresses: LpmTrie<MapData, ServiceAddrKey, InterceptRule>,
        ports: HashMap<MapData, u16, InterceptRule>,
        port_filter: Array<MapData, u64>,
        backends: HashMap<MapData, u32, BackendSet>,
        audiences: HashMap<MapData, AudienceKey, u8>,
    ) -> Self {
        Self {
            addresses,
            ports,
            port_filter,
            port_filter_words: vec![0; 2 * PORT_WORDS as usize],
            backends,
            current_backends: StdHashMap::new(),
            audiences,
            current_audiences: Some(BTreeSet::new()),
            current: KernelRules::default(),
        }
    }

    /// What the maps hold now, or may hold after a failed [`Self::sync`].
    pub(super) fn current(&self) -> &KernelRules {
        &self.current
    }

    /// See [`super::Kernel::sync`]. Backend sets and audience members are written
    /// before the rules that point at them and deleted after, so no rule points at a
    /// missing set or loses a member it keeps; ids are stable, so a set whose
    /// endpoints change is rewritten in place.
    pub(super) fn sync(&mut self, wanted: &KernelRules) -> Result<(), KernelError> {
        let current_audiences = self.current_audiences.take();
        let written = self
            .write_backends(&wanted.backends)
            .and_then(|()| self.write_audiences(current_audiences.as_ref(), &wanted.audiences));
        let applied = written.and_then(|()| self.sync_rules(wanted));
        let applied = applied
            .and_then(|()| self.delete_stale_backends(&wanted.backends))
            .and_then(|()| self.delete_stale_audiences(current_audiences, &wanted.audiences));
        if applied.is_err() {
            for set in self.current_backends.values_mut() {
                *set = None;
            }
        } else {
            self.current_audiences = Some(wanted.audiences.clone());
        }
        applied
    }

    fn write_audiences(
        &mut self,
        current: Option<&BTreeSet<AudienceKey>>,
        wanted: &BTreeSet<AudienceKey>,
    ) -> Result<(), KernelError> {
        for member in wanted {
            if current.is_none_or(|current| !current.contains(member)) {
                self.audiences
                    .insert(member, 1, 0)
                    .map_err(map_error(AUDIENCES_MAP))?;
            }
        }
        Ok(())
    }

    /// `current` unknown (a failed sync): whatever the map holds is a candidate.
    fn delete_stale_audiences(
        &mut self,
        current: Option<BTreeSet<AudienceKey>>,
        wanted: &BTreeSet<AudienceKey>,
    ) -> Result<(), KernelError> {
        let current =
            current.unwrap_or_else(|| self.audiences.keys().filter_map(Result::ok).collect());
        for member in current.difference(wanted) {
            ignore_missing(self.audiences.remove(member)).map_err(map_error(AUDIENCES_MAP))?;
        }
        Ok(())
    }

    fn write_backends(&mut self, wanted: &StdHashMap<u32, BackendSet>) -> Result<(), KernelError> {
        for (id, set) in wanted {
            if self.current_backends.get(id) != Some(&Some(*set)) {
                // Unknown until the write is known to have happened.
                self.current_backends.insert(*id, None);
                self.backends
                    .insert(id, set, 0)
                    .map_err(map_error(BACKENDS_MAP))?;
                self.current_backends.insert(*id, Some(*set));
            }
        }
        Ok(())
    }

    fn delete_stale_backends(
        &mut self,
        wanted: &StdHashMap<u32, BackendSet>,
    ) -> Result<(), KernelError> {
        let stale: Vec<u32> = self
            .current_backends
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            ignore_missing(self.backends.remove(&id)).map_err(map_error(BACKENDS_MAP))?;
            self.current_backends.remove(&id);
        }
        Ok(())
    }

    fn sync_rules(&mut self, wanted: &KernelRules) -> Result<(), KernelError> {
        let old_addresses: AddressRules = self
            .current
            .addresses
            .iter()
            .map(|(net, port, id)| ((*net, *port), *id))
            .collect();
        let new_addresses: AddressRules = wanted
            .addresses
            .iter()
            .map(|(net, port, id)| ((*net, *port), *id))
            .collect();
        let old_ports: PortRules = self.current.ports.iter().copied().collect();
        let new_ports: PortRules = wanted.ports.iter().copied().collect();

        let applied =
            self.apply_changes((&old_addresses, &new_addresses), (&old_ports, &new_ports));
        self.current = match &applied {
            Ok(()) => {
                debug!(
                    addresses = wanted.addresses.len(),
                    ports = wanted.ports.len(),
                    kernel_path = wanted.backends.len(),
                    "interception maps synced"
                );
                wanted.clone()
            }
            // Unknown values make the next sync rewrite every key; keys from both
            // sides make it delete whatever it no longer wants.
            Err(_) => KernelRules {
                addresses: old_addresses
                    .keys()
                    .chain(new_addresses.keys())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .map(|(net, port)| (*net, *port, UNKNOWN_RULE))
                    .collect(),
                ports: old_ports
                    .keys()
                    .chain(new_ports.keys())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .map(|port| (*port, UNKNOWN_RULE))
                    .collect(),
                backends: StdHashMap::new(),
                audiences: BTreeSet::new(),
                proxied: Vec::new(),
            },
        };
        applied
    }

    fn apply_changes(
        &mut self,
        (old_addresses, new_addresses): (&AddressRules, &AddressRules),
        (old_ports, new_ports): (&PortRules, &PortRules),
    ) -> Result<(), KernelError> {
        // Ports of both configs pass the filter while the rules change, and only the new
        // config's once they have.
        let old_filter = port_filter_words(old_addresses, old_ports);
        let new_filter = port_filter_words(new_addresses, new_ports);
        let both: Vec<u64> = old_filter
            .iter()
            .zip(&new_filter)
            .map(|(old, new)| old | new)
            .collect();
        self.write_port_filter(&both)?;
        let (added, changed): (Vec<_>, Vec<_>) = new_addresses
            .iter()
            .filter(|(key, id)| old_addresses.get(key) != Some(id))
            .partition(|(key, _)| !old_addresses.contains_key(key));
        for ((net, port), id) in added.into_iter().chain(changed) {
            self.addresses
                .insert(&address_key(*net, *port), *id, 0)
                .map_err(map_error(SERVICE_ADDRS_MAP))?;
        }
        let (added, changed): (Vec<_>, Vec<_>) = new_ports
            .iter()
            .filter(|(port, id)| old_ports.get(port) != Some(id))
            .partition(|(port, _)| !old_ports.contains_key(port));
        for (port, id) in added.into_iter().chain(changed) {
            self.ports
                .insert(*port, *id, 0)
                .map_err(map_error(SERVICE_PORTS_MAP))?;
        }
        for (net, port) in old_addresses
            .keys()
            .filter(|key| !new_addresses.contains_key(key))
        {
            ignore_missing(self.addresses.remove(&address_key(*net, *port)))
                .map_err(map_error(SERVICE_ADDRS_MAP))?;
        }
        for port in old_ports
            .keys()
            .filter(|port| !new_ports.contains_key(port))
        {
            ignore_missing(self.ports.remove(port)).map_err(map_error(SERVICE_PORTS_MAP))?;
        }
        self.write_port_filter(&new_filter)
    }

    /// Writes the words that differ from what the map holds.
    fn write_port_filter(&mut self, wanted: &[u64]) -> Result<(), KernelError> {
        for (index, &word) in wanted.iter().enumerate() {
            if self.port_filter_words[index] != word {
                self.port_filter
                    .set(index as u32, word, 0)
                    .map_err(map_error(PORT_FILTER_MAP))?;
                self.port_filter_words[index] = word;
            }
        }
        Ok(())
    }
}

/// The [`PORT_FILTER_MAP`] bitmaps for a set of rules.
fn port_filter_words(addresses: &AddressRules, ports: &PortRules) -> Vec<u64> {
    let mut words = vec![0; 2 * PORT_WORDS as usize];
    for (_, port) in addresses.keys() {
        let (word, bit) = port_bit(*port);
        words[word as usize] |= bit;
    }
    for port in ports.keys() {
        let (word, bit) = port_bit(*port);
        words[(PORT_WORDS + word) as usize] |= bit;
    }
    words
}

/// A delete of a key that is already gone has done its job: after a failed sync the
/// daemon only knows which keys may be present.
pub(super) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(aya::sys::SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// IPv4 networks go in IPv4-mapped, as the programs look IPv4 destinations up.
fn address_key(network: ipnet::IpNet, port: u16) -> Key<ServiceAddrKey> {
    let prefix_len = mapped_prefix_len(network.addr(), network.prefix_len());
    Key::new(
        SERVICE_ADDR_PORT_BITS + u32::from(prefix_len),
        ServiceAddrKey {
            port: port.to_be_bytes(),
            _pad: [0; 2],
            addr: address_of(network.network()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_filter_has_a_bit_per_port_with_rules_of_each_kind() {
        let rule = |rule_id| InterceptRule {
            rule_id,
            backends: interceptor_common::PROXY_PATH,
            audience: interceptor_common::EVERYONE,
        };
        let addresses: AddressRules = [
            (("240.240.0.0/16".parse().unwrap(), 443), rule(1)),
            (("2001:2::/64".parse().unwrap(), 443), rule(2)),
            (("198.18.0.10/32".parse().unwrap(), 65_535), rule(3)),
        ]
        .into();
        let ports: PortRules = [(0, rule(4)), (5432, rule(5))].into();
        let words = port_filter_words(&addresses, &ports);
        let set = |offset: u32, port: u16| {
            let (word, bit) = port_bit(port);
            words[(offset + word) as usize] & bit != 0
        };
        let with_addresses: Vec<u16> = (0..=u16::MAX).filter(|&port| set(0, port)).collect();
        let with_port_rule: Vec<u16> = (0..=u16::MAX)
            .filter(|&port| set(PORT_WORDS, port))
            .collect();
        assert_eq!(with_addresses, [443, 65_535]);
        assert_eq!(with_port_rule, [0, 5432]);
        assert_eq!(words.len(), 2 * PORT_WORDS as usize);
    }

    #[test]
    fn address_keys_hold_ipv4_networks_mapped() {
        let v4 = address_key("240.240.0.0/16".parse().unwrap(), 443);
        assert_eq!(v4.prefix_len(), SERVICE_ADDR_PORT_BITS + 96 + 16);
        assert_eq!(v4.data().port, 443u16.to_be_bytes());
        assert_eq!(
            v4.data().addr,
            address_of("::ffff:240.240.0.0".parse().unwrap())
        );
        let v6 = address_key("2001:2::/64".parse().unwrap(), 443);
        assert_eq!(v6.prefix_len(), SERVICE_ADDR_PORT_BITS + 64);
    }
}
