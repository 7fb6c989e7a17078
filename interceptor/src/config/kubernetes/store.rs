//! What the watches have seen, as plain values: each object validated on its own with
//! the file loader's rules, the last valid version of each kept, and the whole turned
//! into the [`ConfigSet`] the file loader produces.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use serde_json::{Map, Value};

use crate::config::{self, ConfigSet, Finding, LoadError, Source};

/// The kinds read from the API server. Pods become WorkloadEntries, so a
/// `workloadSelector` selects them as Istio does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ServiceEntry,
    WorkloadEntry,
    VirtualService,
    DestinationRule,
    Pod,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Pod,
    ];
    pub const ISTIO: [Kind; 4] = [
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::VirtualService,
        Kind::DestinationRule,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Pod => "Pod",
        }
    }
}

/// `(namespace, name)` within one watch.
type Key = (String, String);

/// One accepted object: its config-model form and what it contributes.
#[derive(Debug, Clone, PartialEq)]
struct Accepted {
    document: Value,
    config: ConfigSet,
}

/// What one watch (one kind, in all namespaces or one) holds.
#[derive(Debug, Default)]
struct Watch {
    objects: BTreeMap<Key, Accepted>,
    /// A re-list in progress: replaces `objects` when it completes, so the maps never
    /// see a half-listed state.
    relisting: Option<BTreeMap<Key, Accepted>>,
    /// The `resourceVersion` of each object last rejected, so a re-list reports it
    /// again only if it changed.
    rejected: BTreeMap<Key, String>,
    listed: bool,
    /// Pods only: the uid of every pod, endpoint or not, which finds its cgroups and
    /// so its clients' namespace; replaced by a re-list as `objects` is.
    uids: BTreeMap<Key, String>,
    relisting_uids: Option<BTreeMap<Key, String>>,
}

/// The result of one watch event.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The served config changed.
    Changed,
    /// Nothing to apply: the same object again, or a change held until a re-list ends.
    Unchanged,
    /// The object is invalid (first time seen at this version): its previous valid
    /// version, if any, stays.
    Rejected(Vec<Finding>),
    /// Invalid, and already reported at this version.
    RejectedAgain,
}

/// Every watch's objects.
#[derive(Debug)]
pub struct Store {
    watches: Vec<(Kind, Watch)>,
}

impl Store {
    /// A store for watches of these kinds, indexed as given.
    pub fn new(kinds: impl IntoIterator<Item = Kind>) -> Self {
        Self {
            watches: kinds
                .into_iter()
                .map(|kind| (kind, Watch::default()))
                .collect(),
        }
    }

    /// Whether every watch has completed its first list.
    pub fn all_listed(&self) -> bool {
        self.watches.iter().all(|(_, watch)| watch.listed)
    }

    /// A (re-)list begins.
    pub fn init(&mut self, watch: usize) {
        self.watches[watch].1.relisting = Some(BTreeMap::new());
        self.watches[watch].1.relisting_uids = Some(BTreeMap::new());
    }

    /// A (re-)list ended: what it listed replaces what the watch held.
    pub fn init_done(&mut self, watch: usize) -> Outcome {
        let watch = &mut self.watches[watch].1;
        let first = !watch.listed;
        watch.listed = true;
        if let Some(uids) = watch.relisting_uids.take() {
            watch.uids = uids;
        }
        let Some(listed) = watch.relisting.take() else {
            return Outcome::Unchanged;
        };
        watch.rejected.retain(|key, _| listed.contains_key(key));
        if listed == watch.objects && !first {
            return Outcome::Unchanged;
        }
        watch.objects = listed;
        Outcome::Changed
    }

    /// An object was listed, added or modified.
    pub fn apply(&mut self, watch: usize, object: &Value) -> Outcome {
        let (kind, state) = &mut self.watches[watch];
        let key = key_of(object);
        if *kind == Kind::Pod
            && let Some(uid) = text(object, &["metadata", "uid"])
        {
            let uids = state.relisting_uids.as_mut().unwrap_or(&mut state.uids);
            uids.insert(key.clone(), uid.to_owned());
        }
        let accepted = match to_document(*kind, object) {
            None => return remove(state, &key),
            Some(document) => validate(*kind, &key, document),
        };
        let target = state.relisting.as_mut().unwrap_or(&mut state.objects);
        match accepted {
            Ok(accepted) => {
                state.rejected.remove(&key);
                if target.get(&key) == Some(&accepted) {
                    return Outcome::Unchanged;
                }
                target.insert(key, accepted);
                if state.relisting.is_some() {
                    Outcome::Unchanged
                } else {
                    Outcome::Changed
                }
            }
            Err(findings) => {
                // The previous valid version stays, also across a re-list.
                if let (Some(relisting), Some(previous)) =
                    (state.relisting.as_mut(), state.objects.get(&key))
                {
                    relisting.insert(key.clone(), previous.clone());
                }
                let version = resource_version(object);
                if state.rejected.get(&key) == Some(&version) {
                    return Outcome::RejectedAgain;
                }
                state.rejected.insert(key, version);
                Outcome::Rejected(findings)
            }
        }
    }

    /// An object was deleted.
    pub fn delete(&mut self, watch: usize, object: &Value) -> Outcome {
        let key = key_of(object);
        let state = &mut self.watches[watch].1;
        state.rejected.remove(&key);
        state
            .relisting_uids
            .as_mut()
            .unwrap_or(&mut state.uids)
            .remove(&key);
        remove(state, &key)
    }

    /// The namespace of every pod listed, by its uid.
    pub fn pod_namespaces(&self) -> HashMap<String, String> {
        self.watches
            .iter()
            .filter(|(kind, _)| *kind == Kind::Pod)
            .flat_map(|(_, watch)| &watch.uids)
            .map(|((namespace, _), uid)| (uid.clone(), namespace.clone()))
            .collect()
    }

    /// The accepted objects of every watch, as the file loader would produce them.
    pub fn config_set(&self) -> ConfigSet {
        let mut set = ConfigSet::default();
        for (_, watch) in &self.watches {
            for accepted in watch.objects.values() {
                set.extend(accepted.config.clone());
            }
        }
        set
    }
}

fn remove(state: &mut Watch, key: &Key) -> Outcome {
    match state.relisting.as_mut() {
        Some(relisting) => {
            relisting.remove(key);
            Outcome::Unchanged
        }
        None if state.objects.remove(key).is_some() => Outcome::Changed,
        None => Outcome::Unchanged,
    }
}

fn text<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |value, field| value.get(field))
        .and_then(Value::as_str)
}

fn key_of(object: &Value) -> Key {
    (
        text(object, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_owned(),
        text(object, &["metadata", "name"]).unwrap_or("").to_owned(),
    )
}

fn resource_version(object: &Value) -> String {
    text(object, &["metadata", "resourceVersion"])
        .unwrap_or("")
        .to_owned()
}

/// The object as a config document: what the file loader would read for it. Server
/// fields (`status`, managed fields) go, so the strict decoding judges only what a
/// user wrote. `None`: a pod that is no endpoint (not Running and Ready, no IP).
pub fn to_document(kind: Kind, object: &Value) -> Option<Value> {
    let metadata = object.get("metadata").cloned().unwrap_or(Value::Null);
    let mut kept = Map::new();
    for field in ["name", "namespace", "labels", "annotations"] {
        if let Some(value) = metadata.get(field) {
            kept.insert(field.to_owned(), value.clone());
        }
    }
    if kind == Kind::Pod {
        return pod_workload_entry(object, kept);
    }
    let mut document = Map::new();
    // List items from the server may lack their type; the watch knows it.
    let api_version = object
        .get("apiVersion")
        .cloned()
        .unwrap_or_else(|| Value::String("networking.istio.io/v1".into()));
    document.insert("apiVersion".into(), api_version);
    document.insert("kind".into(), Value::String(kind.name().into()));
    document.insert("metadata".into(), Value::Object(kept));
    if let Some(spec) = object.get("spec") {
        document.insert("spec".into(), spec.clone());
    }
    Some(Value::Object(document))
}

/// A Running and Ready pod as the WorkloadEntry Istio would see for it: its IP and
/// labels. Its name is `pod.NAME`, so it never collides with a WorkloadEntry's.
fn pod_workload_entry(pod: &Value, mut metadata: Map<String, Value>) -> Option<Value> {
    let running = text(pod, &["status", "phase"]) == Some("Running");
    let ready = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions.iter().any(|condition| {
                text(condition, &["type"]) == Some("Ready")
                    && text(condition, &["status"]) == Some("True")
            })
        });
    let ip = text(pod, &["status", "podIP"])?;
    if !running || !ready {
        return None;
    }
    let name = text(pod, &["metadata", "name"])?;
    let labels = metadata
        .remove("labels")
        .unwrap_or(Value::Object(Map::new()));
    metadata.remove("annotations");
    metadata.insert("name".into(), Value::String(format!("pod.{name}")));
    Some(serde_json::json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": metadata,
        "spec": { "address": ip, "labels": labels },
    }))
}

/// The object validated alone, with the rules of `interceptor validate`.
fn validate(kind: Kind, key: &Key, document: Value) -> Result<Accepted, Vec<Finding>> {
    let source = Source {
        file: PathBuf::from(format!("kubernetes:{}/{}/{}", kind.name(), key.0, key.1)),
        document: 0,
    };
    match config::load_value(source, document.clone()) {
        Ok(loaded) => Ok(Accepted {
            document,
            config: loaded.config,
        }),
        Err(LoadError::Invalid { findings }) => Err(findings
            .into_iter()
            .filter(|finding| finding.severity == config::Severity::Error)
            .collect()),
        // Reading files is the only other failure, and none is read here.
        Err(error) => Err(vec![Finding {
            severity: config::Severity::Error,
            file: PathBuf::from(format!("kubernetes:{}/{}/{}", kind.name(), key.0, key.1)),
            document: 0,
            object: String::new(),
            field: String::new(),
            message: error.to_string(),
        }]),
    }
}
