//! Validation of loaded resources. Rules follow Istio's webhook and CRD schema.

use super::{ConfigSet, Finding, ServiceEntry, Severity, Sourced, object_name};

/// Validates every resource in the set, and the set as a whole.
pub fn config_set(config: &ConfigSet) -> Vec<Finding> {
    let mut findings = Vec::new();
    for entry in &config.service_entries {
        findings.extend(service_entry(entry));
    }
    findings
}

pub fn service_entry(entry: &Sourced<ServiceEntry>) -> Vec<Finding> {
    let resource = &entry.resource;
    let mut problems: Vec<(Severity, String, String)> = Vec::new();
    let spec = &resource.spec;
    if spec.hosts.is_empty() {
        problems.push((
            Severity::Error,
            "spec.hosts".into(),
            "service entry must have at least one host".into(),
        ));
    }
    for (index, port) in spec.ports.iter().enumerate() {
        if !(1..=65535).contains(&port.number) {
            problems.push((
                Severity::Error,
                format!("spec.ports[{index}].number"),
                format!("port number {} must be in the range 1..65535", port.number),
            ));
        }
        if let Some(target) = port.target_port
            && target != 0
            && !(1..=65535).contains(&target)
        {
            problems.push((
                Severity::Error,
                format!("spec.ports[{index}].targetPort"),
                format!("port number {target} must be in the range 1..65535"),
            ));
        }
    }
    let object = object_name("ServiceEntry", &resource.metadata);
    problems
        .into_iter()
        .map(|(severity, field, message)| Finding {
            severity,
            file: entry.source.file.clone(),
            document: entry.source.document,
            object: object.clone(),
            field,
            message,
        })
        .collect()
}
