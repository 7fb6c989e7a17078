//! Conflicts between ServiceEntries, as seen by interception at connect time.
//!
//! The interceptor decides at `connect()` from the destination IP and port alone.
//! An entry with `addresses` is found by IP and port; an entry without them only by
//! port, and then TLS/HTTPS and HTTP-family ports can still be told apart later by
//! SNI or Host header, but opaque TCP ports (and ports with no protocol) cannot.
//! Where two entries claim the same thing, Istio gives it to the oldest. This
//! module orders entries the same way and warns about each entry that loses.
//!
//! Order: entries with a `metadata.creationTimestamp` first, oldest first, ties
//! broken by name then namespace (Istio's order). Entries without a timestamp,
//! which is the usual case for files that never went through an API server, come
//! after those with one, in load order (file order, then document order).

use std::{cmp::Ordering, collections::BTreeMap};

use crate::config::{
    Finding, ObjectMeta, Protocol, ServiceEntry, Severity, Sourced, object_name,
    validate::names::is_valid_ip,
};

/// How a port is told apart from others on the same destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortClass {
    /// TCP, Mongo, Redis, MySQL, or no protocol: by destination alone.
    Opaque,
    /// TLS and HTTPS: by SNI.
    Sni,
    /// HTTP-family: by Host header.
    Host,
}

impl PortClass {
    fn of(protocol: Protocol) -> Option<Self> {
        match protocol {
            Protocol::Udp => None,
            protocol if protocol.is_tls() => Some(Self::Sni),
            protocol if protocol.is_http() => Some(Self::Host),
            _ => Some(Self::Opaque),
        }
    }
}

/// When an entry was created, for precedence: seconds since the Unix epoch and
/// nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CreationTime {
    pub seconds: i64,
    pub nanos: u32,
}

/// The precedence key of one entry; smaller wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryOrder<'a> {
    pub created: Option<CreationTime>,
    pub name: &'a str,
    pub namespace: &'a str,
    pub load_index: usize,
}

impl Ord for EntryOrder<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.created, other.created) {
            (Some(mine), Some(theirs)) => mine
                .cmp(&theirs)
                .then_with(|| self.name.cmp(other.name))
                .then_with(|| self.namespace.cmp(other.namespace))
                .then_with(|| self.load_index.cmp(&other.load_index)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => self.load_index.cmp(&other.load_index),
        }
    }
}

impl PartialOrd for EntryOrder<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Indices into `entries`, highest precedence (oldest) first.
pub fn entry_order(entries: &[Sourced<ServiceEntry>]) -> Vec<usize> {
    oldest_first(entries.iter().map(|entry| &entry.resource.metadata))
}

/// Indices of the objects with this metadata, oldest first, the order in which Istio
/// lets objects take precedence: creation time, then name, then namespace; objects
/// without a creation time come last, in load order.
pub fn oldest_first<'a>(metadata: impl Iterator<Item = &'a ObjectMeta>) -> Vec<usize> {
    let keys: Vec<EntryOrder<'_>> = metadata
        .enumerate()
        .map(|(load_index, metadata)| EntryOrder {
            created: metadata
                .creation_timestamp
                .as_deref()
                .and_then(parse_rfc3339),
            name: &metadata.name,
            namespace: metadata.namespace(),
            load_index,
        })
        .collect();
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
    order
}

/// Parses the RFC 3339 form Kubernetes writes (`2024-05-01T10:00:00Z`, optionally
/// with fractional seconds or a numeric offset).
pub fn parse_rfc3339(text: &str) -> Option<CreationTime> {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if bytes.len() < 20
        || bytes.get(4) != Some(&b'-')
        || bytes.get(7) != Some(&b'-')
        || !matches!(bytes.get(10), Some(b'T' | b't' | b' '))
        || bytes.get(13) != Some(&b':')
        || bytes.get(16) != Some(&b':')
    {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = text.get(19..)?;
    let mut nanos: u32 = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let length = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if length == 0 {
            return None;
        }
        let kept = &fraction[..length.min(9)];
        let scale = 10u32.pow(9 - u32::try_from(kept.len()).ok()?);
        nanos = kept.parse::<u32>().ok()?.checked_mul(scale)?;
        rest = &fraction[length..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes().get(3) != Some(&b':') {
                return None;
            }
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(CreationTime { seconds, nanos })
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// One port of one entry, as interception sees it.
struct Claim<'a> {
    entry: &'a Sourced<ServiceEntry>,
    port_index: usize,
    number: u64,
    class: PortClass,
    protocol: &'a str,
}

impl Claim<'_> {
    fn entry_label(&self) -> String {
        describe(self.entry)
    }
}

fn describe(entry: &Sourced<ServiceEntry>) -> String {
    format!(
        "{} ({} document {})",
        object_name("ServiceEntry", &entry.resource.metadata),
        entry.source.file.display(),
        entry.source.document
    )
}

fn warning(entry: &Sourced<ServiceEntry>, field: String, message: String) -> Finding {
    let object = object_name("ServiceEntry", &entry.resource.metadata);
    Finding::at(Severity::Warning, &entry.source, object, field, message)
}

const PRECEDENCE: &str = "the oldest entry wins (by creationTimestamp, then name, then namespace; entries without a timestamp last, in load order)";

pub(super) fn service_entries(entries: &[Sourced<ServiceEntry>]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for entry in entries {
        if let Some(timestamp) = &entry.resource.metadata.creation_timestamp
            && parse_rfc3339(timestamp).is_none()
        {
            findings.push(warning(
                entry,
                "metadata.creationTimestamp".into(),
                format!(
                    "creationTimestamp {timestamp:?} is not an RFC 3339 time; the entry is ordered as if it had none"
                ),
            ));
        }
    }
    let order = entry_order(entries);
    let mut by_port: BTreeMap<u64, Vec<Claim<'_>>> = BTreeMap::new();
    let mut by_address: BTreeMap<(String, u64), Vec<(Claim<'_>, usize)>> = BTreeMap::new();
    for &index in &order {
        let Some(entry) = entries.get(index) else {
            continue;
        };
        let spec = &entry.resource.spec;
        for (port_index, port) in spec.ports.iter().enumerate() {
            let Some(class) = PortClass::of(port.protocol()) else {
                continue;
            };
            let claim = || Claim {
                entry,
                port_index,
                number: port.number,
                class,
                protocol: port.protocol.as_deref().unwrap_or_default(),
            };
            if spec.addresses.is_empty() {
                by_port.entry(port.number).or_default().push(claim());
            }
            for (address_index, address) in spec.addresses.iter().enumerate() {
                by_address
                    .entry((normalize_address(address), port.number))
                    .or_default()
                    .push((claim(), address_index));
            }
        }
    }
    for claims in by_port.values() {
        port_only_conflicts(claims, &mut findings);
    }
    for ((address, number), claims) in &by_address {
        address_conflicts(address, *number, claims, &mut findings);
    }
    findings
}

fn port_only_conflicts(claims: &[Claim<'_>], findings: &mut Vec<Finding>) {
    let opaque: Vec<&Claim<'_>> = claims
        .iter()
        .filter(|claim| claim.class == PortClass::Opaque)
        .collect();
    let Some(winner) = opaque.first() else {
        return;
    };
    for loser in opaque.iter().skip(1) {
        if std::ptr::eq(loser.entry, winner.entry) {
            continue;
        }
        findings.push(warning(
            loser.entry,
            format!("spec.ports[{}]", loser.port_index),
            format!(
                "port {} ({}) has no addresses, so it is matched by destination port alone, and {} claims the same port; {PRECEDENCE}, so {} wins and this entry never receives connections on port {}",
                loser.number,
                protocol_label(loser.protocol),
                winner.entry_label(),
                winner.entry_label(),
                loser.number,
            ),
        ));
    }
    // An opaque port-only entry next to SNI/Host-routed entries on the same port:
    // interception cannot tell at connect time which one a connection is for.
    let others: Vec<String> = claims
        .iter()
        .filter(|claim| {
            claim.class != PortClass::Opaque && !std::ptr::eq(claim.entry, winner.entry)
        })
        .map(Claim::entry_label)
        .collect();
    if others.is_empty() {
        return;
    }
    findings.push(warning(
        winner.entry,
        format!("spec.ports[{}]", winner.port_index),
        format!(
            "port {} ({}) has no addresses, so it is matched by destination port alone, and it shares the port with entries told apart by SNI or Host header: {}; this entry is shadowed for every connection that matches one of their hosts",
            winner.number,
            protocol_label(winner.protocol),
            others.join(", "),
        ),
    ));
}

fn address_conflicts(
    address: &str,
    number: u64,
    claims: &[(Claim<'_>, usize)],
    findings: &mut Vec<Finding>,
) {
    let Some((winner, _)) = claims.first() else {
        return;
    };
    for (loser, address_index) in claims.iter().skip(1) {
        if std::ptr::eq(loser.entry, winner.entry) {
            continue;
        }
        // Two SNI (or two Host) ports on one VIP are still told apart by name.
        if loser.class == winner.class && loser.class != PortClass::Opaque {
            continue;
        }
        findings.push(warning(
            loser.entry,
            format!("spec.addresses[{address_index}]"),
            format!(
                "address {address} port {number} is also claimed by {}; {PRECEDENCE}, so {} wins and this entry never receives connections to {address} port {number}",
                winner.entry_label(),
                winner.entry_label(),
            ),
        ));
    }
}

fn protocol_label(protocol: &str) -> &str {
    if protocol.is_empty() {
        "no protocol"
    } else {
        protocol
    }
}

/// Compares addresses by value: `10.0.0.1/32` and `10.0.0.1` are the same
/// destination, as are different spellings of one IPv6 address.
fn normalize_address(address: &str) -> String {
    let (ip_text, prefix) = match address.split_once('/') {
        Some((ip_text, prefix)) => (ip_text, Some(prefix)),
        None => (address, None),
    };
    if !is_valid_ip(ip_text) {
        return address.to_owned();
    }
    let Ok(ip) = ip_text.parse::<std::net::IpAddr>() else {
        return address.to_owned();
    };
    let full_length = if ip.is_ipv4() { "32" } else { "128" };
    match prefix {
        None => ip.to_string(),
        Some(prefix) if prefix == full_length => ip.to_string(),
        Some(prefix) => format!("{ip}/{prefix}"),
    }
}
