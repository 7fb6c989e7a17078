//! VIP auto-allocation: one IPv4 and one IPv6 address per host (not per entry, so two
//! entries for one host share them), from Istio's ranges.
//!
//! Allocation is a plain function of the previous allocations, the hosts that want
//! one (oldest entry first) and the addresses users wrote: a host keeps its addresses
//! unless a user-written address now covers them; new hosts get the next free address
//! after a cursor that only moves forward (wrapping once), so an address given up is
//! not handed to another host at once. The daemon keeps the result in a state file,
//! so addresses survive restarts as they survive reloads.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// The label that opts an entry's hosts out, as in Istio.
pub const OPT_OUT_LABEL: &str = "networking.istio.io/enable-autoallocate-ip";

/// The addresses of one host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vips {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6: Option<Ipv6Addr>,
}

/// Every host's VIPs, and where the search for the next free address starts.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocations {
    /// Lowercase host → its addresses.
    pub hosts: BTreeMap<String, Vips>,
    /// Offsets into the ranges of the next address to try.
    #[serde(default)]
    pub next_v4: u32,
    #[serde(default)]
    pub next_v6: u64,
}

/// The ranges addresses come from.
#[derive(Debug, Clone, Copy)]
pub struct Ranges {
    pub v4: Ipv4Net,
    pub v6: Ipv6Net,
}

impl Default for Ranges {
    /// Istio's: 240.240.0.0/16 and 2001:2::/48.
    fn default() -> Self {
        Ranges {
            v4: Ipv4Net::new(Ipv4Addr::new(240, 240, 0, 0), 16).expect("valid prefix"),
            v6: Ipv6Net::new(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48).expect("valid prefix"),
        }
    }
}

/// How many taken addresses an IPv6 search steps over before it gives up: the range
/// holds 2^80, so only user-written networks covering much of it can make it fail.
const V6_SEARCH_LIMIT: u64 = 1 << 20;

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

    /// Asks for VIPs for `host` at the next [`Allocations::allocate`] that wants it:
    /// how a name looked up under a DYNAMIC_DNS wildcard host gets its own.
    pub fn request(&mut self, host: &str) {
        self.hosts.entry(host.to_ascii_lowercase()).or_default();
    }

    /// Allocates for `wanted` (lowercase hosts, oldest entry first, no duplicates),
    /// around the addresses users wrote. Returns the new allocations and the hosts
    /// left without an address of some family because its range is full.
    pub fn allocate(
        &self,
        wanted: &[String],
        user: &[IpNet],
        ranges: Ranges,
    ) -> (Allocations, Vec<String>) {
        let free = |ip: IpAddr, used: &HashSet<IpAddr>| {
            !used.contains(&ip) && !user.iter().any(|network| network.contains(&ip))
        };
        let mut next = Allocations {
            hosts: BTreeMap::new(),
            next_v4: self.next_v4,
            next_v6: self.next_v6,
        };
        let mut used = HashSet::new();
        // Kept addresses first, so a new host never takes one an older host still holds.
        for host in wanted {
            let Some(previous) = self.hosts.get(host) else {
                continue;
            };
            let mut kept = Vips::default();
            if let Some(v4) = previous.v4
                && ranges.v4.contains(&v4)
                && free(v4.into(), &used)
            {
                used.insert(v4.into());
                kept.v4 = Some(v4);
            }
            if let Some(v6) = previous.v6
                && ranges.v6.contains(&v6)
                && free(v6.into(), &used)
            {
                used.insert(v6.into());
                kept.v6 = Some(v6);
            }
            next.hosts.insert(host.clone(), kept);
        }
        let mut exhausted = Vec::new();
        for host in wanted {
            let vips = next.hosts.entry(host.clone()).or_default();
            if vips.v4.is_none() {
                let network = u32::from(ranges.v4.network());
                // The network and broadcast addresses are never given.
                let size = (1u64 << (32 - ranges.v4.prefix_len())).saturating_sub(2);
                let found = search(u64::from(next.next_v4), size, size, |offset| {
                    let ip = Ipv4Addr::from(network + offset as u32 + 1);
                    free(ip.into(), &used).then_some(ip)
                });
                if let Some((ip, offset)) = found {
                    used.insert(ip.into());
                    vips.v4 = Some(ip);
                    next.next_v4 = (offset + 1) as u32;
                }
            }
            if vips.v6.is_none() {
                let network = u128::from(ranges.v6.network());
                let size = 1u128
                    .checked_shl(u32::from(128 - ranges.v6.prefix_len()))
                    .map_or(u64::MAX, |size| size.min(u128::from(u64::MAX)) as u64)
                    .saturating_sub(1);
                let found = search(next.next_v6, size, V6_SEARCH_LIMIT, |offset| {
                    let ip = Ipv6Addr::from(network + u128::from(offset) + 1);
                    free(ip.into(), &used).then_some(ip)
                });
                if let Some((ip, offset)) = found {
                    used.insert(ip.into());
                    vips.v6 = Some(ip);
                    next.next_v6 = offset + 1;
                }
            }
            if vips.v4.is_none() || vips.v6.is_none() {
                exhausted.push(host.clone());
            }
        }
        (next, exhausted)
    }
}

/// The first offset in `0..size` from `start` on, wrapping once, that `take` accepts,
/// trying at most `limit`.
fn search<T>(
    start: u64,
    size: u64,
    limit: u64,
    mut take: impl FnMut(u64) -> Option<T>,
) -> Option<(T, u64)> {
    if size == 0 {
        return None;
    }
    let start = start % size;
    (0..size.min(limit))
        .map(|step| (start + step) % size)
        .find_map(|offset| take(offset).map(|found| (found, offset)))
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the VIP state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VIP state file {} is corrupt", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the VIP state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The file that keeps the allocations across restarts.
#[derive(Debug, Clone)]
pub struct StateFile {
    pub path: PathBuf,
}

impl StateFile {
    pub fn in_dir(dir: &Path) -> Self {
        StateFile {
            path: dir.join("vips.json"),
        }
    }

    /// The allocations kept, or none when there is no file yet.
    pub fn read(&self) -> Result<Allocations, StateError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(Allocations::default());
            }
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
            path: self.path.clone(),
            source,
        })
    }

    /// Replaces the file whole (write, sync, rename), so a crash leaves the old
    /// allocations or the new ones, never a torn file.
    pub fn write(&self, allocations: &Allocations) -> Result<(), StateError> {
        let error = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        let json = serde_json::to_vec_pretty(allocations)
            .map_err(io::Error::other)
            .map_err(error)?;
        let temporary = self
            .path
            .with_extension(format!("json.{}.tmp", std::process::id()));
        let written = (|| {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn each_host_gets_one_address_of_each_family_and_keeps_it() {
        let (first, exhausted) =
            Allocations::default().allocate(&hosts(&["a", "b"]), &[], Ranges::default());
        assert!(exhausted.is_empty());
        let a = first.hosts["a"];
        assert_eq!(a.v4, Some(Ipv4Addr::new(240, 240, 0, 1)));
        assert_eq!(a.v6, Some("2001:2::1".parse().unwrap()));
        assert_eq!(first.hosts["b"].v4, Some(Ipv4Addr::new(240, 240, 0, 2)));

        // A new host, placed before the others, changes nobody's address.
        let (second, _) = first.allocate(&hosts(&["c", "a", "b"]), &[], Ranges::default());
        assert_eq!(second.hosts["a"], a);
        assert_eq!(second.hosts["c"].v4, Some(Ipv4Addr::new(240, 240, 0, 3)));

        // A removed host's address is not handed out again at once.
        let (third, _) = second.allocate(&hosts(&["a", "d"]), &[], Ranges::default());
        assert_eq!(third.hosts["d"].v4, Some(Ipv4Addr::new(240, 240, 0, 4)));
        assert!(!third.hosts.contains_key("b"));
    }

    #[test]
    fn a_user_written_address_moves_the_allocated_host() {
        let (first, _) = Allocations::default().allocate(&hosts(&["a"]), &[], Ranges::default());
        let user: Vec<IpNet> = vec!["240.240.0.1/32".parse().unwrap()];
        let (second, _) = first.allocate(&hosts(&["a"]), &user, Ranges::default());
        assert_eq!(second.hosts["a"].v4, Some(Ipv4Addr::new(240, 240, 0, 2)));
        assert_eq!(second.hosts["a"].v6, first.hosts["a"].v6);
    }

    #[test]
    fn an_exhausted_range_fails_only_the_hosts_that_do_not_fit() {
        let ranges = Ranges {
            v4: "240.240.0.0/30".parse().unwrap(),
            ..Ranges::default()
        };
        let (allocations, exhausted) =
            Allocations::default().allocate(&hosts(&["a", "b", "c"]), &[], ranges);
        assert_eq!(exhausted, hosts(&["c"]));
        assert!(allocations.hosts["a"].v4.is_some() && allocations.hosts["b"].v4.is_some());
        assert_eq!(allocations.hosts["c"].v4, None);
        assert!(allocations.hosts["c"].v6.is_some());
    }

    #[test]
    fn the_state_file_round_trips_and_a_corrupt_one_is_named() {
        let dir = std::env::temp_dir().join(format!("interceptor-vips-{}", std::process::id()));
        let state = StateFile::in_dir(&dir);
        assert_eq!(state.read().unwrap(), Allocations::default());
        let (allocations, _) =
            Allocations::default().allocate(&hosts(&["a"]), &[], Ranges::default());
        state.write(&allocations).unwrap();
        assert_eq!(state.read().unwrap(), allocations);
        std::fs::write(&state.path, "{not json").unwrap();
        let error = state.read().unwrap_err().to_string();
        assert!(error.contains("vips.json"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
