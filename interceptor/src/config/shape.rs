//! Checks on the raw document before it is decoded into typed structs: things
//! Istio reports with its own wording but that would otherwise surface as a bare
//! decode error (a missing `spec`, `null` items in lists).

use super::yaml::Document as Value;

/// `(path pattern, message)`; `*` in a pattern stands for any list index.
const NULL_ITEMS: &[(&str, &[&str], &str)] = &[
    (
        "ServiceEntry",
        &["spec", "ports", "*"],
        "service entry port may not be null",
    ),
    (
        "ServiceEntry",
        &["spec", "endpoints", "*"],
        "endpoint cannot be nil",
    ),
    (
        "VirtualService",
        &["spec", "tls", "*"],
        "TLS route may not be null",
    ),
    (
        "VirtualService",
        &["spec", "tcp", "*"],
        "TCP route may not be null",
    ),
    (
        "VirtualService",
        &["spec", "tls", "*", "match", "*"],
        "TLS match may not be null",
    ),
    (
        "VirtualService",
        &["spec", "tcp", "*", "match", "*"],
        "tcp match may not be nil",
    ),
    (
        "VirtualService",
        &["spec", "tls", "*", "route", "*"],
        "weight may not be nil",
    ),
    (
        "VirtualService",
        &["spec", "tcp", "*", "route", "*"],
        "weight may not be nil",
    ),
    (
        "DestinationRule",
        &["spec", "subsets", "*"],
        "subset may not be null",
    ),
    (
        "DestinationRule",
        &["spec", "trafficPolicy", "portLevelSettings", "*"],
        "traffic policy may not be null",
    ),
    (
        "DestinationRule",
        &[
            "spec",
            "subsets",
            "*",
            "trafficPolicy",
            "portLevelSettings",
            "*",
        ],
        "traffic policy may not be null",
    ),
];

/// Problems as `(field path, message)`; empty when the document can be decoded.
pub(super) fn check(kind: &str, document: &Value) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if document.get("spec").is_none_or(Value::is_null) {
        problems.push(("spec".to_owned(), "Required value".to_owned()));
        return problems;
    }
    for (pattern_kind, pattern, message) in NULL_ITEMS {
        if *pattern_kind == kind {
            find_nulls(document, pattern, String::new(), message, &mut problems);
        }
    }
    problems
}

fn find_nulls(
    value: &Value,
    pattern: &[&str],
    path: String,
    message: &str,
    problems: &mut Vec<(String, String)>,
) {
    let Some((segment, rest)) = pattern.split_first() else {
        if value.is_null() {
            problems.push((path, message.to_owned()));
        }
        return;
    };
    if *segment == "*" {
        if let Value::Array(items) = value {
            for (index, item) in items.iter().enumerate() {
                find_nulls(item, rest, format!("{path}[{index}]"), message, problems);
            }
        }
        return;
    }
    if let Some(child) = value.get(*segment) {
        let child_path = if path.is_empty() {
            (*segment).to_owned()
        } else {
            format!("{path}.{segment}")
        };
        find_nulls(child, rest, child_path, message, problems);
    }
}
