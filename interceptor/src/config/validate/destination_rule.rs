//! DestinationRule: host, traffic policy (load balancer and client TLS modelled,
//! the rest opaque), subsets, exportTo and workload selector.

use std::collections::BTreeSet;

use super::{
    Problems, common,
    common::ExportToOwner,
    names::{is_dns1123_label, key_path, validate_labels, validate_wildcard_domain},
};
use crate::config::{ClientTlsSettings, DestinationRule, TlsMode, TrafficPolicy};

const CONFIGMAP_PREFIX: &str = "configmap://";

pub(super) fn check(rule: &DestinationRule, problems: &mut Problems) {
    let spec = &rule.spec;
    let namespace = rule.metadata.namespace();
    problems.check("spec.host", validate_wildcard_domain(&spec.host));
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(namespace, policy, "spec.trafficPolicy", problems);
    }
    let mut subset_names = BTreeSet::new();
    for (index, subset) in spec.subsets.iter().enumerate() {
        let base = format!("spec.subsets[{index}]");
        if !subset_names.insert(subset.name.as_str()) {
            problems.error(
                format!("{base}.name"),
                format!("duplicate subset names: {}", subset.name),
            );
        }
        if subset.name.is_empty() {
            problems.error(format!("{base}.name"), "subset name cannot be empty");
        } else if !is_dns1123_label(&subset.name) {
            problems.error(
                format!("{base}.name"),
                format!("subset name is invalid: {}", subset.name),
            );
        }
        for (key, message) in validate_labels(&subset.labels) {
            problems.error(key_path(&format!("{base}.labels"), key), message);
        }
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(
                namespace,
                policy,
                &format!("{base}.trafficPolicy"),
                problems,
            );
        }
    }
    common::export_to(
        namespace,
        &spec.export_to,
        ExportToOwner::DestinationRule {
            has_workload_selector: spec.workload_selector.is_some(),
        },
        "spec.exportTo",
        problems,
    );
    if let Some(selector) = &spec.workload_selector {
        common::selector_labels(
            &selector.match_labels,
            "spec.workloadSelector.matchLabels",
            problems,
        );
        if selector.match_labels.is_empty() {
            problems.warn(
                "spec.workloadSelector",
                "workload selector specified without labels",
            );
        }
    }
}

fn traffic_policy(namespace: &str, policy: &TrafficPolicy, base: &str, problems: &mut Problems) {
    if policy.is_empty() {
        problems.error(base, "traffic policy must have at least one field");
        return;
    }
    if policy.tunnel.is_some() && policy.proxy_protocol.is_some() {
        problems.error(base, "tunnel and proxyProtocol must not be set together");
        return;
    }
    if let Some(tls) = &policy.tls {
        client_tls(namespace, tls, &format!("{base}.tls"), problems);
    }
    for (index, port_policy) in policy.port_level_settings.iter().enumerate() {
        let port_base = format!("{base}.portLevelSettings[{index}]");
        if port_policy.port.is_none() {
            problems.error(
                format!("{port_base}.port"),
                "portTrafficPolicy must have valid port",
            );
        }
        if port_policy.is_empty() {
            problems.error(
                port_base,
                "port traffic policy must have at least one field",
            );
        } else if let Some(tls) = &port_policy.tls {
            client_tls(namespace, tls, &format!("{port_base}.tls"), problems);
        }
    }
}

/// Istio's `ValidateTLS` for client (origination) settings.
fn client_tls(namespace: &str, tls: &ClientTlsSettings, base: &str, problems: &mut Problems) {
    if let Some(reference) = tls.credential_name.strip_prefix(CONFIGMAP_PREFIX) {
        configmap_credential(
            namespace,
            reference,
            &format!("{base}.credentialName"),
            problems,
        );
    }
    let has_sans = !tls.subject_alt_names.is_empty();
    if tls.insecure_skip_verify == Some(true) {
        if tls.mode == TlsMode::Simple
            && (!tls.ca_certificates.is_empty() || !tls.credential_name.is_empty() || has_sans)
        {
            problems.error(
                base,
                "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true",
            );
        }
        if tls.mode == TlsMode::Mutual && (!tls.ca_certificates.is_empty() || has_sans) {
            problems.error(
                base,
                "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true",
            );
        }
    }
    let originates = matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual);
    if originates && !tls.credential_name.is_empty() {
        if !tls.client_certificate.is_empty()
            || !tls.ca_certificates.is_empty()
            || !tls.private_key.is_empty()
            || !tls.ca_crl.is_empty()
        {
            problems.error(
                base,
                "cannot specify client certificates or CA certificate or CA CRL If credentialName is set",
            );
        }
        // The credential supplies the certificates, so nothing else is required.
        return;
    }
    if tls.mode == TlsMode::Mutual {
        if tls.client_certificate.is_empty() {
            problems.error(
                format!("{base}.clientCertificate"),
                "client certificate required for mutual tls",
            );
        }
        if tls.private_key.is_empty() {
            problems.error(
                format!("{base}.privateKey"),
                "private key required for mutual tls",
            );
        }
    }
}

/// `configmap://name` or `configmap://namespace/name`; only the rule's own
/// namespace may be referenced.
fn configmap_credential(namespace: &str, reference: &str, field: &str, problems: &mut Problems) {
    let (referenced_namespace, name) = match reference.split_once('/') {
        Some((referenced_namespace, name)) => (referenced_namespace, name),
        None => (namespace, reference),
    };
    if name.is_empty() || referenced_namespace.is_empty() || name.contains('/') {
        problems.error(
            field,
            format!("invalid configmap:// credentialName: invalid resource name {reference:?}"),
        );
    } else if referenced_namespace != namespace {
        problems.error(
            field,
            format!(
                "invalid configmap:// credentialName: namespace must match the configuration namespace {namespace:?}"
            ),
        );
    }
}
