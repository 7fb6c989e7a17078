//! WorkloadEntries: the endpoints a ServiceEntry's workloadSelector chooses, and
//! which of them are healthy.

use std::net::IpAddr;

use super::services::Endpoint;
use crate::config::{
    Resolution, ServiceEntry, Severity, Sourced, WorkloadEntry, WorkloadSelector, object_name,
    validate,
};

/// Istio's annotation that makes a WorkloadEntry's `Healthy` condition count.
const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";

/// The endpoints a ServiceEntry's workloadSelector chooses, as Istio does: the
/// WorkloadEntries in the entry's namespace whose labels (metadata labels over spec
/// labels) include every selector label, oldest first. Pods cannot be selected: a
/// node-level proxy reading files has no view of the cluster's pods.
pub(super) fn selected_endpoints(
    entry: &Sourced<ServiceEntry>,
    selector: &WorkloadSelector,
    workload_entries: &[Sourced<WorkloadEntry>],
    report: &mut impl FnMut(Severity, String, String),
) -> Vec<Endpoint> {
    let spec = &entry.resource.spec;
    if spec.resolution == Resolution::None {
        // NONE forwards to the original destination; validation already warned.
        return Vec::new();
    }
    let namespace = entry.resource.metadata.namespace();
    let in_namespace: Vec<&Sourced<WorkloadEntry>> = workload_entries
        .iter()
        .filter(|workload| workload.resource.metadata.namespace() == namespace)
        .collect();
    let order = validate::oldest_first(in_namespace.iter().map(|w| &w.resource.metadata));
    let mut endpoints = Vec::new();
    for workload in order.into_iter().map(|index| in_namespace[index]) {
        let metadata = &workload.resource.metadata;
        let workload_spec = &workload.resource.spec;
        let label = |key: &String| metadata.labels.get(key).or(workload_spec.labels.get(key));
        if !selector
            .labels
            .iter()
            .all(|(key, value)| label(key) == Some(value))
        {
            continue;
        }
        let name = object_name("WorkloadEntry", metadata);
        let field = format!("spec.workloadSelector ({name})");
        let dns = matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        if workload_spec.address.is_empty() {
            report(
                Severity::Warning,
                field,
                "not used: it has no address (reaching it through its network's gateway is not supported)".into(),
            );
            continue;
        }
        if !dns && workload_spec.address.parse::<IpAddr>().is_err() {
            // Istio selects hostname and unix-socket WorkloadEntries for DNS services only.
            report(
                Severity::Warning,
                field,
                format!(
                    "not used: its address {:?} is not an IP, and only DNS and DNS_ROUND_ROBIN entries select such workloads",
                    workload_spec.address
                ),
            );
            continue;
        }
        if !is_healthy(&workload.resource) {
            report(
                Severity::Warning,
                field,
                format!(
                    "not used: {HEALTH_CHECKS_ANNOTATION} is true and its Healthy condition is not True"
                ),
            );
            continue;
        }
        if let Some(mut endpoint) =
            Endpoint::from_spec(workload_spec, spec.resolution, &field, report)
        {
            endpoint.workload_entry = Some(name);
            endpoints.push(endpoint);
        }
    }
    if endpoints.is_empty() {
        report(
            Severity::Warning,
            "spec.workloadSelector".into(),
            format!(
                "selects no usable WorkloadEntry in namespace {namespace}; connections to it are refused until one is added (Pods are not visible to this proxy)"
            ),
        );
    }
    endpoints
}

/// A WorkloadEntry whose health checks are enabled counts only once its `Healthy`
/// condition is True, as in Istio; others are always healthy.
fn is_healthy(workload: &WorkloadEntry) -> bool {
    let checked = workload
        .metadata
        .annotations
        .get(HEALTH_CHECKS_ANNOTATION)
        .is_some_and(|value| value.eq_ignore_ascii_case("true"));
    if !checked {
        return true;
    }
    let conditions = workload
        .status
        .as_ref()
        .and_then(|status| status.get("conditions"))
        .and_then(serde_json::Value::as_array);
    conditions.into_iter().flatten().any(|condition| {
        condition.get("type").and_then(serde_json::Value::as_str) == Some("Healthy")
            && condition.get("status").and_then(serde_json::Value::as_str) == Some("True")
    })
}

#[cfg(test)]
mod tests {
    use super::{
        super::{EndpointAddress, Registry, test_support::*},
        *,
    };
    use crate::config::Source;

    /// `body` continues `metadata` (indented lines) and then gives `spec` and `status`.
    fn workload(name: &str, namespace: &str, body: &str) -> Sourced<WorkloadEntry> {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{body}"
        );
        Sourced {
            source: Source {
                file: "workloads.yaml".into(),
                document: 0,
            },
            resource: serde_saphyr::from_str(&yaml).expect("valid WorkloadEntry"),
        }
    }

    #[test]
    fn a_workload_selector_chooses_matching_workload_entries_in_its_namespace() {
        let selecting = |resolution: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: data}}\nspec:\n  hosts: [db.example]\n  addresses: [240.240.0.5]\n  ports: [{{number: 5432, name: pg}}]\n  resolution: {resolution}\n  workloadSelector: {{labels: {{app: db}}}}\n"
            )
        };
        let static_entry = selecting("STATIC");
        let mut config = config(&[&static_entry]);
        config.workload_entries = vec![
            // Created later than vm-b, so it comes second.
            workload(
                "vm-a",
                "data",
                "  creationTimestamp: '2026-01-02T00:00:00Z'\nspec: {address: 198.18.0.1, labels: {app: db}, weight: 3, ports: {pg: 6432}}",
            ),
            // Metadata labels win over spec labels.
            workload(
                "vm-b",
                "data",
                "  creationTimestamp: '2026-01-01T00:00:00Z'\n  labels: {app: db}\nspec: {address: 198.18.0.2, labels: {app: web}}",
            ),
            workload(
                "vm-web",
                "data",
                "spec: {address: 198.18.0.3, labels: {app: web}}",
            ),
            workload(
                "vm-elsewhere",
                "other",
                "spec: {address: 198.18.0.4, labels: {app: db}}",
            ),
            workload(
                "vm-unhealthy",
                "data",
                "  annotations: {proxy.istio.io/health-checks-enabled: 'true'}\nspec: {address: 198.18.0.5, labels: {app: db}}",
            ),
            workload(
                "vm-healthy",
                "data",
                "  annotations: {proxy.istio.io/health-checks-enabled: 'true'}\nspec: {address: 198.18.0.6, labels: {app: db}}\nstatus: {conditions: [{type: Healthy, status: 'True'}]}",
            ),
            workload(
                "vm-named",
                "data",
                "spec: {address: db.vm.example, labels: {app: db}}",
            ),
        ];
        let (registry, warnings) = Registry::build(&config).unwrap();
        let service = registry
            .route("240.240.0.5:5432".parse().unwrap())
            .unwrap()
            .service;
        let chosen: Vec<(&str, &EndpointAddress, Option<u16>, u64)> = service
            .endpoints
            .iter()
            .map(|endpoint| {
                (
                    endpoint.workload_entry.as_deref().unwrap(),
                    &endpoint.address,
                    endpoint.ports.get("pg").copied(),
                    endpoint.weight,
                )
            })
            .collect();
        let ip = |text: &str| EndpointAddress::Ip(text.parse().unwrap());
        assert_eq!(
            chosen,
            [
                ("WorkloadEntry/data/vm-b", &ip("198.18.0.2"), None, 1),
                ("WorkloadEntry/data/vm-a", &ip("198.18.0.1"), Some(6432), 3),
                ("WorkloadEntry/data/vm-healthy", &ip("198.18.0.6"), None, 1),
            ]
        );
        assert!(!service.endpoints_from_hosts);
        let said = |needle: &str| warnings.iter().any(|w| w.field.contains(needle));
        assert!(said("vm-unhealthy") && said("vm-named"), "{warnings:?}");
        assert!(!said("vm-web") && !said("vm-elsewhere"), "{warnings:?}");

        // A DNS entry also selects workloads addressed by hostname, and resolves no
        // endpoint of its own hosts.
        config.service_entries =
            super::super::test_support::config(&[&selecting("DNS")]).service_entries;
        let (registry, _) = Registry::build(&config).unwrap();
        let service = registry
            .route("240.240.0.5:5432".parse().unwrap())
            .unwrap()
            .service;
        assert!(
            service
                .endpoints
                .iter()
                .any(|endpoint| endpoint.address
                    == EndpointAddress::Hostname("db.vm.example".into()))
        );
        assert!(
            !service
                .endpoints
                .iter()
                .any(|endpoint| endpoint.address == EndpointAddress::Hostname("db.example".into()))
        );

        // Selecting nothing is served (connections are refused) and warned about.
        config.workload_entries.clear();
        let (registry, warnings) = Registry::build(&config).unwrap();
        assert!(
            registry
                .route("240.240.0.5:5432".parse().unwrap())
                .unwrap()
                .service
                .endpoints
                .is_empty()
        );
        assert!(
            warnings.iter().any(|w| w.field == "spec.workloadSelector"
                && w.message.contains("selects no usable WorkloadEntry")),
            "{warnings:?}"
        );
    }
}
