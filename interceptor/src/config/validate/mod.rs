//! Validation of loaded resources, at parity with Istio's two admission layers: the
//! CRD schema (enforced by the API server) and istiod's validating webhook. Both
//! layers' rules are applied; where they catch the same mistake, one finding is
//! reported, with the webhook's wording. Errors and warnings are kept apart by
//! [`Severity`], exactly as Istio separates admission errors from admission warnings.
//!
//! On top of the per-object rules, [`config_set`] reports what only shows when
//! entries are looked at together: which of two entries claiming the same port or
//! address wins, and entries that interception by destination can never reach.

mod common;
mod destination_rule;
pub mod names;
mod overlap;
mod service_entry;
mod virtual_service;
mod workload_entry;

#[cfg(test)]
mod tests;

use super::{
    ConfigSet, DestinationRule, Finding, ObjectMeta, ServiceEntry, Severity, Source, Sourced,
    VirtualService, WorkloadEntry, object_name,
};

pub use overlap::{entry_order, oldest_first};

/// Validates every resource in the set, and the set as a whole.
pub fn config_set(config: &ConfigSet) -> Vec<Finding> {
    let mut findings = Vec::new();
    for entry in &config.service_entries {
        findings.extend(service_entry(entry));
    }
    for entry in &config.workload_entries {
        findings.extend(workload_entry(entry));
    }
    for service in &config.virtual_services {
        findings.extend(virtual_service(service));
    }
    for rule in &config.destination_rules {
        findings.extend(destination_rule(rule));
    }
    findings.extend(overlap::service_entries(&config.service_entries));
    findings
}

pub fn service_entry(entry: &Sourced<ServiceEntry>) -> Vec<Finding> {
    let resource = &entry.resource;
    let mut problems = Problems::default();
    common::metadata(&resource.metadata, &mut problems);
    service_entry::check(resource, &mut problems);
    problems.into_findings(&entry.source, "ServiceEntry", &resource.metadata)
}

pub fn workload_entry(entry: &Sourced<WorkloadEntry>) -> Vec<Finding> {
    let resource = &entry.resource;
    let mut problems = Problems::default();
    common::metadata(&resource.metadata, &mut problems);
    workload_entry::check_standalone(&resource.spec, &mut problems);
    problems.into_findings(&entry.source, "WorkloadEntry", &resource.metadata)
}

pub fn virtual_service(service: &Sourced<VirtualService>) -> Vec<Finding> {
    let resource = &service.resource;
    let mut problems = Problems::default();
    common::metadata(&resource.metadata, &mut problems);
    virtual_service::check(resource, &mut problems);
    problems.into_findings(&service.source, "VirtualService", &resource.metadata)
}

pub fn destination_rule(rule: &Sourced<DestinationRule>) -> Vec<Finding> {
    let resource = &rule.resource;
    let mut problems = Problems::default();
    common::metadata(&resource.metadata, &mut problems);
    destination_rule::check(resource, &mut problems);
    problems.into_findings(&rule.source, "DestinationRule", &resource.metadata)
}

/// Findings for one object before they are located in a file.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    list: Vec<(Severity, String, String)>,
}

impl Problems {
    pub(crate) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list
            .push((Severity::Error, field.into(), message.into()));
    }

    pub(crate) fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list
            .push((Severity::Warning, field.into(), message.into()));
    }

    /// Records an `Err` from a syntax helper as an error at `field`.
    pub(crate) fn check(&mut self, field: impl Into<String>, result: Result<(), String>) {
        if let Err(message) = result {
            self.error(field, message);
        }
    }

    fn into_findings(self, source: &Source, kind: &str, metadata: &ObjectMeta) -> Vec<Finding> {
        let object = object_name(kind, metadata);
        self.list
            .into_iter()
            .map(|(severity, field, message)| {
                Finding::at(severity, source, object.clone(), field, message)
            })
            .collect()
    }
}
