//! Syntax checks for host names, labels, IP addresses and ports, with Istio's
//! semantics and wording. Hand-written matchers: each regular expression Istio
//! uses is small enough that a character loop is clearer than a regex engine.

use std::{collections::BTreeMap, net::Ipv6Addr};

/// The longest name `ValidateWildcardDomain`/`ValidateFQDN` accept.
const MAX_DOMAIN_LENGTH: usize = 255;
const MAX_LABEL_LENGTH: usize = 63;
const MAX_LABEL_PREFIX_LENGTH: usize = 253;

/// `[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?` without a length bound.
fn is_dns1123_label_syntax(label: &str) -> bool {
    alphanumeric_at_both_ends(label, |byte| byte == b'-')
}

/// Not empty, ASCII alphanumeric at both ends, and alphanumeric or `inner` between.
fn alphanumeric_at_both_ends(text: &str, inner: impl Fn(u8) -> bool) -> bool {
    let bytes = text.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|&byte| byte.is_ascii_alphanumeric() || inner(byte))
        }
        _ => false,
    }
}

/// A DNS-1123 label of at most 63 characters. Istio allows upper case.
pub fn is_dns1123_label(label: &str) -> bool {
    label.len() <= MAX_LABEL_LENGTH && is_dns1123_label_syntax(label)
}

/// `*`, `*label`, `*-label` or `label`, at most 63 characters.
pub fn is_wildcard_dns1123_label(label: &str) -> bool {
    if label.len() > MAX_LABEL_LENGTH {
        return false;
    }
    if label == "*" {
        return true;
    }
    if let Some(rest) = label.strip_prefix("*-")
        && is_dns1123_label(rest)
    {
        return true;
    }
    if let Some(rest) = label.strip_prefix('*') {
        return is_dns1123_label(rest);
    }
    is_dns1123_label(label)
}

fn check_domain_preconditions(name: &str) -> Result<(), String> {
    if name.len() > MAX_DOMAIN_LENGTH {
        return Err(format!("domain name {name:?} too long (max 255)"));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    Ok(())
}

/// Every dot-separated label is a DNS-1123 label, the last may be empty (a
/// trailing dot), and the top-level domain is not a number.
pub fn validate_dns1123_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let top_level = parts.last().copied().unwrap_or_default();
    // Go's strconv.Atoi decides "numeric": an optional sign and digits that fit
    // in 64 bits, which is exactly what i64's parser accepts.
    if top_level.parse::<i64>().is_ok() {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {top_level:?} cannot be all-numeric)"
        ));
    }
    let last = parts.len().saturating_sub(1);
    for (index, label) in parts.iter().enumerate() {
        if index == last && label.is_empty() {
            return Ok(());
        }
        if !is_dns1123_label(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

/// A DNS name whose first label may be a wildcard label (`*`, `*.x`, `*x.y`).
pub fn validate_wildcard_domain(domain: &str) -> Result<(), String> {
    check_domain_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (domain, None),
    };
    if !is_wildcard_dns1123_label(first) {
        return Err(format!(
            "domain name {domain:?} invalid (label {first:?} invalid)"
        ));
    }
    match rest {
        Some(rest) => validate_dns1123_labels(rest),
        None => Ok(()),
    }
}

/// A DNS name with no wildcard anywhere.
pub fn validate_fqdn(name: &str) -> Result<(), String> {
    check_domain_preconditions(name)?;
    validate_dns1123_labels(name)
}

/// `*foo.com`-style hosts: they pass the syntax check but match any name that
/// merely ends in `foo.com`.
pub fn validate_partial_wildcard(host: &str) -> Result<(), String> {
    if host.contains('*') && host != "*" && !host.starts_with("*.") {
        return Err(format!("partial wildcard {host:?} not allowed"));
    }
    Ok(())
}

/// Go's `netip.ParseAddr`: a dotted-quad IPv4 without leading zeros, or an IPv6
/// address, optionally with a non-empty zone (`fe80::1%eth0`).
pub fn is_valid_ip(text: &str) -> bool {
    if text.contains(':') {
        let (address, zone) = match text.split_once('%') {
            Some((address, zone)) => (address, Some(zone)),
            None => (text, None),
        };
        if zone.is_some_and(str::is_empty) {
            return false;
        }
        return address.parse::<Ipv6Addr>().is_ok();
    }
    is_valid_ipv4(text)
}

fn is_valid_ipv4(text: &str) -> bool {
    let mut fields = 0;
    for field in text.split('.') {
        fields += 1;
        let leading_zero = field.len() > 1 && field.starts_with('0');
        let value_ok = field.len() <= 3
            && !field.is_empty()
            && field.bytes().all(|b| b.is_ascii_digit())
            && field.parse::<u16>().is_ok_and(|value| value <= 255);
        if leading_zero || !value_ok {
            return false;
        }
    }
    fields == 4
}

/// Go's `netip.ParsePrefix`: an address without zone, `/`, and a prefix length
/// without sign or leading zeros that fits the address family. Host bits may be set.
fn is_valid_prefix(text: &str) -> bool {
    let Some((address, bits)) = text.split_once('/') else {
        return false;
    };
    if address.contains('%') || !is_valid_ip(address) {
        return false;
    }
    let max_bits = if address.contains(':') { 128 } else { 32 };
    let digits_only = !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = bits.len() > 1 && bits.starts_with('0');
    digits_only && !leading_zero && bits.parse::<u32>().is_ok_and(|value| value <= max_bits)
}

/// An address entry: a CIDR block if it has exactly one `/`, else an IP.
pub fn validate_ip_subnet(text: &str) -> Result<(), String> {
    if text.matches('/').count() == 1 {
        if is_valid_prefix(text) {
            return Ok(());
        }
        return Err(format!("{text} is not a valid CIDR block"));
    }
    if is_valid_ip(text) {
        return Ok(());
    }
    Err(format!("{text} is not a valid IP"))
}

pub fn validate_port(port: u64) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        return Ok(());
    }
    Err(format!("port number {port} must be in the range 1..65535"))
}

pub fn validate_port_name(name: &str) -> Result<(), String> {
    if is_dns1123_label(name) {
        return Ok(());
    }
    Err(format!("invalid port name: {name}"))
}

/// `(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`: a Kubernetes label name or value body.
fn is_qualified_name_body(text: &str) -> bool {
    alphanumeric_at_both_ends(text, |byte| matches!(byte, b'-' | b'_' | b'.'))
}

/// One label key: an optional DNS-subdomain prefix ending in `/`, then a name.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|prefix| prefix.split('.').all(is_dns1123_label_syntax));
    if !prefix_ok || !is_qualified_name_body(name) {
        return Err(format!("invalid tag key: {key:?}"));
    }
    if prefix.is_some_and(|prefix| prefix.len() > MAX_LABEL_PREFIX_LENGTH) {
        return Err(format!("invalid tag key: {key:?} (DNS prefix is too long)"));
    }
    if name.len() > MAX_LABEL_LENGTH {
        return Err(format!("invalid tag key: {key:?} (name is too long)"));
    }
    Ok(())
}

/// A label value: empty, or a qualified-name body. Istio sets no length limit here.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_qualified_name_body(value) {
        return Ok(());
    }
    Err(format!("invalid tag value: {value:?}"))
}

/// `labels.Instance.Validate`, yielding `(key, message)` for each problem so the
/// caller can point at the offending key.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Vec<(&str, String)> {
    let mut problems = Vec::new();
    for (key, value) in labels {
        if let Err(message) = validate_label_key(key) {
            problems.push((key.as_str(), message));
        }
        if let Err(message) = validate_label_value(value) {
            problems.push((key.as_str(), message));
        }
    }
    problems
}

/// A field path for a map entry: `labels.app`, or `labels["a.b/c"]` when the key
/// is not a plain identifier.
pub fn key_path(base: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if plain {
        format!("{base}.{key}")
    } else {
        format!("{base}[{key:?}]")
    }
}
