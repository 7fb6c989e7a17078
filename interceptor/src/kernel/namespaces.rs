//! Keeping the kernel's client namespaces (cgroup id → namespace id) in step with the
//! pods' cgroups the daemon found.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData};
use interceptor_common::CLIENT_NAMESPACES_MAP;

use super::{KernelError, map_error, maps::ignore_missing};

pub(super) struct ClientNamespaces {
    map: HashMap<MapData, u64, u32>,
    /// What the map holds; `None` after a failed write, when any key may be there.
    current: Option<StdHashMap<u64, u32>>,
}

impl ClientNamespaces {
    pub(super) fn new(map: HashMap<MapData, u64, u32>) -> Self {
        Self {
            map,
            current: Some(StdHashMap::new()),
        }
    }

    /// Writes what changed: new and moved cgroups, then deletes the gone ones.
    pub(super) fn sync(&mut self, wanted: &StdHashMap<u64, u32>) -> Result<(), KernelError> {
        let current = match self.current.take() {
            Some(current) => current,
            // Unknown: every key in the map is a candidate for deletion.
            None => self
                .map
                .keys()
                .filter_map(Result::ok)
                .map(|cgroup| (cgroup, u32::MAX))
                .collect(),
        };
        for (cgroup, namespace) in wanted {
            if current.get(cgroup) != Some(namespace) {
                self.map
                    .insert(cgroup, namespace, 0)
                    .map_err(map_error(CLIENT_NAMESPACES_MAP))?;
            }
        }
        for cgroup in current.keys().filter(|cgroup| !wanted.contains_key(cgroup)) {
            ignore_missing(self.map.remove(cgroup)).map_err(map_error(CLIENT_NAMESPACES_MAP))?;
        }
        self.current = Some(wanted.clone());
        Ok(())
    }
}
