//! The CustomResourceDefinitions of the four `networking.istio.io` kinds the daemon
//! reads, for clusters without Istio. They are derived from the model's own types
//! (kube's `CustomResource` derive with schemars), so the API server accepts what the
//! daemon reads; `deploy/kubernetes/crds.yaml` is [`yaml`]'s output, and a test keeps
//! it current.

use kube::CustomResourceExt as _;
use serde_json::Value;

use super::discovery::PREFERENCE;
use crate::config::model::{
    DestinationRuleResource, ServiceEntryResource, VirtualServiceResource, WorkloadEntryResource,
};

/// The version the API server stores; every other preferred version is served with
/// the same schema, as Istio's versions share one.
const STORED: &str = PREFERENCE[0];

/// One definition per kind, serving every version the daemon reads.
pub fn definitions() -> Vec<Value> {
    [
        ServiceEntryResource::crd(),
        WorkloadEntryResource::crd(),
        VirtualServiceResource::crd(),
        DestinationRuleResource::crd(),
    ]
    .into_iter()
    .map(|crd| {
        // merge_crds appends the versions other than the stored one last first:
        // reversed, they list in order of preference.
        let versions = PREFERENCE
            .iter()
            .rev()
            .map(|version| {
                let mut crd = crd.clone();
                crd.spec.versions[0].name = (*version).to_owned();
                crd
            })
            .collect();
        let crd = kube::core::crd::merge_crds(versions, STORED)
            .expect("copies of one definition differ only in their version");
        let mut crd = serde_json::to_value(crd).expect("a definition serializes");
        for version in crd["spec"]["versions"]
            .as_array_mut()
            .expect("a definition has versions")
        {
            strip(&mut version["schema"]["openAPIV3Schema"]);
        }
        crd
    })
    .collect()
}

/// The definitions as one YAML stream, as committed in `deploy/kubernetes/`.
pub fn yaml() -> String {
    let mut out = String::from(
        "# The CustomResourceDefinitions of the networking.istio.io kinds interceptor reads,\n\
         # for clusters without Istio. Generated from interceptor's model: do not edit; run\n\
         # `INTERCEPTOR_WRITE_CRDS=1 cargo test -p interceptor --lib crd` after changing it.\n",
    );
    for crd in definitions() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("a definition serializes as YAML"));
    }
    out
}

/// Removes what the derive puts in a schema that does not belong in this one:
/// - `default`: the API server would write serde's defaults into stored objects,
///   which the daemon already applies when it reads them, and which Istio's own
///   definitions leave unset, so objects would look different across clusters;
/// - `description` and `title`: the model's doc comments and type names are written
///   for its developers.
fn strip(schema: &mut Value) {
    let Some(schema) = schema.as_object_mut() else {
        return;
    };
    for keyword in ["default", "description", "title"] {
        schema.remove(keyword);
    }
    for (keyword, value) in schema.iter_mut() {
        match keyword.as_str() {
            // Field names map to schemas: a field may be called `default`.
            "properties" => value
                .as_object_mut()
                .into_iter()
                .flat_map(|properties| properties.values_mut())
                .for_each(strip),
            "items" | "additionalProperties" => strip(value),
            "allOf" | "anyOf" | "oneOf" => {
                value.as_array_mut().into_iter().flatten().for_each(strip)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::{Value, json};

    use super::{definitions, yaml};
    use crate::config::yaml::{parse, split};

    /// Set to rewrite the committed file instead of comparing with it.
    const WRITE: &str = "INTERCEPTOR_WRITE_CRDS";

    fn manifest_path(relative: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    #[test]
    fn the_committed_definitions_are_current() {
        let path = manifest_path("../deploy/kubernetes/crds.yaml");
        let generated = yaml();
        if std::env::var_os(WRITE).is_some() {
            std::fs::write(&path, &generated).expect("write the definitions");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is not what the model derives: run `{WRITE}=1 cargo test -p interceptor --lib crd`",
            path.display()
        );
    }

    /// The schema `object`'s kind and version are served with, or why none is.
    fn schema_for(object: &Value) -> Result<Value, String> {
        let (group, version) = object["apiVersion"]
            .as_str()
            .and_then(|api_version| api_version.split_once('/'))
            .ok_or("no group/version apiVersion")?;
        let kind = object["kind"].as_str().ok_or("no kind")?;
        let crd = definitions()
            .into_iter()
            .find(|crd| crd["spec"]["group"] == group && crd["spec"]["names"]["kind"] == kind)
            .ok_or_else(|| format!("no definition of {group} {kind}"))?;
        let served = crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|served| served["name"] == version && served["served"] == true)
            .ok_or_else(|| format!("{kind} is not served at {version}"))?;
        Ok(served["schema"]["openAPIV3Schema"].clone())
    }

    /// Every violation of its definition's schema, one line each, or why none applies.
    fn check(object: &Value) -> Result<(), String> {
        let schema = schema_for(object)?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|error| format!("the schema does not compile: {error}"))?;
        let errors: Vec<String> = validator
            .iter_errors(object)
            .map(|error| format!("{}: {error}", error.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The documents of a YAML file of the repository.
    fn documents(relative: &str) -> Vec<Value> {
        let path = manifest_path(relative);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let split = split(&text);
        assert_eq!(split.error, None, "{}", path.display());
        split
            .documents
            .into_iter()
            .filter_map(|document| parse(document, 1).expect("a YAML document"))
            .collect()
    }

    #[test]
    fn the_reference_examples_and_ours_are_accepted() {
        let mut checked = 0;
        for file in [
            "src/config/testdata/istio-serviceentry-reference.yaml",
            "../examples/serviceentries.yaml",
        ] {
            for object in documents(file) {
                // The reference page also shows a Gateway, which the daemon does not read.
                if object["kind"] == "Gateway" {
                    continue;
                }
                let name = &object["metadata"]["name"];
                check(&object)
                    .unwrap_or_else(|error| panic!("{file}: {} {name}: {error}", object["kind"]));
                checked += 1;
            }
        }
        // Both files' objects of the four kinds, at each of the three versions.
        assert!(checked >= 30, "only {checked} objects checked");
    }

    #[test]
    fn an_object_outside_the_schema_is_refused_with_its_field() {
        let object = json!({
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "ServiceEntry",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {
                "hosts": ["bad.example"],
                "ports": [{"number": "https", "name": "https", "protocol": "TLS"}],
                "resolution": "SOMETIMES",
            },
        });
        let error = check(&object).expect_err("refused");
        assert!(error.contains("/spec/ports/0/number"), "{error}");
        assert!(error.contains("/spec/resolution"), "{error}");
        // The same object with those two fields right is accepted: the refusal is
        // theirs, not the schema refusing everything.
        let mut fixed = object;
        fixed["spec"]["ports"][0]["number"] = json!(443);
        fixed["spec"]["resolution"] = json!("DNS");
        check(&fixed).expect("accepted");
    }

    #[test]
    fn each_kind_is_served_at_every_version_the_daemon_reads_and_stored_at_v1() {
        for crd in definitions() {
            let versions: Vec<(&str, bool)> = crd["spec"]["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|version| {
                    assert_eq!(version["served"], true);
                    (
                        version["name"].as_str().unwrap(),
                        version["storage"] == true,
                    )
                })
                .collect();
            assert_eq!(
                versions,
                [("v1", true), ("v1beta1", false), ("v1alpha3", false)],
                "{}",
                crd["metadata"]["name"]
            );
            assert_eq!(crd["spec"]["scope"], "Namespaced");
        }
    }
}
