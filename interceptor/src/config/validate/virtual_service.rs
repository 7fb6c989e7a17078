//! VirtualService: hosts, gateways, and the `tls`/`tcp` routes this program acts on.
//! `http` routes are opaque; only their presence (and non-nullness) is checked.

use super::{
    Problems, common,
    common::ExportToOwner,
    names::{
        is_dns1123_label, is_valid_ip, key_path, validate_ip_subnet, validate_labels,
        validate_port, validate_wildcard_domain,
    },
};
use crate::{
    config::{
        Destination, L4MatchAttributes, MESH_GATEWAY, RouteDestination, TcpRoute,
        TlsMatchAttributes, TlsRoute, VirtualService, VirtualServiceSpec,
    },
    registry::{host_subset_of, hosts_overlap},
};

pub(super) fn check(service: &VirtualService, problems: &mut Problems) {
    let spec = &service.spec;
    if spec.hosts.is_empty() {
        // A VirtualService without hosts is a delegate, included from another one.
        if !spec.gateways.is_empty() {
            problems.error(
                "spec.gateways",
                "delegate virtual service must have no gateways specified",
            );
        }
        if !spec.tls.is_empty() {
            problems.error(
                "spec.tls",
                "delegate virtual service must have no tls route specified",
            );
        }
        if !spec.tcp.is_empty() {
            problems.error(
                "spec.tcp",
                "delegate virtual service must have no tcp route specified",
            );
        }
    }
    let applies_to_mesh = if spec.gateways.is_empty() {
        true
    } else {
        common::gateway_names(&spec.gateways, "spec.gateways", problems);
        spec.gateways.iter().any(|gateway| gateway == MESH_GATEWAY)
    };

    let mut all_hosts_valid = true;
    for (index, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{index}]");
        match validate_wildcard_domain(host) {
            Err(message) => {
                if !is_valid_ip(host) {
                    problems.error(field, message);
                    all_hosts_valid = false;
                }
            }
            Ok(()) if applies_to_mesh && host == "*" => {
                problems.error(
                    field,
                    "wildcard host * is not allowed for virtual services bound to the mesh gateway",
                );
                all_hosts_valid = false;
            }
            Ok(()) => {}
        }
    }
    if all_hosts_valid {
        for (i, first) in spec.hosts.iter().enumerate() {
            for (j, second) in spec.hosts.iter().enumerate().skip(i + 1) {
                if hosts_overlap(first, second) {
                    problems.error(
                        format!("spec.hosts[{j}]"),
                        format!("duplicate hosts in virtual service: {first} & {second}"),
                    );
                }
            }
        }
    }

    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        problems.error(
            "spec",
            "http, tcp or tls must be provided in virtual service",
        );
    }
    for (index, route) in spec.http.iter().enumerate() {
        if route.is_null() {
            problems.error(format!("spec.http[{index}]"), "http route may not be null");
        }
    }
    for (index, route) in spec.tls.iter().enumerate() {
        tls_route(route, spec, &format!("spec.tls[{index}]"), problems);
    }
    for (index, route) in spec.tcp.iter().enumerate() {
        tcp_route(route, &format!("spec.tcp[{index}]"), problems);
    }
    common::export_to(
        service.metadata.namespace(),
        &spec.export_to,
        ExportToOwner::VirtualService,
        "spec.exportTo",
        problems,
    );
    unreachable_rules(
        spec.tcp.iter().map(|route| &route.matches),
        "spec.tcp",
        problems,
    );
    unreachable_rules(
        spec.tls.iter().map(|route| &route.matches),
        "spec.tls",
        problems,
    );
}

fn tls_route(route: &TlsRoute, spec: &VirtualServiceSpec, base: &str, problems: &mut Problems) {
    if route.matches.is_empty() {
        problems.error(
            format!("{base}.match"),
            "TLS route must have at least one match condition",
        );
    }
    for (index, attributes) in route.matches.iter().enumerate() {
        tls_match(
            attributes,
            spec,
            &format!("{base}.match[{index}]"),
            problems,
        );
    }
    if route.route.is_empty() {
        problems.error(format!("{base}.route"), "TLS route is required");
    }
    route_destinations(&route.route, &format!("{base}.route"), problems);
}

fn tls_match(
    attributes: &TlsMatchAttributes,
    spec: &VirtualServiceSpec,
    base: &str,
    problems: &mut Problems,
) {
    if attributes.sni_hosts.is_empty() {
        problems.error(
            format!("{base}.sniHosts"),
            "TLS match must have at least one SNI host",
        );
    }
    for (index, sni) in attributes.sni_hosts.iter().enumerate() {
        sni_host(sni, spec, &format!("{base}.sniHosts[{index}]"), problems);
    }
    l4_predicates(
        &attributes.destination_subnets,
        attributes.port,
        &attributes.source_labels,
        &attributes.gateways,
        base,
        problems,
    );
}

fn sni_host(sni: &str, spec: &VirtualServiceSpec, field: &str, problems: &mut Problems) {
    if let Err(message) = validate_wildcard_domain(sni) {
        if is_valid_ip(sni) {
            problems.warn(
                field,
                format!(
                    "using an IP address ({sni:?}) goes against SNI spec and most clients do not support this"
                ),
            );
        } else {
            problems.error(field, message);
        }
        return;
    }
    if !spec.hosts.iter().any(|host| host_subset_of(sni, host)) {
        problems.error(
            field,
            format!(
                "SNI host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]",
                spec.hosts.join(", ")
            ),
        );
    }
}

fn tcp_route(route: &TcpRoute, base: &str, problems: &mut Problems) {
    for (index, attributes) in route.matches.iter().enumerate() {
        l4_match(attributes, &format!("{base}.match[{index}]"), problems);
    }
    if route.route.is_empty() {
        problems.error(format!("{base}.route"), "TCP route is required");
    }
    route_destinations(&route.route, &format!("{base}.route"), problems);
}

fn l4_match(attributes: &L4MatchAttributes, base: &str, problems: &mut Problems) {
    l4_predicates(
        &attributes.destination_subnets,
        attributes.port,
        &attributes.source_labels,
        &attributes.gateways,
        base,
        problems,
    );
}

fn l4_predicates(
    destination_subnets: &[String],
    port: u64,
    source_labels: &std::collections::BTreeMap<String, String>,
    gateways: &[String],
    base: &str,
    problems: &mut Problems,
) {
    for (index, subnet) in destination_subnets.iter().enumerate() {
        problems.check(
            format!("{base}.destinationSubnets[{index}]"),
            validate_ip_subnet(subnet),
        );
    }
    if port != 0 {
        problems.check(format!("{base}.port"), validate_port(port));
    }
    for (key, message) in validate_labels(source_labels) {
        problems.error(key_path(&format!("{base}.sourceLabels"), key), message);
    }
    common::gateway_names(gateways, &format!("{base}.gateways"), problems);
}

fn route_destinations(routes: &[RouteDestination], base: &str, problems: &mut Problems) {
    let mut total_weight: i64 = 0;
    for (index, route) in routes.iter().enumerate() {
        let field = format!("{base}[{index}]");
        match &route.destination {
            None => problems.error(format!("{field}.destination"), "destination is required"),
            Some(destination) => {
                self::destination(destination, &format!("{field}.destination"), problems);
            }
        }
        if route.weight < 0 {
            problems.error(
                format!("{field}.weight"),
                format!("weight {} < 0", route.weight),
            );
        }
        total_weight = total_weight.saturating_add(route.weight);
    }
    if routes.len() > 1 && total_weight == 0 {
        problems.error(base, "total destination weight = 0");
    }
}

fn destination(destination: &Destination, base: &str, problems: &mut Problems) {
    let host_field = format!("{base}.host");
    if destination.host == "*" {
        problems.error(host_field, "invalid destination host *");
    } else {
        problems.check(host_field, validate_wildcard_domain(&destination.host));
    }
    if !destination.subset.is_empty() && !is_dns1123_label(&destination.subset) {
        problems.error(
            format!("{base}.subset"),
            format!("subset name is invalid: {}", destination.subset),
        );
    }
    if let Some(port) = destination.port {
        problems.check(format!("{base}.port.number"), validate_port(port.number));
    }
}

/// Istio's unreachable-rule analysis for TCP and TLS routes: a rule after a
/// match-all rule, or whose every match repeats an earlier one, never applies.
fn unreachable_rules<'a, M: PartialEq + 'a>(
    routes: impl Iterator<Item = &'a Vec<M>>,
    base: &str,
    problems: &mut Problems,
) {
    let mut seen: Vec<(&M, usize)> = Vec::new();
    let mut match_all_seen = false;
    for (rule, matches) in routes.enumerate() {
        let field = format!("{base}[{rule}]");
        if matches.is_empty() {
            if match_all_seen {
                problems.warn(
                    field,
                    format!("virtualService rule #{rule} not used (only the last rule can have no matches)"),
                );
            }
            match_all_seen = true;
            continue;
        }
        let mut duplicates = 0;
        for (index, attributes) in matches.iter().enumerate() {
            if match_all_seen {
                problems.warn(
                    field.clone(),
                    format!("virtualService rule #{rule} not used (route without matches defined before)"),
                );
                continue;
            }
            if let Some((_, earlier)) = seen.iter().find(|(other, _)| *other == attributes) {
                problems.warn(
                    format!("{field}.match[{index}]"),
                    format!(
                        "virtualService rule #{rule} match #{index} is not used (duplicate/overlapping match in rule #{earlier})"
                    ),
                );
                duplicates += 1;
            } else {
                seen.push((attributes, rule));
            }
        }
        if duplicates == matches.len() {
            problems.warn(
                field,
                format!("virtualService rule #{rule} not used (all matches used by prior rules)"),
            );
        }
    }
}
