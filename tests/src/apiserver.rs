//! An in-process stand-in for kube-apiserver, for the `--kubernetes` tests.
//!
//! It is a protocol-level stand-in, not an API server: it speaks the wire protocol a
//! client sees (discovery documents, lists carrying a `resourceVersion`, chunked watch
//! streams of ADDED / MODIFIED / DELETED / BOOKMARK events, `410 Gone` for a watch
//! from a compacted version, 403 for a resource the client's RBAC would not allow,
//! Events POST and PATCH) and lets a test cut every watch connection. It does no
//! admission, no schema validation, no field or label selectors and no paging, which
//! the daemon does not use.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::broadcast;

type Body = BoxBody<Bytes, std::io::Error>;

/// A kind the server serves: where, and under which names.
#[derive(Debug, Clone)]
struct Served {
    group: &'static str,
    versions: &'static [&'static str],
    kind: &'static str,
    plural: &'static str,
}

const ISTIO: &str = "networking.istio.io";
const ISTIO_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];

const SERVED: [Served; 6] = [
    Served {
        group: ISTIO,
        versions: ISTIO_VERSIONS,
        kind: "ServiceEntry",
        plural: "serviceentries",
    },
    Served {
        group: ISTIO,
        versions: ISTIO_VERSIONS,
        kind: "WorkloadEntry",
        plural: "workloadentries",
    },
    Served {
        group: ISTIO,
        versions: ISTIO_VERSIONS,
        kind: "VirtualService",
        plural: "virtualservices",
    },
    Served {
        group: ISTIO,
        versions: ISTIO_VERSIONS,
        kind: "DestinationRule",
        plural: "destinationrules",
    },
    Served {
        group: "",
        versions: &["v1"],
        kind: "Pod",
        plural: "pods",
    },
    Served {
        group: "events.k8s.io",
        versions: &["v1"],
        kind: "Event",
        plural: "events",
    },
];

fn served_kind(kind: &str) -> &'static Served {
    SERVED
        .iter()
        .find(|served| served.kind == kind)
        .unwrap_or_else(|| panic!("the stand-in serves no {kind}"))
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
struct Change {
    version: u64,
    kind: &'static str,
    namespace: String,
    event: Value,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    /// Watches from a version below this get 410 Gone, as after an etcd
    /// compaction.
    compacted: u64,
    /// `(kind, namespace, name)` → object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Change>,
    /// Plurals the client may not list or watch.
    forbidden: BTreeSet<String>,
    events: Vec<Value>,
    /// Requests served, as `METHOD path?query`.
    requests: Vec<String>,
}

/// What a watch stream is told besides the changes.
#[derive(Debug, Clone)]
enum Broadcast {
    Change(Change),
    Bookmark(u64),
    /// Drop the connection, without ending the chunked body.
    Cut,
}

pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    broadcast: broadcast::Sender<Broadcast>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on a free loopback port of the calling thread's network namespace.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the API server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State {
            version: 1,
            ..State::default()
        }));
        let (broadcast, _) = broadcast::channel(1024);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = {
            let state = Arc::clone(&state);
            let broadcast = broadcast.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("API server runtime");
                runtime.block_on(serve(listener, state, broadcast, stopped));
            })
        };
        Self {
            addr,
            state,
            broadcast,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig that points at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        write_kubeconfig(self.addr, path);
    }

    /// Creates or replaces an object given as YAML (a single document).
    pub fn apply(&self, yaml: &str) {
        let object: Value = serde_saphyr::from_str(yaml).expect("an object in YAML");
        let mut state = self.state.lock().unwrap();
        let kind = served_kind(object["kind"].as_str().expect("kind")).kind;
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let key = (kind, namespace.clone(), name);
        state.version += 1;
        let version = state.version;
        let mut stored = object;
        stored["metadata"]["namespace"] = json!(namespace);
        stored["metadata"]["resourceVersion"] = json!(version.to_string());
        stored["metadata"]["uid"] = json!(uid_of(kind, &key.1, &key.2));
        let event = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, stored.clone());
        self.record(&mut state, kind, namespace, event, stored);
    }

    /// The uid the server gives the object `kind` `namespace/name` (a Pod's names its
    /// cgroups).
    pub fn uid(&self, kind: &str, namespace: &str, name: &str) -> String {
        uid_of(served_kind(kind).kind, namespace, name)
    }

    /// Deletes an object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        let kind = served_kind(kind).kind;
        let mut object = state
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} to delete"));
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        self.record(&mut state, kind, namespace.to_owned(), "DELETED", object);
    }

    fn record(
        &self,
        state: &mut State,
        kind: &'static str,
        namespace: String,
        event: &str,
        object: Value,
    ) {
        let change = Change {
            version: state.version,
            kind,
            namespace,
            event: json!({"type": event, "object": object}),
        };
        state.history.push(change.clone());
        let _ = self.broadcast.send(Broadcast::Change(change));
    }

    /// Sends a BOOKMARK at the current version to every watch that asked for them.
    pub fn bookmark(&self) {
        let version = self.state.lock().unwrap().version;
        let _ = self.broadcast.send(Broadcast::Bookmark(version));
    }

    /// Drops every open watch connection mid-stream, as a network cut or an API
    /// server restart does.
    pub fn cut_watches(&self) {
        let _ = self.broadcast.send(Broadcast::Cut);
    }

    /// Compacts the history: a watch resumed from any version seen so far gets 410
    /// Gone and must re-list. Open watches are cut, so they resume at once.
    pub fn expire_history(&self) {
        let mut state = self.state.lock().unwrap();
        // Writes elsewhere moved the version on, past what any client has seen.
        state.version += 1;
        state.compacted = state.version;
        state.history.clear();
        drop(state);
        self.cut_watches();
    }

    /// Makes list and watch of `plural` answer 403, as a missing RBAC rule does.
    pub fn forbid(&self, plural: &str) {
        self.state
            .lock()
            .unwrap()
            .forbidden
            .insert(plural.to_owned());
    }

    /// The events posted so far.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// The requests served so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// Writes a kubeconfig that points at `addr` over plain HTTP, where a test may also
/// have put something other than the stand-in.
pub fn write_kubeconfig(addr: SocketAddr, path: &Path) {
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{addr}\nusers:\n- name: interceptor\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: interceptor\ncurrent-context: stand-in\n"
    );
    std::fs::write(path, config).expect("write the kubeconfig");
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.cut_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    broadcast: broadcast::Sender<Broadcast>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let state = Arc::clone(&state);
        let broadcast = broadcast.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                let broadcast = broadcast.clone();
                async move { Ok::<_, Infallible>(handle(request, &state, &broadcast).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    connections.abort_all();
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    broadcast: &broadcast::Sender<Broadcast>,
) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {path}?{query}"));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // (group, version, rest)
    let (group, version, rest) = match segments.as_slice() {
        ["api"] => {
            return full(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        ["apis"] => return full(StatusCode::OK, &group_list()),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            );
        }
    };
    let (namespace, plural, name) = match rest {
        [] => return resource_list(group, version),
        [plural] => (None, *plural, None),
        ["namespaces", namespace, plural] => (Some(*namespace), *plural, None),
        ["namespaces", namespace, plural, name] => (Some(*namespace), *plural, Some(*name)),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            );
        }
    };
    let Some(served) = SERVED.iter().find(|served| {
        served.group == group && served.plural == plural && served.versions.contains(&version)
    }) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{path} not found"),
        );
    };
    if served.kind == "Event" {
        return post_event(request, method, state).await;
    }
    if name.is_some() || method != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the stand-in only lists and watches {plural}"),
        );
    }
    let verb = if query_param(&query, "watch").is_some_and(|watch| watch == "true" || watch == "1")
    {
        "watch"
    } else {
        "list"
    };
    if state.lock().unwrap().forbidden.contains(plural) {
        let api_group = served.group;
        let scope = namespace.map_or_else(
            || "at the cluster scope".to_owned(),
            |namespace| format!("in the namespace \"{namespace}\""),
        );
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{plural} is forbidden: User \"system:serviceaccount:kube-system:interceptor\" cannot {verb} resource \"{plural}\" in API group \"{api_group}\" {scope}"
            ),
        );
    }
    let api_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    if verb == "list" {
        return list(state, served, &api_version, namespace);
    }
    let from: u64 = query_param(&query, "resourceVersion")
        .and_then(|version| version.parse().ok())
        .unwrap_or(0);
    let bookmarks = query_param(&query, "allowWatchBookmarks") == Some("true");
    watch(
        state,
        broadcast,
        served,
        api_version,
        namespace.map(str::to_owned),
        from,
        bookmarks,
    )
}

fn group_list() -> Value {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for served in SERVED.iter().filter(|served| !served.group.is_empty()) {
        groups.insert(served.group, served.versions.to_vec());
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|version| json!({"groupVersion": format!("{group}/{version}"), "version": version}))
                .collect();
            json!({"name": group, "versions": versions.clone(), "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Response<Body> {
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = SERVED
        .iter()
        .filter(|served| served.group == group && served.versions.contains(&version))
        .map(|served| {
            json!({
                "name": served.plural, "singularName": served.kind.to_lowercase(),
                "namespaced": true, "kind": served.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    if resources.is_empty() {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{group_version} is not served"),
        );
    }
    full(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}

/// An object as served at `api_version`. Built-in kinds' list items carry no type,
/// as kube-apiserver's do.
fn as_served(object: &Value, served: &Served, api_version: &str, in_list: bool) -> Value {
    let mut object = object.clone();
    if served.group.is_empty() && in_list {
        if let Some(map) = object.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
    } else {
        object["apiVersion"] = json!(api_version);
    }
    object
}

fn list(
    state: &Mutex<State>,
    served: &Served,
    api_version: &str,
    namespace: Option<&str>,
) -> Response<Body> {
    let state = state.lock().unwrap();
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((kind, object_namespace, _), _)| {
            *kind == served.kind && namespace.is_none_or(|namespace| namespace == object_namespace)
        })
        .map(|(_, object)| as_served(object, served, api_version, true))
        .collect();
    full(
        StatusCode::OK,
        &json!({
            "apiVersion": api_version, "kind": format!("{}List", served.kind),
            "metadata": {"resourceVersion": state.version.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    state: &Mutex<State>,
    broadcast: &broadcast::Sender<Broadcast>,
    served: &Served,
    api_version: String,
    namespace: Option<String>,
    from: u64,
    bookmarks: bool,
) -> Response<Body> {
    let kind = served.kind;
    let served = served.clone();
    // Subscribed under the lock, so no change falls between the replay and the
    // live stream.
    let guard = state.lock().unwrap();
    let mut live = broadcast.subscribe();
    let line =
        |event: &Value| Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("{event}\n"))));
    let matches = move |change: &Change| {
        change.kind == kind
            && namespace
                .as_ref()
                .is_none_or(|namespace| *namespace == change.namespace)
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    if from != 0 && from < guard.compacted {
        let gone = json!({
            "type": "ERROR",
            "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", guard.compacted),
                "reason": "Expired", "code": 410,
            },
        });
        let _ = sender.try_send(line(&gone));
    } else {
        let replay: Vec<Value> = guard
            .history
            .iter()
            .filter(|change| change.version > from && matches(change))
            .map(|change| served_event(&change.event, &served, &api_version))
            .collect();
        drop(guard);
        tokio::spawn(async move {
            for event in replay {
                if sender.send(line(&event)).await.is_err() {
                    return;
                }
            }
            loop {
                let next = match live.recv().await {
                    Ok(Broadcast::Change(change)) if matches(&change) => {
                        line(&served_event(&change.event, &served, &api_version))
                    }
                    Ok(Broadcast::Bookmark(version)) if bookmarks => line(&json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": served.kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": version.to_string()},
                        },
                    })),
                    Ok(Broadcast::Cut) | Err(_) => {
                        Err(std::io::Error::other("the stand-in cut the watch"))
                    }
                    Ok(_) => continue,
                };
                let cut = next.is_err();
                if sender.send(next).await.is_err() || cut {
                    return;
                }
            }
        });
    }
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("response")
}

fn served_event(event: &Value, served: &Served, api_version: &str) -> Value {
    json!({"type": event["type"], "object": as_served(&event["object"], served, api_version, false)})
}

async fn post_event(
    request: Request<hyper::body::Incoming>,
    method: Method,
    state: &Mutex<State>,
) -> Response<Body> {
    if method != Method::POST && method != Method::PATCH {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "events can only be created or patched here".into(),
        );
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return status(StatusCode::BAD_REQUEST, "BadRequest", error.to_string()),
    };
    let event: Value = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(error) => return status(StatusCode::BAD_REQUEST, "BadRequest", error.to_string()),
    };
    state.lock().unwrap().events.push(event.clone());
    let code = if method == Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    full(code, &event)
}

/// A UUID, as a real API server gives, the same for the same object every time.
fn uid_of(kind: &str, namespace: &str, name: &str) -> String {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let half = |salt: u8| {
        let mut hasher = DefaultHasher::new();
        (salt, kind, namespace, name).hash(&mut hasher);
        hasher.finish()
    };
    let (high, low) = (half(0), half(1));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}
