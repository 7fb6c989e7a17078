//! Rules shared by several kinds: metadata, `exportTo`, gateway names, selectors
//! and the CRD size limits.

use std::collections::BTreeMap;

use super::{
    Problems,
    names::{is_dns1123_label, key_path, validate_fqdn},
};
use crate::config::ObjectMeta;

/// The API server rejects objects without a name; findings also need one to be
/// useful.
pub(super) fn metadata(metadata: &ObjectMeta, problems: &mut Problems) {
    if metadata.name.is_empty() {
        problems.error("metadata.name", "Required value");
    }
}

/// Which kind owns an `exportTo` list: the rules differ slightly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExportToOwner {
    /// Only ServiceEntry may use `~` (visible to no one).
    ServiceEntry,
    VirtualService,
    /// A DestinationRule with a workload selector may only export to its own namespace.
    DestinationRule {
        has_workload_selector: bool,
    },
}

const EXPORT_PRIVATE: &str = ".";
const EXPORT_PUBLIC: &str = "*";
const EXPORT_NONE: &str = "~";

/// Istio's `validateExportTo`. `.` stands for the object's namespace, so `.` and
/// that namespace name are duplicates of each other.
pub(super) fn export_to(
    namespace: &str,
    export_to: &[String],
    owner: ExportToOwner,
    base: &str,
    problems: &mut Problems,
) {
    if export_to.is_empty() {
        return;
    }
    let mut seen: Vec<&str> = Vec::new();
    for (index, entry) in export_to.iter().enumerate() {
        let field = format!("{base}[{index}]");
        let key = if entry == EXPORT_PRIVATE {
            namespace
        } else {
            entry.as_str()
        };
        if seen.contains(&key) {
            if key != entry {
                problems.error(
                    field,
                    format!("duplicate entries in exportTo: . and current namespace {namespace}"),
                );
            } else {
                problems.error(
                    field,
                    format!("duplicate entries in exportTo for entry {entry}"),
                );
            }
            continue;
        }
        if owner == ExportToOwner::ServiceEntry && entry == EXPORT_NONE {
            seen.push(key);
            continue;
        }
        match validate_visibility(key) {
            Ok(()) => seen.push(key),
            Err(message) => problems.error(field, message),
        }
    }
    if owner
        == (ExportToOwner::DestinationRule {
            has_workload_selector: true,
        })
        && !seen.is_empty()
    {
        if !seen.contains(&namespace) {
            problems.error(
                base,
                "destination rule with workload selector cannot have exportTo beyond current namespace",
            );
        } else if seen.len() > 1 {
            problems.error(
                base,
                "destination rule with workload selector cannot have multiple entries in exportTo",
            );
        }
    }
    // Both checks count the raw list, so a repeated `*` trips them as well.
    if seen.contains(&EXPORT_PUBLIC) && export_to.len() > 1 {
        problems.error(
            base,
            "cannot have both public (*) and non-public exportTo values for a resource",
        );
    }
    if seen.contains(&EXPORT_NONE) && export_to.len() > 1 {
        problems.error(
            base,
            "cannot export service entry to no one (~) and someone",
        );
    }
}

fn validate_visibility(value: &str) -> Result<(), String> {
    match value {
        EXPORT_PRIVATE | EXPORT_PUBLIC => Ok(()),
        EXPORT_NONE => {
            Err("exportTo ~ (none) is not allowed for Istio configuration objects".into())
        }
        _ if is_dns1123_label(value) => Ok(()),
        _ => Err("only .,*, or a valid DNS 1123 label is allowed as exportTo entry".into()),
    }
}

/// Istio's `validateGatewayNames`: `namespace/name`, or a legacy `name.namespace`
/// FQDN, or a short name such as `mesh`.
pub(super) fn gateway_names(gateways: &[String], base: &str, problems: &mut Problems) {
    for (index, gateway) in gateways.iter().enumerate() {
        let field = format!("{base}[{index}]");
        let Some((namespace, name)) = gateway.split_once('/') else {
            if gateway.contains('.') {
                let mut parts = gateway.split('.');
                let legacy_name = parts.next().unwrap_or_default();
                let legacy_namespace = parts.next().unwrap_or_default();
                problems.warn(
                    field.clone(),
                    format!(
                        "using legacy gatewayName format {gateway:?}; prefer the <namespace>/<name> format: {:?}",
                        format!("{legacy_namespace}/{legacy_name}")
                    ),
                );
            }
            problems.check(field, validate_fqdn(gateway));
            // Istio stops at the first name without a namespace; the names after it
            // are not checked. Kept for parity.
            return;
        };
        if namespace.is_empty() || name.is_empty() {
            problems.error(
                field.clone(),
                "config namespace and gateway name cannot be empty",
            );
        }
        if !is_dns1123_label(namespace) {
            problems.error(
                field.clone(),
                format!("invalid value for namespace: {namespace:?}"),
            );
        }
        if !is_dns1123_label(name) {
            problems.error(field, format!("invalid value for gateway name: {name:?}"));
        }
    }
}

/// The selector rules common to every kind: no empty key and no `*`. Returns
/// whether any fired.
pub(super) fn selector_labels(
    labels: &BTreeMap<String, String>,
    base: &str,
    problems: &mut Problems,
) -> bool {
    let mut failed = false;
    for (key, value) in labels {
        let field = key_path(base, key);
        let pair = format!("{key}={value}");
        if key.is_empty() {
            problems.error(
                field.clone(),
                format!("empty key is not supported in selector: {pair:?}"),
            );
            failed = true;
        }
        if key.contains('*') || value.contains('*') {
            problems.error(
                field,
                format!("wildcard is not supported in selector: {pair:?}"),
            );
            failed = true;
        }
    }
    failed
}

/// CRD `maxItems`/`maxProperties`.
pub(super) fn max_items(count: usize, max: usize, field: &str, problems: &mut Problems) {
    if count > max {
        problems.error(
            field,
            format!("Too many: {count}: must have at most {max} items"),
        );
    }
}

/// CRD `maxLength`.
pub(super) fn max_length(
    text: &str,
    max: usize,
    field: impl Into<String>,
    problems: &mut Problems,
) {
    if text.len() > max {
        problems.error(field, format!("Too long: may not be more than {max} bytes"));
    }
}
