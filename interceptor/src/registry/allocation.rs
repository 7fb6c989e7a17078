//! VIP auto-allocation: one IPv4 and one IPv6 address per host.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

/// The addresses of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vips {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// Every host's VIPs, and where the next search for a free address starts.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    pub hosts: BTreeMap<String, Vips>,
}

impl Allocations {
    pub fn vips(&self, host: &str) -> impl Iterator<Item = IpAddr> + '_ {
        self.hosts
            .get(&host.to_ascii_lowercase())
            .into_iter()
            .flat_map(|vips| {
                vips.v4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(vips.v6.map(IpAddr::V6))
            })
    }
}
