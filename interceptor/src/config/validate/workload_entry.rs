//! Workload entries, both standalone and as ServiceEntry `endpoints[]`.

use std::collections::BTreeSet;

use super::{
    Problems, common,
    names::{
        is_dns1123_label, is_valid_ip, key_path, validate_fqdn, validate_labels, validate_port,
        validate_port_name,
    },
};
use crate::config::WorkloadEntrySpec;

const UNIX_PREFIX: &str = "unix://";

/// The standalone kind: FQDN addresses are allowed and there are no service ports
/// to check the port map against.
pub(super) fn check_standalone(spec: &WorkloadEntrySpec, problems: &mut Problems) {
    crd_limits(spec, "spec", problems);
    check(spec, "spec", None, true, problems);
}

/// Istio's `validateWorkloadEntry`. `service_ports` is the set of port names the
/// owning ServiceEntry declares (absent for a standalone entry).
pub(super) fn check(
    entry: &WorkloadEntrySpec,
    base: &str,
    service_ports: Option<&BTreeSet<&str>>,
    allow_fqdn: bool,
    problems: &mut Problems,
) {
    let address_field = format!("{base}.address");
    let address = entry.address.as_str();
    if address.is_empty() {
        if entry.network.is_empty() {
            problems.error(address_field, "address is required");
            return;
        }
        problems.warn(
            address_field.clone(),
            format!("address is unset with network {:?}", entry.network),
        );
    }
    let unix_path = address.strip_prefix(UNIX_PREFIX);
    match unix_path {
        Some(path) => {
            problems.check(address_field.clone(), validate_unix_address(path));
            if !entry.ports.is_empty() {
                problems.error(
                    format!("{base}.ports"),
                    format!("unix endpoint {address} must not include ports"),
                );
            }
        }
        None if !address.is_empty() && !is_valid_ip(address) => {
            if !allow_fqdn {
                problems.error(
                    address_field,
                    format!("endpoint address {address:?} is not a valid IP address"),
                );
            } else if validate_fqdn(address).is_err() {
                problems.error(
                    address_field,
                    format!("endpoint address {address:?} is not a valid FQDN or an IP address"),
                );
            }
        }
        None => {}
    }
    port_map_and_labels(entry, base, service_ports, problems);
    if unix_path.is_some()
        && let Some(service_ports) = service_ports
        && service_ports.len() != 1
    {
        problems.error(
            format!("{base}.address"),
            "exactly 1 service port required for unix endpoints",
        );
    }
}

/// `unix:///abs/path` or `unix://@abstract`; `path` is the text after `unix://`.
fn validate_unix_address(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("unix address must not be empty".into());
    }
    if path.starts_with('@') {
        return Ok(());
    }
    if !path.starts_with('/') || path.ends_with('/') {
        return Err(format!("{path} is not an absolute path to a file"));
    }
    Ok(())
}

/// The endpoint `ports` map (keyed by service-port *name*) and the labels.
pub(super) fn port_map_and_labels(
    entry: &WorkloadEntrySpec,
    base: &str,
    service_ports: Option<&BTreeSet<&str>>,
    problems: &mut Problems,
) {
    for (name, &port) in &entry.ports {
        let field = key_path(&format!("{base}.ports"), name);
        if let Some(service_ports) = service_ports
            && !service_ports.contains(name.as_str())
        {
            // Istio prints the port value here, not the name.
            problems.error(
                field.clone(),
                format!("endpoint port {port} is not defined by the service entry"),
            );
        }
        problems.check(field.clone(), validate_port_name(name));
        problems.check(field, validate_port(port));
    }
    for (key, message) in validate_labels(&entry.labels) {
        problems.error(key_path(&format!("{base}.labels"), key), message);
    }
}

/// The CRD's limits on an endpoint, which the webhook does not check.
pub(super) fn crd_limits(entry: &WorkloadEntrySpec, base: &str, problems: &mut Problems) {
    common::max_length(&entry.address, 256, format!("{base}.address"), problems);
    common::max_length(&entry.network, 2048, format!("{base}.network"), problems);
    common::max_length(&entry.locality, 2048, format!("{base}.locality"), problems);
    common::max_length(
        &entry.service_account,
        253,
        format!("{base}.serviceAccount"),
        problems,
    );
    common::max_items(entry.labels.len(), 256, &format!("{base}.labels"), problems);
    common::max_items(entry.ports.len(), 128, &format!("{base}.ports"), problems);
    for name in entry.ports.keys() {
        // The CRD wants keys shorter than 63; the webhook accepts exactly 63. Longer
        // or malformed keys are already reported by the webhook rule.
        if name.len() == 63 && is_dns1123_label(name) {
            problems.error(
                key_path(&format!("{base}.ports"), name),
                "port name must be valid",
            );
        }
    }
}
