//! ServiceEntry: the CRD schema rules, then `ValidateServiceEntry` in Istio's
//! evaluation order (the order matters only for reading the output).

use std::collections::BTreeSet;

use super::{
    Problems, common,
    common::ExportToOwner,
    names::{
        is_valid_ip, key_path, validate_fqdn, validate_ip_subnet, validate_partial_wildcard,
        validate_port, validate_port_name, validate_wildcard_domain,
    },
    workload_entry,
};
use crate::config::{Location, Protocol, Resolution, ServiceEntry, ServiceEntrySpec};

/// Opt-out label for istiod's IP auto-allocation.
const AUTOALLOCATE_LABEL: &str = "networking.istio.io/enable-autoallocate-ip";
const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";

/// Istio's `PILOT_ENABLE_IP_AUTOALLOCATE` default. This program has no mesh config
/// to read it from, so the default is assumed.
const IP_AUTOALLOCATE_ENABLED: bool = true;

pub(super) fn check(entry: &ServiceEntry, problems: &mut Problems) {
    let spec = &entry.spec;
    crd_rules(spec, problems);

    if let Some(selector) = &spec.workload_selector {
        if common::selector_labels(&selector.labels, "spec.workloadSelector.labels", problems) {
            // Istio returns at once with just the selector errors.
            return;
        }
        if selector.labels.is_empty() {
            problems.warn(
                "spec.workloadSelector",
                "service entry: workload selector specified without labels, will be applied to all services in namespace",
            );
        }
    }
    if spec.workload_selector.is_some() && spec.endpoints.is_some() {
        problems.error(
            "spec.workloadSelector",
            "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
        );
    }

    hosts(spec, problems);
    addresses(spec, problems);
    let service_ports = ports(entry, problems);
    by_resolution(entry, &service_ports, problems);
    multiple_hosts(spec, problems);
    common::export_to(
        entry.metadata.namespace(),
        &spec.export_to,
        ExportToOwner::ServiceEntry,
        "spec.exportTo",
        problems,
    );
}

fn crd_rules(spec: &ServiceEntrySpec, problems: &mut Problems) {
    common::max_items(spec.hosts.len(), 256, "spec.hosts", problems);
    common::max_items(spec.addresses.len(), 256, "spec.addresses", problems);
    for (index, address) in spec.addresses.iter().enumerate() {
        common::max_length(address, 64, format!("spec.addresses[{index}]"), problems);
    }
    common::max_items(spec.ports.len(), 256, "spec.ports", problems);
    for (index, port) in spec.ports.iter().enumerate() {
        common::max_length(
            &port.name,
            256,
            format!("spec.ports[{index}].name"),
            problems,
        );
        if let Some(protocol) = &port.protocol {
            common::max_length(
                protocol,
                256,
                format!("spec.ports[{index}].protocol"),
                problems,
            );
        }
        // An explicit `targetPort: 0` is present for CEL, so the range rule rejects
        // it; the webhook treats 0 as unset.
        if port.target_port == Some(0) {
            problems.error(
                format!("spec.ports[{index}].targetPort"),
                "port must be between 1-65535",
            );
        }
    }
    if let Some(endpoints) = &spec.endpoints {
        common::max_items(endpoints.len(), 4096, "spec.endpoints", problems);
        // CEL's has() is true for an explicit empty list; the webhook only rejects
        // a non-empty one, reported below.
        if endpoints.is_empty() && spec.resolution == Resolution::None {
            problems.error("spec.endpoints", "NONE mode cannot set endpoints");
        }
        for (index, endpoint) in endpoints.iter().enumerate() {
            workload_entry::crd_limits(endpoint, &format!("spec.endpoints[{index}]"), problems);
        }
    }
    if let Some(selector) = &spec.workload_selector {
        common::max_items(
            selector.labels.len(),
            256,
            "spec.workloadSelector.labels",
            problems,
        );
        for (key, value) in &selector.labels {
            common::max_length(
                value,
                63,
                key_path("spec.workloadSelector.labels", key),
                problems,
            );
        }
    }
}

fn hosts(spec: &ServiceEntrySpec, problems: &mut Problems) {
    if spec.hosts.is_empty() {
        problems.error("spec.hosts", "service entry must have at least one host");
    }
    for (index, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{index}]");
        if host == "*" {
            problems.error(field, "invalid host *");
            continue;
        }
        problems.check(field.clone(), validate_wildcard_domain(host));
        if spec.resolution != Resolution::DynamicDns
            && let Err(message) = validate_partial_wildcard(host)
        {
            problems.warn(field, message);
        }
    }
}

fn addresses(spec: &ServiceEntrySpec, problems: &mut Problems) {
    for (index, address) in spec.addresses.iter().enumerate() {
        problems.check(
            format!("spec.addresses[{index}]"),
            validate_ip_subnet(address),
        );
    }
    // Textual: even a /32 counts as a CIDR here.
    let has_cidr = spec.addresses.iter().any(|address| address.contains('/'));
    if has_cidr && !matches!(spec.resolution, Resolution::None | Resolution::Static) {
        problems.error(
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        );
    }
}

/// Whether istiod would allocate VIPs for this entry (so a TCP port without
/// addresses is still reachable by VIP).
fn auto_allocates(entry: &ServiceEntry) -> bool {
    let opted_out = entry
        .metadata
        .labels
        .get(AUTOALLOCATE_LABEL)
        .is_some_and(|value| value.eq_ignore_ascii_case("false"));
    IP_AUTOALLOCATE_ENABLED
        && entry.spec.resolution != Resolution::None
        && !opted_out
        && entry.spec.addresses.is_empty()
}

fn uses_waypoint(entry: &ServiceEntry) -> bool {
    entry
        .metadata
        .labels
        .get(USE_WAYPOINT_LABEL)
        .is_some_and(|value| !value.is_empty() && !value.eq_ignore_ascii_case("none"))
}

/// Returns the declared port names, which endpoint port maps are keyed by.
fn ports<'a>(entry: &'a ServiceEntry, problems: &mut Problems) -> BTreeSet<&'a str> {
    let spec = &entry.spec;
    let auto_allocation = auto_allocates(entry);
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (index, port) in spec.ports.iter().enumerate() {
        let base = format!("spec.ports[{index}]");
        if !names.insert(port.name.as_str()) {
            problems.error(
                format!("{base}.name"),
                format!("service entry port name {:?} already defined", port.name),
            );
        }
        if !numbers.insert(port.number) {
            problems.error(
                format!("{base}.number"),
                format!("service entry port {} already defined", port.number),
            );
        }
        if let Some(target) = port.target_port
            && target != 0
        {
            problems.check(format!("{base}.targetPort"), validate_port(target));
        }
        let raw_protocol = port.protocol.as_deref().unwrap_or_default();
        // Istio compares the raw string, so `tcp` in lower case does not warn.
        if spec.addresses.is_empty() && !auto_allocation && matches!(raw_protocol, "" | "TCP") {
            problems.warn(
                base.clone(),
                "addresses are required for ports serving TCP (or unset) protocol when IP Autoallocation is not enabled",
            );
        }
        problems.check(format!("{base}.name"), validate_port_name(&port.name));
        if !raw_protocol.is_empty() && port.protocol() == Protocol::Unsupported {
            problems.error(
                format!("{base}.protocol"),
                format!("unsupported protocol: {raw_protocol}"),
            );
        }
        problems.check(format!("{base}.number"), validate_port(port.number));
    }
    names
}

fn by_resolution(entry: &ServiceEntry, service_ports: &BTreeSet<&str>, problems: &mut Problems) {
    let spec = &entry.spec;
    let endpoints = spec.endpoints();
    match spec.resolution {
        Resolution::None => {
            if !endpoints.is_empty() {
                problems.error(
                    "spec.endpoints",
                    "no endpoints should be provided for resolution type none",
                );
            }
            if spec.workload_selector.is_some() {
                problems.warn(
                    "spec.workloadSelector",
                    "workloadSelector should not be set when resolution mode is NONE",
                );
            }
        }
        Resolution::Static => {
            for (index, endpoint) in endpoints.iter().enumerate() {
                workload_entry::check(
                    endpoint,
                    &format!("spec.endpoints[{index}]"),
                    Some(service_ports),
                    false,
                    problems,
                );
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            dns(spec, service_ports, problems);
        }
        Resolution::DynamicDns => dynamic_dns(entry, problems),
    }
}

fn dns(spec: &ServiceEntrySpec, service_ports: &BTreeSet<&str>, problems: &mut Problems) {
    let endpoints = spec.endpoints();
    let resolution = spec.resolution.as_str();
    if endpoints.is_empty() {
        // Each host is the name that gets resolved, so it must be a plain FQDN;
        // despite the wording, wildcards fail. Istio reports only the first.
        let first_failure =
            spec.hosts.iter().enumerate().find_map(|(index, host)| {
                validate_fqdn(host).err().map(|message| (index, message))
            });
        if let Some((index, message)) = first_failure {
            problems.error(
                format!("spec.hosts[{index}]"),
                format!(
                    "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode {resolution}, {message}"
                ),
            );
        }
    }
    if spec.resolution == Resolution::DnsRoundRobin && endpoints.len() > 1 {
        problems.error(
            "spec.endpoints",
            "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
        );
    }
    for (index, endpoint) in endpoints.iter().enumerate() {
        let base = format!("spec.endpoints[{index}]");
        let address = endpoint.address.as_str();
        if address.is_empty() && !endpoint.network.is_empty() {
            // An endpoint in another network is reached through that network's gateway,
            // so it needs no address of its own: Istio only warns.
            problems.warn(
                format!("{base}.address"),
                format!("address is unset with network {:?}", endpoint.network),
            );
        } else if !is_valid_ip(address) && validate_fqdn(address).is_err() {
            // This also rejects unix sockets, wildcards and an empty address without a network.
            problems.error(
                format!("{base}.address"),
                format!("endpoint address {address:?} is not a valid FQDN or an IP address"),
            );
        }
        workload_entry::port_map_and_labels(endpoint, &base, Some(service_ports), problems);
    }
    if !spec.addresses.is_empty()
        && spec.hosts.len() > 1
        && let Some(index) = spec.ports.iter().position(|port| port.protocol().is_tcp())
    {
        problems.warn(
            format!("spec.ports[{index}]"),
            "service entry can not have more than one host specified simultaneously with address and tcp port",
        );
    }
}

fn dynamic_dns(entry: &ServiceEntry, problems: &mut Problems) {
    let spec = &entry.spec;
    if spec.hosts.is_empty() {
        problems.error(
            "spec.hosts",
            "at least one wildcard host must be provided for resolution type DYNAMIC_DNS",
        );
    }
    for (index, host) in spec.hosts.iter().enumerate() {
        if !host.starts_with('*') {
            problems.error(
                format!("spec.hosts[{index}]"),
                "host must be wildcarded for resolution mode DYNAMIC_DNS",
            );
        }
    }
    if !spec.addresses.is_empty() {
        // The missing spaces are Istio's.
        problems.error(
            "spec.addresses",
            "addresses cannot be set for resolution type DYNAMIC_DNS. HTTP route domains will only be generatedfrom the hosts field values",
        );
    }
    if !spec.endpoints().is_empty() {
        problems.error(
            "spec.endpoints",
            "endpoints cannot be set for resolution type DYNAMIC_DNS. Destination IP address determined from hostsfield values",
        );
    }
    for (index, port) in spec.ports.iter().enumerate() {
        if !matches!(
            port.protocol(),
            Protocol::Http | Protocol::Tls | Protocol::Grpc | Protocol::Http2
        ) {
            problems.error(
                format!("spec.ports[{index}].protocol"),
                "only HTTP, TLS, GRPC, and HTTP2 protocols are supported for resolution type DYNAMIC_DNS",
            );
        }
    }
    if spec.location == Location::MeshInternal && uses_waypoint(entry) {
        problems.error(
            "spec.location",
            "location MESH_INTERNAL with resolution type DYNAMIC_DNS is not supported when using waypoints",
        );
    }
}

/// With several hosts, a port can only be told apart per host by Host header or
/// SNI. NONE is exempt: its hosts play no part in routing TCP.
fn multiple_hosts(spec: &ServiceEntrySpec, problems: &mut Problems) {
    if spec.resolution == Resolution::None || spec.hosts.len() <= 1 {
        return;
    }
    if let Some(index) = spec
        .ports
        .iter()
        .position(|port| !port.protocol().is_http() && !port.protocol().is_tls())
    {
        problems.error(
            format!("spec.ports[{index}]"),
            "multiple hosts provided with non-HTTP, non-TLS ports",
        );
    }
}
