//! Host names and the one definition of how they match, for every caller: the SNI and
//! HTTP Host tables of the data path, the pattern a connection is counted under, and
//! the overlap checks of validation and of VirtualService coverage.
//!
//! A name is compared case-insensitively (DNS names are) and without a trailing dot
//! (`example.com.` is `example.com` written as an absolute name). A pattern is an
//! exact name, or `*` followed by a suffix: `*.example.com`, or Istio's partial
//! wildcard `*example.com`.

use std::collections::HashMap;

/// A host as ServiceEntry and VirtualService `hosts` write it.
#[derive(Debug, Clone, Copy)]
pub enum HostPattern<'a> {
    Exact(&'a str),
    /// What follows the `*`: `.example.com` for `*.example.com`.
    Wildcard(&'a str),
}

impl<'a> HostPattern<'a> {
    pub fn new(host: &'a str) -> Self {
        let host = host.trim_end_matches('.');
        match host.strip_prefix('*') {
            Some(suffix) => Self::Wildcard(suffix),
            None => Self::Exact(host),
        }
    }

    /// Whether a client's name (TLS SNI or HTTP Host) is one this pattern routes, as
    /// Envoy matches server names and domains: a wildcard covers at least one
    /// character, so `*.example.com` does not match `example.com`.
    pub fn matches(self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        match self {
            Self::Exact(exact) => exact.eq_ignore_ascii_case(name),
            Self::Wildcard(suffix) => name.len() > suffix.len() && ends_with(name, suffix),
        }
    }

    /// Istio's `host.Name.Matches` between two configured hosts: whether some name
    /// could match both. Unlike [`matches`](Self::matches), a wildcard's suffix
    /// overlaps the bare name it ends with (`*example.com` and `example.com`).
    pub fn overlaps(self, other: Self) -> bool {
        match (self, other) {
            (Self::Wildcard(a), Self::Wildcard(b)) => {
                if a.len() > b.len() {
                    ends_with(a, b)
                } else {
                    ends_with(b, a)
                }
            }
            (Self::Wildcard(suffix), Self::Exact(name))
            | (Self::Exact(name), Self::Wildcard(suffix)) => ends_with(name, suffix),
            (Self::Exact(a), Self::Exact(b)) => a.eq_ignore_ascii_case(b),
        }
    }

    /// Istio's `host.Name.SubsetOf`: whether every name this pattern matches is also
    /// matched by `of`.
    pub fn subset_of(self, of: Self) -> bool {
        match (self, of) {
            (Self::Wildcard(suffix), Self::Wildcard(of_suffix)) => ends_with(suffix, of_suffix),
            (Self::Wildcard(_), Self::Exact(_)) => false,
            (Self::Exact(name), Self::Wildcard(of_suffix)) => ends_with(name, of_suffix),
            (Self::Exact(a), Self::Exact(b)) => a.eq_ignore_ascii_case(b),
        }
    }

    /// The same pattern, written perhaps in another case or with a trailing dot.
    pub fn same(self, other: Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) | (Self::Wildcard(a), Self::Wildcard(b)) => {
                a.eq_ignore_ascii_case(b)
            }
            _ => false,
        }
    }

    /// Envoy's precedence among patterns that match one name: an exact name beats
    /// any wildcard, and a longer wildcard suffix beats a shorter one.
    fn precedence(self) -> (bool, usize) {
        match self {
            Self::Exact(name) => (true, name.len()),
            Self::Wildcard(suffix) => (false, suffix.len()),
        }
    }

    /// The key a [`HostTable`] files the pattern under, in lower case.
    fn key(self) -> (bool, String) {
        match self {
            Self::Exact(name) => (true, name.to_ascii_lowercase()),
            Self::Wildcard(suffix) => (false, suffix.to_ascii_lowercase()),
        }
    }
}

/// Istio's `host.Name.Matches`, for two hosts as written: see [`HostPattern::overlaps`].
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    HostPattern::new(a).overlaps(HostPattern::new(b))
}

/// Istio's `host.Name.SubsetOf`, for two hosts as written: see [`HostPattern::subset_of`].
pub fn host_subset_of(host: &str, of: &str) -> bool {
    HostPattern::new(host).subset_of(HostPattern::new(of))
}

/// The index of the pattern among `patterns` that routes `name`, by Envoy's
/// precedence. Metrics label a connection with that pattern because, unlike the name
/// itself, a client cannot make up new values of it.
pub fn best_match(patterns: &[String], name: &str) -> Option<usize> {
    patterns
        .iter()
        .enumerate()
        .filter(|(_, pattern)| HostPattern::new(pattern).matches(name))
        // The first of equals, as a table built from `patterns` in order keeps.
        .rev()
        .max_by_key(|(_, pattern)| HostPattern::new(pattern).precedence())
        .map(|(index, _)| index)
}

/// `text` ends with `suffix`, ignoring ASCII case.
fn ends_with(text: &str, suffix: &str) -> bool {
    text.len() >= suffix.len()
        && text.as_bytes()[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// A table from host patterns to routes, answering per connection with one hash probe
/// per suffix of the name: the same answer as [`best_match`] over its patterns.
#[derive(Debug)]
pub struct HostTable<T> {
    exact: HashMap<String, T>,
    /// Keyed by what follows the `*`.
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
        match HostPattern::new(pattern).key() {
            (true, key) => (&mut self.exact, key),
            (false, key) => (&mut self.wildcard, key),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The entry whose pattern routes `name` (see [`HostPattern::matches`]). Walking
    /// the suffixes from the left tries the longest first; the whole name is never a
    /// wildcard's suffix, since a wildcard covers at least one character.
    pub fn lookup(&self, name: &str) -> Option<&T> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(value) = self.exact.get(&name) {
            return Some(value);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        (1..=name.len())
            .filter(|&index| name.is_char_boundary(index))
            .find_map(|index| self.wildcard.get(&name[index..]))
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

    /// The table is the fast form of `best_match`: for every name, both pick the same
    /// pattern.
    #[test]
    fn the_table_and_best_match_agree() {
        let patterns: Vec<String> = [
            "*.com",
            "*.Example.com",
            "www.example.com",
            "*w.other.org",
            "other.org.",
            "*.a.b.example.com",
            "*",
        ]
        .map(String::from)
        .to_vec();
        let mut table = HostTable::default();
        for pattern in &patterns {
            table.insert_if_absent(pattern, pattern.as_str());
        }
        for name in [
            "www.example.com",
            "WWW.EXAMPLE.COM.",
            "api.example.com",
            "x.a.b.example.com",
            "a.b.example.com",
            "example.com",
            "com",
            "new.other.org",
            "w.other.org",
            "other.org",
            "Other.Org.",
            "example.net",
        ] {
            assert_eq!(
                table.lookup(name).copied(),
                best_match(&patterns, name).map(|index| patterns[index].as_str()),
                "{name}"
            );
        }
    }

    #[test]
    fn a_wildcard_covers_at_least_one_character_and_case_does_not_matter() {
        let matches = |pattern, name| HostPattern::new(pattern).matches(name);
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.EXAMPLE.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(matches("*example.com", "myexample.com"));
        assert!(!matches("*example.com", "example.com"));
        assert!(matches("API.example.com", "api.example.com."));
        assert!(!matches("api.example.com", "api.example.co"));
    }

    /// Istio's `host.Name.Matches`, which validation and VirtualService coverage use,
    /// compared case-sensitively here before; DNS names are not.
    #[test]
    fn overlap_is_istios_matches_without_regard_to_case() {
        assert!(hosts_overlap("*.foo.com", "a.b.foo.com"));
        assert!(!hosts_overlap("*.foo.com", "foo.com"));
        assert!(hosts_overlap("*foo.com", "foo.com"));
        assert!(hosts_overlap("*", "anything"));
        assert!(hosts_overlap("*.com", "*.foo.com"));
        assert!(hosts_overlap("*.foo.com", "*.com"));
        assert!(!hosts_overlap("*.foo.com", "*.bar.com"));
        assert!(hosts_overlap("API.Example.com", "api.example.com"));
        assert!(hosts_overlap("*.Example.com", "www.example.COM"));
        assert!(hosts_overlap("*.EXAMPLE.com", "*.example.com"));
        assert!(!hosts_overlap("api.example.com", "www.example.com"));
    }
}
