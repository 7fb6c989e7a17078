//! Host-name tables for SNI and HTTP Host routing, with Envoy's precedence: an exact
//! name beats any wildcard, and a longer wildcard suffix beats a shorter one.

use std::collections::HashMap;

#[derive(Debug)]
pub struct HostTable<T> {
    exact: HashMap<String, T>,
    /// Keyed by what follows the `*`: `.example.com` for `*.example.com`, and
    /// `example.com` for Istio's partial wildcard `*example.com`.
    wildcard: HashMap<String, T>,
}

impl<T> Default for HostTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<T> HostTable<T> {
    /// Adds `pattern` unless it is already present: the first (oldest) claim wins.
    pub fn insert_if_absent(&mut self, pattern: &str, value: T) {
        let (map, key) = self.slot(pattern);
        map.entry(key).or_insert(value);
    }

    /// Adds or replaces `pattern`.
    pub fn insert(&mut self, pattern: &str, value: T) {
        let (map, key) = self.slot(pattern);
        map.insert(key, value);
    }

    pub fn remove(&mut self, pattern: &str) {
        let (map, key) = self.slot(pattern);
        map.remove(&key);
    }

    fn slot(&mut self, pattern: &str) -> (&mut HashMap<String, T>, String) {
        let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix('*') {
            Some(suffix) => (&mut self.wildcard, suffix.to_owned()),
            None => (&mut self.exact, pattern),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The entry for `name`, compared case-insensitively. Walking the suffixes from
    /// the left tries the longest first, and a wildcard must cover at least one
    /// character, so `*.example.com` does not match `example.com`.
    pub fn lookup(&self, name: &str) -> Option<&T> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(value) = self.exact.get(&name) {
            return Some(value);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        name.char_indices()
            .skip(1)
            .find_map(|(index, _)| self.wildcard.get(&name[index..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_beats_wildcard_and_longer_suffix_beats_shorter() {
        let mut table = HostTable::default();
        table.insert("*.com", "com");
        table.insert("*.example.com", "example");
        table.insert("www.example.com", "www");
        table.insert("*w.other.org", "partial");
        assert_eq!(table.lookup("www.example.com"), Some(&"www"));
        assert_eq!(table.lookup("WWW.Example.COM."), Some(&"www"));
        assert_eq!(table.lookup("api.example.com"), Some(&"example"));
        assert_eq!(table.lookup("a.b.example.com"), Some(&"example"));
        assert_eq!(table.lookup("example.com"), Some(&"com"));
        assert_eq!(table.lookup("new.other.org"), Some(&"partial"));
        assert_eq!(table.lookup("w.other.org"), None);
        assert_eq!(table.lookup("example.org"), None);
    }

    #[test]
    fn the_first_claim_wins_unless_replaced() {
        let mut table = HostTable::default();
        table.insert_if_absent("api.example.com", 1);
        table.insert_if_absent("api.example.com", 2);
        assert_eq!(table.lookup("api.example.com"), Some(&1));
        table.insert("api.example.com", 3);
        assert_eq!(table.lookup("api.example.com"), Some(&3));
        table.remove("api.example.com");
        assert!(table.is_empty());
    }
}
