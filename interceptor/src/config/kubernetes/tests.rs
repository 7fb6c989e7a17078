use serde_json::{Value, json};

use super::{
    discovery::{Served, choose},
    store::{Kind, Outcome, Store},
};

fn service_entry(name: &str, version: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {
            "name": name, "namespace": "shop", "resourceVersion": version,
            "uid": "0f0c", "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {
            "hosts": [format!("{name}.shop.test")],
            "addresses": [vip],
            "ports": [{"number": 7000, "name": "tcp", "protocol": "TCP"}],
            "resolution": "STATIC",
            "endpoints": [{"address": "198.18.0.10"}],
        },
        "status": {"conditions": []},
    })
}

fn addresses(store: &Store) -> Vec<String> {
    store
        .config_set()
        .service_entries
        .iter()
        .flat_map(|entry| entry.resource.spec.addresses.clone())
        .collect()
}

#[test]
fn server_fields_are_dropped_and_the_object_applies() {
    let mut store = Store::new([Kind::ServiceEntry]);
    store.init(0);
    assert_eq!(
        store.apply(0, &service_entry("a", "1", "240.240.0.1")),
        Outcome::Unchanged,
        "a list in progress applies nothing yet"
    );
    assert!(!store.all_listed());
    assert_eq!(store.init_done(0), Outcome::Changed);
    assert!(store.all_listed());
    assert_eq!(addresses(&store), ["240.240.0.1"]);
}

#[test]
fn an_invalid_version_is_rejected_once_and_the_previous_one_stays() {
    let mut store = Store::new([Kind::ServiceEntry]);
    store.init(0);
    store.apply(0, &service_entry("a", "1", "240.240.0.1"));
    store.init_done(0);
    let invalid = service_entry("a", "2", "not-an-address");
    let Outcome::Rejected(findings) = store.apply(0, &invalid) else {
        panic!("an invalid address must be rejected");
    };
    let finding = findings[0].to_string();
    assert!(finding.contains("ServiceEntry/shop/a"), "{finding}");
    assert!(finding.contains("addresses"), "{finding}");
    assert_eq!(addresses(&store), ["240.240.0.1"]);
    // A re-list that sees the same invalid version keeps the valid one and reports
    // nothing new.
    store.init(0);
    assert_eq!(store.apply(0, &invalid), Outcome::RejectedAgain);
    assert_eq!(store.init_done(0), Outcome::Unchanged);
    assert_eq!(addresses(&store), ["240.240.0.1"]);
    // Other objects are unaffected.
    assert_eq!(
        store.apply(0, &service_entry("b", "3", "240.240.0.2")),
        Outcome::Changed
    );
    assert_eq!(addresses(&store).len(), 2);
}

#[test]
fn a_relist_of_the_same_objects_changes_nothing_and_one_of_fewer_deletes() {
    let mut store = Store::new([Kind::ServiceEntry]);
    store.init(0);
    store.apply(0, &service_entry("a", "1", "240.240.0.1"));
    store.apply(0, &service_entry("b", "1", "240.240.0.2"));
    store.init_done(0);
    store.init(0);
    store.apply(0, &service_entry("a", "7", "240.240.0.1"));
    store.apply(0, &service_entry("b", "7", "240.240.0.2"));
    assert_eq!(
        store.init_done(0),
        Outcome::Unchanged,
        "no flap on a re-list"
    );
    store.init(0);
    store.apply(0, &service_entry("a", "8", "240.240.0.1"));
    assert_eq!(store.init_done(0), Outcome::Changed);
    assert_eq!(addresses(&store), ["240.240.0.1"]);
    assert_eq!(
        store.delete(0, &service_entry("a", "9", "240.240.0.1")),
        Outcome::Changed
    );
    assert!(addresses(&store).is_empty());
}

fn pod(phase: &str, ready: &str) -> Value {
    json!({
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "web"}]},
        "status": {
            "phase": phase, "podIP": "198.18.0.20",
            "conditions": [{"type": "Ready", "status": ready}],
        },
    })
}

#[test]
fn only_running_and_ready_pods_are_workload_endpoints() {
    let mut store = Store::new([Kind::Pod]);
    store.init(0);
    store.apply(0, &pod("Running", "True"));
    store.init_done(0);
    let workloads = store.config_set().workload_entries;
    assert_eq!(workloads.len(), 1);
    assert_eq!(workloads[0].resource.metadata.name, "pod.web-1");
    assert_eq!(workloads[0].resource.spec.address, "198.18.0.20");
    assert_eq!(workloads[0].resource.spec.labels["app"], "web");
    assert_eq!(store.apply(0, &pod("Running", "False")), Outcome::Changed);
    assert!(store.config_set().workload_entries.is_empty());
    assert_eq!(store.apply(0, &pod("Pending", "True")), Outcome::Unchanged);
}

#[test]
fn every_pod_s_namespace_is_known_by_its_uid_endpoint_or_not_and_a_relist_forgets_the_gone() {
    let with_uid = |name: &str, namespace: &str, uid: &str, phase: &str| {
        let mut pod = pod(phase, "False");
        pod["metadata"] = json!({"name": name, "namespace": namespace, "uid": uid});
        pod
    };
    let mut store = Store::new([Kind::Pod]);
    store.init(0);
    store.apply(0, &with_uid("web-1", "shop", "u-1", "Pending"));
    store.apply(0, &with_uid("api-1", "blog", "u-2", "Running"));
    store.init_done(0);
    let namespaces = store.pod_namespaces();
    assert_eq!(namespaces.len(), 2);
    assert_eq!(namespaces["u-1"], "shop");
    assert_eq!(namespaces["u-2"], "blog");
    store.delete(0, &with_uid("web-1", "shop", "u-1", "Pending"));
    assert!(!store.pod_namespaces().contains_key("u-1"));
    // A re-list that no longer lists a pod (deleted while the watch was cut).
    store.init(0);
    store.apply(0, &with_uid("web-2", "shop", "u-3", "Running"));
    assert!(
        store.pod_namespaces().contains_key("u-2"),
        "kept until the re-list ends"
    );
    store.init_done(0);
    let namespaces = store.pod_namespaces();
    assert_eq!(namespaces.keys().collect::<Vec<_>>(), ["u-3"]);
}

#[test]
fn the_most_preferred_served_version_is_read() {
    let served = |version: &str, kinds: &[&str]| Served {
        version: version.into(),
        kinds: kinds
            .iter()
            .map(|kind| (kind.to_string(), format!("{}s", kind.to_lowercase())))
            .collect(),
    };
    let cluster = [
        served("v1alpha3", &["ServiceEntry", "WorkloadEntry", "Sidecar"]),
        served("v1beta1", &["ServiceEntry", "WorkloadEntry"]),
        served("v1", &["ServiceEntry"]),
    ];
    assert_eq!(
        choose(&cluster, "ServiceEntry"),
        Some(("v1".into(), "serviceentrys".into()))
    );
    assert_eq!(choose(&cluster, "WorkloadEntry").unwrap().0, "v1beta1");
    assert_eq!(choose(&cluster, "Sidecar").unwrap().0, "v1alpha3");
    assert_eq!(choose(&cluster, "DestinationRule"), None);
}
