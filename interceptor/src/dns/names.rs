//! The names the DNS server answers itself, and with what: built from a registry
//! snapshot, swapped whole on reload like the registry.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use crate::{
    config::Resolution,
    registry::{EndpointAddress, HostTable, Registry},
};

/// The addresses of one host, by family.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    /// A DYNAMIC_DNS wildcard host, without addresses of its own: each name under it
    /// gets VIPs when first looked up.
    pub dynamic: bool,
}

impl Records {
    fn add(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) if !self.v4.contains(&v4) => self.v4.push(v4),
            IpAddr::V6(v6) if !self.v6.contains(&v6) => match v6.to_ipv4_mapped() {
                Some(v4) => self.add(IpAddr::V4(v4)),
                None => self.v6.push(v6),
            },
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// A local answer: the records, and the host they belong to when the name asked was
/// that host under a search domain (answered with a CNAME to the host).
#[derive(Debug, PartialEq, Eq)]
pub struct Found<'a> {
    pub records: &'a Records,
    pub canonical: Option<String>,
}

#[derive(Debug, Default)]
pub struct NameTable {
    hosts: HostTable<Arc<Records>>,
    /// Lowercase, without dots at either end.
    search_domains: Vec<String>,
}

impl NameTable {
    /// The answers for a registry: each host's `spec.addresses` that are single
    /// addresses (CIDRs name no host), its allocated VIPs, and for `resolution: NONE`
    /// its IP endpoints, as Istio answers a headless service. Entries that share a
    /// host have their addresses merged. A host with no address is left to upstream.
    pub fn build(registry: &Registry, search_domains: &[String]) -> Self {
        let mut merged: Vec<(String, Records)> = Vec::new();
        for service in registry.services() {
            let mut records = Records::default();
            for network in &service.addresses {
                if network.prefix_len() == network.max_prefix_len() {
                    records.add(network.addr());
                }
            }
            if records.is_empty() && service.resolution == Resolution::None {
                for endpoint in &service.endpoints {
                    if let EndpointAddress::Ip(ip) = endpoint.address {
                        records.add(ip);
                    }
                }
            }
            for host in &service.hosts {
                let mut records = records.clone();
                for vip in registry.allocated(host) {
                    records.add(vip);
                }
                if records.is_empty() {
                    continue;
                }
                let key = host.to_ascii_lowercase();
                match merged.iter_mut().find(|(known, _)| *known == key) {
                    Some((_, existing)) => {
                        for ip in records.v4.iter().map(|&v4| IpAddr::V4(v4)) {
                            existing.add(ip);
                        }
                        for ip in records.v6.iter().map(|&v6| IpAddr::V6(v6)) {
                            existing.add(ip);
                        }
                    }
                    None => merged.push((key, records)),
                }
            }
        }
        for child in registry.dynamic_children() {
            let mut records = Records::default();
            for vip in registry.allocated(child) {
                records.add(vip);
            }
            merged.push((child.clone(), records));
        }
        let mut hosts = HostTable::default();
        for (host, records) in merged {
            hosts.insert(&host, Arc::new(records));
        }
        // After the hosts with addresses: a wildcard with addresses of its own answers
        // with them.
        for wildcard in registry.dynamic_wildcards() {
            hosts.insert_if_absent(
                wildcard,
                Arc::new(Records {
                    dynamic: true,
                    ..Records::default()
                }),
            );
        }
        NameTable {
            hosts,
            search_domains: search_domains
                .iter()
                .map(|domain| domain.trim_matches('.').to_ascii_lowercase())
                .filter(|domain| !domain.is_empty())
                .collect(),
        }
    }

    /// The records for a name, if it is one of ours: a host itself (exact beats the
    /// most specific wildcard), or a host under one of the search domains.
    pub fn lookup(&self, name: &str) -> Option<Found<'_>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(records) = self.hosts.lookup(&name) {
            return Some(Found {
                records,
                canonical: None,
            });
        }
        self.search_domains.iter().find_map(|domain| {
            let host = name.strip_suffix(domain.as_str())?.strip_suffix('.')?;
            let records = self.hosts.lookup(host)?;
            Some(Found {
                records,
                canonical: Some(host.to_owned()),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::test_support::{config, entry};

    fn table(documents: &[&str], search: &[&str]) -> NameTable {
        let (registry, _) = Registry::build(&config(documents)).unwrap();
        NameTable::build(
            &registry,
            &search.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn addresses_then_none_endpoints_answer_and_cidrs_do_not() {
        let table = table(
            &[
                &entry(
                    "a",
                    "  addresses: [240.240.1.1, 2001:2::1, 10.0.0.0/8]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.0.1}]\n",
                ),
                &entry(
                    "b",
                    "  ports: [{number: 80, name: http}]\n  resolution: NONE\n  endpoints: [{address: 198.18.0.2}, {address: 198.18.0.3}]\n",
                ),
                &entry(
                    "c",
                    "  addresses: [10.0.0.0/8]\n  ports: [{number: 81, name: http}]\n",
                ),
            ],
            &[],
        );
        let a = table.lookup("A.Example.").unwrap().records;
        assert_eq!(a.v4, vec![Ipv4Addr::new(240, 240, 1, 1)]);
        assert_eq!(a.v6, vec!["2001:2::1".parse::<Ipv6Addr>().unwrap()]);
        let b = table.lookup("b.example").unwrap().records;
        assert_eq!(b.v4.len(), 2);
        assert!(b.v6.is_empty());
        assert_eq!(table.lookup("c.example"), None, "a CIDR is not an answer");
        assert_eq!(table.lookup("unknown.example"), None);
    }

    #[test]
    fn shared_hosts_merge_and_wildcards_prefer_the_longest_suffix() {
        let table = table(
            &[
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: one}\nspec:\n  hosts: [shared.example, \"*.example.org\"]\n  addresses: [240.240.2.1]\n  ports: [{number: 80, name: http}]\n",
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: two}\nspec:\n  hosts: [shared.example, \"*.deep.example.org\"]\n  addresses: [240.240.2.2]\n  ports: [{number: 81, name: http}]\n",
            ],
            &[],
        );
        assert_eq!(table.lookup("shared.example").unwrap().records.v4.len(), 2);
        assert_eq!(
            table.lookup("x.deep.example.org").unwrap().records.v4,
            vec![Ipv4Addr::new(240, 240, 2, 2)]
        );
        assert_eq!(
            table.lookup("x.example.org").unwrap().records.v4,
            vec![Ipv4Addr::new(240, 240, 2, 1)]
        );
    }

    #[test]
    fn a_host_under_a_search_domain_names_its_host() {
        let table = table(
            &[&entry(
                "db",
                "  addresses: [240.240.3.1]\n  ports: [{number: 5432, name: tcp}]\n",
            )],
            &["corp.internal."],
        );
        let found = table.lookup("db.example.corp.internal").unwrap();
        assert_eq!(found.canonical.as_deref(), Some("db.example"));
        assert_eq!(table.lookup("corp.internal"), None);
        assert_eq!(table.lookup("other.example.corp.internal"), None);
    }
}
