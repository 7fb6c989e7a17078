//! The Kubernetes config source (`run --kubernetes`): lists and watches the Istio
//! networking kinds and pods through the API server, validates each object on its own
//! with the file loader's rules, and hands the accepted ones to the reload path as a
//! [`ConfigSet`], so the registry is built the same way as from files.
//!
//! - Each kind is read at the version the cluster serves, preferring v1, then v1beta1,
//!   then v1alpha3 ([`discovery`]).
//! - An invalid object is skipped, logged once, counted and reported as an Event on
//!   it; its previous valid version stays ([`store`]).
//! - A broken watch (410 Gone, a cut connection, an API server restart) re-lists; the
//!   re-list replaces the watch's objects only once complete, and applies nothing
//!   when nothing changed, so the maps never flap.

#[cfg(test)]
mod crd;
mod discovery;
mod events;
mod metrics;
pub mod store;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use futures_util::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use metrics::SourceMetrics;
use store::{Kind, Outcome, Store};

use crate::{config::ConfigSet, report::Chain};

/// How often a watch that failed checks whether its API server answers again.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long start-up waits for the discovery documents. The client has no read
/// timeout of its own (watches stay open for minutes), so an API server that accepts
/// connections and never answers would otherwise hold start-up forever.
const DISCOVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What `run --kubernetes` was given.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A kubeconfig file; without it, `KUBECONFIG`, `~/.kube/config`, then the
    /// in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces to read; empty: all.
    pub namespaces: Vec<String>,
    /// The namespace of clients outside every pod, for `exportTo`.
    pub host_namespace: String,
    /// The name events report as their source instance (the node's).
    pub instance: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read the kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot find a Kubernetes client configuration (in-cluster or kubeconfig)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error(
        "cannot discover the served networking.istio.io versions from the Kubernetes API server at {server}"
    )]
    Discovery {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the Kubernetes API server at {server} did not answer discovery within {} s",
        DISCOVERY_TIMEOUT.as_secs()
    )]
    DiscoveryTimeout { server: String },
}

/// The running source: its objects, shared with the reloader.
pub struct KubeSource {
    store: Arc<Mutex<Store>>,
    listed: watch::Receiver<bool>,
}

impl KubeSource {
    /// Connects, discovers the served versions and starts a watch per kind (and per
    /// namespace, if given). Each applied change sends on `changed`.
    pub async fn start(
        options: Options,
        metrics: Arc<crate::metrics::Metrics>,
        changed: mpsc::Sender<()>,
    ) -> Result<Self, KubeError> {
        let (client, server) = client(&options).await?;
        // Start-up fails here rather than waiting: the kubelet restarts a pod that
        // exits, with back-off and a reason anyone can see, while a daemon that hung
        // unready would say nothing. Once started, an unreachable API server only
        // stops updates (the watches retry).
        let resources = match tokio::time::timeout(DISCOVERY_TIMEOUT, discovery::resources(&client))
            .await
        {
            Ok(resources) => resources.map_err(|source| KubeError::Discovery { server, source })?,
            Err(_) => return Err(KubeError::DiscoveryTimeout { server }),
        };
        let mut watches = Vec::new();
        for (kind, resource) in resources {
            if options.namespaces.is_empty() {
                watches.push((kind, resource.clone(), None));
            } else {
                for namespace in &options.namespaces {
                    watches.push((kind, resource.clone(), Some(namespace.clone())));
                }
            }
        }
        let store = Arc::new(Mutex::new(Store::new(
            watches.iter().map(|(kind, ..)| *kind),
        )));
        let (listed_tx, listed) = watch::channel(false);
        let listed_tx = Arc::new(listed_tx);
        let up = Arc::new(Mutex::new(vec![false; watches.len()]));
        let events = events::Reporter::new(client.clone(), &options.instance);
        for (index, (kind, resource, namespace)) in watches.into_iter().enumerate() {
            let api: Api<DynamicObject> = match &namespace {
                Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            info!(
                kind = kind.name(),
                version = resource.api_version,
                namespace = namespace.as_deref().unwrap_or("*"),
                "watching"
            );
            tokio::spawn(
                Watcher {
                    index,
                    kind,
                    resource,
                    store: Arc::clone(&store),
                    listed: Arc::clone(&listed_tx),
                    up: Arc::clone(&up),
                    metrics: Arc::clone(&metrics),
                    changed: changed.clone(),
                    events: events.clone(),
                }
                .run(api),
            );
        }
        Ok(Self { store, listed })
    }

    /// Waits until every watch has listed its kind once and those objects are in
    /// the store.
    pub async fn wait_listed(&self) {
        let mut listed = self.listed.clone();
        // The sender lives as long as the watch tasks, which never end.
        let _ = listed.wait_for(|listed| *listed).await;
    }

    /// The accepted objects now.
    pub fn config_set(&self) -> ConfigSet {
        self.store.lock().expect("store lock").config_set()
    }

    /// The namespace of every pod, by uid, to tell clients' namespaces by their cgroups.
    pub fn pod_namespaces(&self) -> std::collections::HashMap<String, String> {
        self.store.lock().expect("store lock").pod_namespaces()
    }
}

/// The client, and the API server's URL for messages.
async fn client(options: &Options) -> Result<(Client, String), KubeError> {
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(KubeError::Client)?;
    Ok((client, server))
}

/// One kind's list and watch.
struct Watcher {
    index: usize,
    kind: Kind,
    resource: ApiResource,
    store: Arc<Mutex<Store>>,
    listed: Arc<watch::Sender<bool>>,
    up: Arc<Mutex<Vec<bool>>>,
    metrics: Arc<crate::metrics::Metrics>,
    changed: mpsc::Sender<()>,
    events: events::Reporter,
}

impl Watcher {
    async fn run(self, api: Api<DynamicObject>) {
        // The watcher re-lists after 410 Gone and re-watches after a cut; the
        // backoff spaces out the retries while the API server is away.
        let mut stream = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        // A watch resumed after a cut yields nothing until something changes, so
        // once one failed, a small list tells when the API server answers again.
        let mut down = false;
        loop {
            let probe = async {
                if !down {
                    return std::future::pending().await;
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
                api.list(&ListParams::default().limit(1)).await.is_ok()
            };
            tokio::select! {
                event = stream.next() => match event {
                    None => break,
                    Some(Ok(event)) => {
                        down = false;
                        self.set_up(true);
                        self.handle(event);
                    }
                    Some(Err(error)) => {
                        down = true;
                        self.set_up(false);
                        warn!(
                            kind = self.kind.name(),
                            "Kubernetes watch failed, retrying; the last applied config keeps serving: {}",
                            Chain(&error)
                        );
                    }
                },
                reachable = probe => if reachable {
                    down = false;
                    self.set_up(true);
                },
            }
        }
    }

    fn set_up(&self, up: bool) {
        let mut all = self.up.lock().expect("up lock");
        all[self.index] = up;
        self.metrics.config_source.set_up(all.iter().all(|up| *up));
    }

    fn handle(&self, event: watcher::Event<DynamicObject>) {
        let value = |object: &DynamicObject| serde_json::to_value(object).unwrap_or_default();
        let mut store = self.store.lock().expect("store lock");
        let outcome = match &event {
            watcher::Event::Init => {
                store.init(self.index);
                Outcome::Unchanged
            }
            watcher::Event::InitApply(object) | watcher::Event::Apply(object) => {
                store.apply(self.index, &value(object))
            }
            watcher::Event::Delete(object) => store.delete(self.index, &value(object)),
            watcher::Event::InitDone => {
                let outcome = store.init_done(self.index);
                if store.all_listed() {
                    self.listed.send_replace(true);
                }
                outcome
            }
        };
        drop(store);
        match outcome {
            Outcome::Changed => {
                // A full channel already holds a pending change: the reload reads the
                // store when it runs, so nothing is lost.
                let _ = self.changed.try_send(());
            }
            Outcome::Rejected(findings) => {
                let (watcher::Event::InitApply(object) | watcher::Event::Apply(object)) = &event
                else {
                    return;
                };
                self.metrics.config_source.rejected(self.kind);
                for finding in &findings {
                    warn!(
                        kind = self.kind.name(),
                        "object rejected, its previous valid version stays: {finding}"
                    );
                }
                self.events.rejected(&self.resource, object, &findings);
            }
            Outcome::Unchanged | Outcome::RejectedAgain => {}
        }
    }
}

#[cfg(test)]
mod tests;
