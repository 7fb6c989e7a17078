//! Live reload: on SIGHUP or a change to the config files, load and check the whole
//! config again and, only if all of it is valid, apply it without touching a
//! connection.
//!
//! Apply order: the kernel maps first, then the registry snapshot.
//! - The proxy routes every redirect with whichever snapshot it loads at accept, and a
//!   destination no snapshot routes goes to its original address (ALLOW_ANY). So in
//!   either order the short window between the two steps only ever costs a connection
//!   to a brand-new destination its interception (it reaches its original address,
//!   as it did before the reload); nothing the old and new config both intercept is
//!   affected, because [`Kernel::sync`] never removes a key both want.
//! - What decides it is failure: a map update can fail half way (a full map, a kernel
//!   error). Syncing first means the registry is swapped only once the maps hold the
//!   new set, so a failed reload never leaves the new routing live over old maps; the
//!   maps are synced back to the running snapshot and the reload counts as failed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher as _};
use tokio::{signal::unix::Signal, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::kubernetes::KubeSource,
    kernel::{Kernel, KernelError},
    load::{self, LoadError},
    metrics::{Metrics, ReloadResult},
    proxy::LogLimit,
    registry::{Registry, StateError, StateFile},
    report::Chain,
    systemd,
};

/// Editors and config management write in bursts (truncate, write, rename, chmod):
/// reload once the files have been quiet this long.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// A writer that never pauses still gets its changes applied this often.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// The first retry of a reload that met a shortage of descriptors or memory, and the
/// longest wait between retries as it persists.
const SHORTAGE_RETRY: Duration = Duration::from_secs(1);
const MAX_SHORTAGE_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the new configuration is invalid; the running one stays")]
    Invalid(#[source] LoadError),
    #[error(
        "the configuration could not be read for want of descriptors or memory; the running one stays until a later try reads it"
    )]
    Shortage(#[source] LoadError),
    #[error("cannot update the BPF maps; the running configuration stays")]
    Kernel(#[source] KernelError),
    #[error("the new VIP allocations cannot be kept; the running configuration stays")]
    State(#[source] StateError),
    #[error("the reload task stopped")]
    Task(#[source] tokio::task::JoinError),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// What a reload needs, shared with the rest of the daemon.
pub struct Reloader {
    pub config_paths: Vec<PathBuf>,
    pub registry: Arc<ArcSwap<Registry>>,
    pub kernel: Arc<Kernel>,
    pub metrics: Arc<Metrics>,
    /// Where VIP allocations are kept across restarts.
    pub state: StateFile,
    /// The Kubernetes objects served beside the files', with `--kubernetes`.
    pub kubernetes: Option<Arc<KubeSource>>,
    /// One apply at a time: a reload and a DNS lookup's allocation each build on
    /// the running allocations, and the later store would drop the other's.
    pub applying: std::sync::Mutex<()>,
}

impl Reloader {
    /// Loads, checks and applies the configuration, and counts the result. Blocking
    /// (file reads, YAML, map syscalls): run it off the runtime threads.
    pub fn reload(&self, trigger: &str) -> Result<(), ReloadError> {
        self.reload_asking(trigger, &[])
    }

    /// [`Reloader::reload`], also asking for VIPs for `name`, looked up under a
    /// DYNAMIC_DNS wildcard host (it gets them if a wildcard still covers it).
    pub fn allocate(&self, names: &[String]) -> Result<(), ReloadError> {
        self.reload_asking("DNS lookup under a DYNAMIC_DNS wildcard", names)
    }

    fn reload_asking(&self, trigger: &str, names: &[String]) -> Result<(), ReloadError> {
        let started = Instant::now();
        let result = {
            let _applying = self.applying.lock().unwrap_or_else(|e| e.into_inner());
            self.apply(names)
        };
        match &result {
            Ok(services) => {
                self.metrics.reloaded(ReloadResult::ok);
                info!(
                    trigger,
                    services,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "configuration reloaded"
                );
            }
            Err(error @ ReloadError::Shortage(_)) => {
                self.metrics.reloaded(ReloadResult::failed);
                warn!(trigger, "reload failed: {}", Chain(error));
            }
            Err(error) => {
                self.metrics.reloaded(ReloadResult::failed);
                error!(trigger, "reload failed: {}", Chain(error));
            }
        }
        result.map(|_| ())
    }

    fn apply(&self, names: &[String]) -> Result<usize, ReloadError> {
        let running = self.registry.load_full();
        let objects = self
            .kubernetes
            .as_ref()
            .map(|source| source.config_set())
            .unwrap_or_default();
        let mut previous = running.allocations().clone();
        for name in names {
            previous.request(name);
        }
        let new = load::load_and_log(&self.config_paths, objects, &previous).map_err(|error| {
            if error.is_shortage() {
                ReloadError::Shortage(error)
            } else {
                ReloadError::Invalid(error)
            }
        })?;
        // Kept before anything is applied: addresses handed out must survive a restart.
        if new.allocations() != running.allocations() {
            self.state
                .write(new.allocations())
                .map_err(ReloadError::State)?;
        }
        if let Err(error) = self.kernel.sync(&new) {
            if let Err(rollback) = self.kernel.sync(&running) {
                // The maps now hold a mix, and routing falls back to ALLOW_ANY for
                // what the running snapshot lacks; the next reload converges them.
                error!(rollback = %Chain(&rollback), "cannot restore the BPF maps of the running configuration");
            }
            return Err(ReloadError::Kernel(error));
        }
        let services = new.services().len();
        self.metrics
            .vips_allocated
            .set(new.allocations().hosts.len() as i64);
        // Connections load the snapshot once, at accept: each sees the old config or
        // the new one, never a mix, and open ones keep what they loaded.
        self.registry.store(Arc::new(new));
        Ok(services)
    }
}

/// Changes under the config paths, watched from before the first load: a change
/// between that load and the reload loop's start is then still seen.
pub struct ConfigWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    changed: mpsc::Receiver<()>,
    /// Changes the Kubernetes source applied to its store.
    kubernetes: Option<mpsc::Receiver<()>>,
}

impl ConfigWatch {
    /// Starts watching. If the paths cannot be watched, SIGHUP still works.
    pub fn start(paths: &[PathBuf]) -> Self {
        let (changed_tx, changed) = mpsc::channel::<()>(1);
        let watcher = match watch(paths, changed_tx) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                warn!("{}; config changes need a SIGHUP to apply", Chain(&error));
                None
            }
        };
        Self {
            _watcher: watcher,
            changed,
            kubernetes: None,
        }
    }

    /// Also reloads on each change the Kubernetes source sends; the reloader reads
    /// its store then, so changes sent while one runs are applied together.
    pub fn with_kubernetes(self, changed: mpsc::Receiver<()>) -> Self {
        Self {
            kubernetes: Some(changed),
            ..self
        }
    }
}

/// Reloads on SIGHUP and on changes under the config paths until `shutdown`.
pub async fn run(
    reloader: Arc<Reloader>,
    watch: ConfigWatch,
    mut hangup: Signal,
    shutdown: CancellationToken,
) {
    let ConfigWatch {
        _watcher,
        mut changed,
        mut kubernetes,
    } = watch;
    // After a reload that could not read the files for want of descriptors or
    // memory, the same change is tried again, later each time it fails again.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let trigger = tokio::select! {
            () = shutdown.cancelled() => break,
            () = async {
                match retry {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => "retry after a shortage",
            _ = hangup.recv() => "SIGHUP",
            Some(()) = async {
                match kubernetes.as_mut() {
                    Some(changes) => changes.recv().await,
                    None => std::future::pending().await,
                }
            } => "kubernetes",
            Some(()) = changed.recv() => {
                debounce(&mut changed).await;
                "file change"
            }
        };
        systemd::reloading();
        let task = Arc::clone(&reloader);
        match tokio::task::spawn_blocking(move || task.reload(trigger)).await {
            Ok(Err(ReloadError::Shortage(_))) => {
                let delay = retry.map_or(SHORTAGE_RETRY, |(_, last)| {
                    (last * 2).min(MAX_SHORTAGE_RETRY)
                });
                retry = Some((tokio::time::Instant::now() + delay, delay));
            }
            Ok(_) => retry = None,
            Err(join) => {
                // The swap is a reload's last step: one that did not finish applied nothing.
                reloader.metrics.reloaded(ReloadResult::failed);
                error!("{}", Chain(&ReloadError::Task(join)));
            }
        }
        systemd::ready();
    }
}

/// A name the DNS server wants VIPs for, and where to say it was tried.
pub type AllocationRequest = (String, tokio::sync::oneshot::Sender<()>);

/// Serves the DNS server's requests for VIPs until the DNS server goes. The requests
/// queued meanwhile share one reload, so a burst of new names costs one reload, not
/// one each; at most `limit` names ever hold VIPs.
pub async fn allocate(
    reloader: Arc<Reloader>,
    mut requests: mpsc::Receiver<AllocationRequest>,
    limit: usize,
) {
    static OVER_LIMIT_LOG: LogLimit = LogLimit::new();
    while let Some(first) = requests.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = requests.try_recv() {
            batch.push(more);
        }
        let registry = reloader.registry.load_full();
        let admitted = admit_names(
            batch.iter().map(|(name, _)| name.as_str()),
            |name| registry.allocated(name).next().is_some(),
            registry.dynamic_children().len(),
            limit,
        );
        if let (Some(name), Some(suppressed)) =
            (admitted.over_limit.first(), OVER_LIMIT_LOG.admit())
        {
            warn!(
                name = name.as_str(),
                limit,
                suppressed,
                "no VIP for a name under a DYNAMIC_DNS wildcard: --dns-wildcard-names is reached; relaying its lookup upstream"
            );
        }
        if !admitted.allocate.is_empty() {
            let task = Arc::clone(&reloader);
            let names = admitted.allocate;
            if let Err(join) = tokio::task::spawn_blocking(move || task.allocate(&names)).await {
                reloader.metrics.reloaded(ReloadResult::failed);
                error!("{}", Chain(&ReloadError::Task(join)));
            }
        }
        for (_, done) in batch {
            let _ = done.send(());
        }
    }
}

/// Which of the names asked for get VIPs now.
#[derive(Debug, Default, PartialEq, Eq)]
struct Admitted {
    /// New names, each once, in the order asked, while room is left.
    allocate: Vec<String>,
    /// New names past `limit`.
    over_limit: Vec<String>,
}

/// Splits `asked` into names to allocate and names over the limit; names that hold
/// VIPs already (asked again while an earlier request was served) are neither.
fn admit_names<'a>(
    asked: impl Iterator<Item = &'a str>,
    has_vips: impl Fn(&str) -> bool,
    children: usize,
    limit: usize,
) -> Admitted {
    let mut admitted = Admitted::default();
    let mut room = limit.saturating_sub(children);
    for name in asked {
        if has_vips(name)
            || admitted.allocate.iter().any(|n| n == name)
            || admitted.over_limit.iter().any(|n| n == name)
        {
            continue;
        }
        if room > 0 {
            room -= 1;
            admitted.allocate.push(name.to_owned());
        } else {
            admitted.over_limit.push(name.to_owned());
        }
    }
    admitted
}

/// Starts watching the config paths; each relevant event sends on `changed`.
fn watch(
    paths: &[PathBuf],
    changed: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, WatchError> {
    let watched = watch_targets(paths);
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if is_relevant(&event, &watched) => {
                // A full channel already holds a pending change: nothing is lost.
                let _ = changed.try_send(());
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "config watch error"),
        })
        .map_err(|source| WatchError::Watch {
            path: PathBuf::from("(inotify)"),
            source,
        })?;
    for directory in watch_directories(paths) {
        watcher
            .watch(&directory, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Watch {
                path: directory.clone(),
                source,
            })?;
    }
    Ok(watcher)
}

/// Waits until no change has arrived for [`DEBOUNCE`], or [`MAX_DEBOUNCE`] passed.
async fn debounce(changed: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
    loop {
        let quiet_until = (tokio::time::Instant::now() + DEBOUNCE).min(deadline);
        match tokio::time::timeout_at(quiet_until, changed.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// What a config path's events look like: a directory's own entries, or one file.
#[derive(Debug)]
enum WatchTarget {
    Directory(PathBuf),
    File(WatchedFile),
}

/// A config file, and what it resolved to when last looked at. A file can change
/// without an event on its own path: a Kubernetes ConfigMap's `serviceentries.yaml`
/// is a symlink through `..data`, and an update renames a new `..data` over the old
/// one, so the file now resolves to another one.
#[derive(Debug)]
struct WatchedFile {
    path: PathBuf,
    /// The directory of the file a symlink led to at start, when it is another one:
    /// edits there change the config too. (A symlink pointed elsewhere later is
    /// followed for its new content, but not watched there.)
    target_directory: Option<PathBuf>,
    resolved: std::sync::Mutex<Option<Resolved>>,
}

/// Where a path leads, and that file's identity and last change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    canonical: PathBuf,
    device: u64,
    inode: u64,
    modified_ns: i64,
    /// Also changes on a rewrite that keeps the length within one mtime tick.
    changed_ns: i64,
    len: u64,
}

impl WatchedFile {
    fn new(path: PathBuf) -> Self {
        let resolved = Self::resolve(&path);
        let target_directory = resolved
            .as_ref()
            .and_then(|resolved| resolved.canonical.parent())
            .filter(|directory| Some(*directory) != path.parent())
            .map(Path::to_path_buf);
        Self {
            path,
            target_directory,
            resolved: std::sync::Mutex::new(resolved),
        }
    }

    fn resolve(path: &Path) -> Option<Resolved> {
        use std::os::unix::fs::MetadataExt as _;
        let canonical = std::fs::canonicalize(path).ok()?;
        let metadata = std::fs::metadata(&canonical).ok()?;
        Some(Resolved {
            canonical,
            device: metadata.dev(),
            inode: metadata.ino(),
            modified_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
            changed_ns: metadata.ctime() * 1_000_000_000 + metadata.ctime_nsec(),
            len: metadata.size(),
        })
    }

    /// An event on the file's own path counts; one on another entry of its directory
    /// counts if the file now resolves to something else.
    fn is_changed_by(&self, path: &Path) -> bool {
        if path.parent() != self.path.parent() && path.parent() != self.target_directory.as_deref()
        {
            return false;
        }
        let now = Self::resolve(&self.path);
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        let changed = *resolved != now;
        *resolved = now;
        path == self.path || changed
    }
}

fn watch_targets(paths: &[PathBuf]) -> Vec<WatchTarget> {
    paths
        .iter()
        .map(|path| {
            let absolute = absolute(path);
            if absolute.is_dir() {
                WatchTarget::Directory(absolute)
            } else {
                WatchTarget::File(WatchedFile::new(absolute))
            }
        })
        .collect()
}

/// A directory is watched itself; a file through its directory, because editors and
/// config management replace files by renaming over them, which a watch on the old
/// inode would never see.
fn watch_directories(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut directories: Vec<PathBuf> = watch_targets(paths)
        .into_iter()
        .flat_map(|target| match target {
            WatchTarget::Directory(directory) => vec![directory],
            WatchTarget::File(file) => {
                let directory = file
                    .path
                    .parent()
                    .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
                match file.target_directory {
                    Some(target) => vec![directory, target],
                    None => vec![directory],
                }
            }
        })
        .collect();
    directories.sort();
    directories.dedup();
    directories
}

fn is_relevant(event: &notify::Event, watched: &[WatchTarget]) -> bool {
    // The kernel's event queue overflowed: anything may have changed.
    if event.need_rescan() {
        return true;
    }
    if event.kind.is_access() {
        return false;
    }
    // Every file target looks at every event, so each keeps what it resolves to now.
    let mut relevant = false;
    for path in &event.paths {
        for target in watched {
            relevant |= match target {
                // Any entry: a new file, a removed one, or a Kubernetes ConfigMap's
                // `..data` symlink swap, which changes every file at once.
                WatchTarget::Directory(directory) => path.parent() == Some(directory.as_path()),
                WatchTarget::File(file) => file.is_changed_by(path),
            };
        }
    }
    relevant
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use notify::{
        Event, EventKind,
        event::{AccessKind, CreateKind, ModifyKind},
    };

    use super::*;

    #[test]
    fn a_burst_of_names_shares_one_allocation_within_the_limit() {
        let held = ["known.wild.example"];
        let admitted = admit_names(
            [
                "a.wild.example",
                "known.wild.example",
                "b.wild.example",
                "a.wild.example",
                "c.wild.example",
                "d.wild.example",
            ]
            .into_iter(),
            |name| held.contains(&name),
            1,
            3,
        );
        assert_eq!(
            admitted,
            Admitted {
                allocate: vec!["a.wild.example".into(), "b.wild.example".into()],
                over_limit: vec!["c.wild.example".into(), "d.wild.example".into()],
            }
        );
        let full = admit_names(["e.wild.example"].into_iter(), |_| false, 5, 3);
        assert!(full.allocate.is_empty(), "{full:?}");
        assert_eq!(full.over_limit, ["e.wild.example"]);
    }

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn a_file_is_watched_through_its_directory_and_only_its_events_count() {
        let watched = vec![WatchTarget::File(WatchedFile::new(PathBuf::from(
            "/etc/interceptor.yaml",
        )))];
        assert_eq!(
            watch_directories(&[PathBuf::from("/etc/interceptor.yaml")]),
            [PathBuf::from("/etc")]
        );
        assert!(is_relevant(
            &event(EventKind::Modify(ModifyKind::Any), "/etc/interceptor.yaml"),
            &watched
        ));
        assert!(!is_relevant(
            &event(EventKind::Modify(ModifyKind::Any), "/etc/passwd"),
            &watched
        ));
    }

    #[test]
    fn a_file_in_a_configmap_volume_counts_the_data_symlink_swap() {
        use std::os::unix::fs::symlink;
        let dir =
            std::env::temp_dir().join(format!("interceptor-configmap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/se.yaml"), "old").unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/se.yaml", dir.join("se.yaml")).unwrap();
        let watched = vec![WatchTarget::File(WatchedFile::new(dir.join("se.yaml")))];
        let created = |name: &str| {
            event(
                EventKind::Create(CreateKind::Any),
                dir.join(name).to_str().unwrap(),
            )
        };

        // Something else appearing next to the file changes nothing it reads.
        std::fs::write(dir.join("notes.txt"), "").unwrap();
        assert!(!is_relevant(&created("notes.txt"), &watched));

        // The kubelet's update: a new payload directory, then `..data` renamed over.
        std::fs::create_dir(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/se.yaml"), "new").unwrap();
        assert!(!is_relevant(&created("..v2"), &watched));
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert!(is_relevant(&created("..data"), &watched));
        // Seen once: the old payload's removal is not another change.
        std::fs::remove_dir_all(dir.join("..v1")).unwrap();
        assert!(!is_relevant(&created("..v1"), &watched));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_to_a_file_elsewhere_is_watched_where_it_leads() {
        let root = std::env::temp_dir().join(format!("interceptor-symlink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("srv")).unwrap();
        std::fs::write(root.join("srv/real.yaml"), "old").unwrap();
        std::os::unix::fs::symlink("../srv/real.yaml", root.join("etc/se.yaml")).unwrap();
        let config = root.join("etc/se.yaml");
        assert_eq!(
            watch_directories(std::slice::from_ref(&config)),
            [root.join("etc"), root.join("srv")]
        );
        let watched = vec![WatchTarget::File(WatchedFile::new(config))];
        let modified =
            |path: &Path| event(EventKind::Modify(ModifyKind::Any), path.to_str().unwrap());

        std::fs::write(root.join("srv/real.yaml"), "new content").unwrap();
        assert!(is_relevant(
            &modified(&root.join("srv/real.yaml")),
            &watched
        ));
        std::fs::write(root.join("srv/other.yaml"), "").unwrap();
        assert!(!is_relevant(
            &modified(&root.join("srv/other.yaml")),
            &watched
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_counts_any_entry_but_not_reads() {
        let watched = vec![WatchTarget::Directory(PathBuf::from("/etc/interceptor"))];
        assert!(is_relevant(
            &event(
                EventKind::Create(CreateKind::File),
                "/etc/interceptor/..data"
            ),
            &watched
        ));
        assert!(!is_relevant(
            &event(
                EventKind::Access(AccessKind::Any),
                "/etc/interceptor/a.yaml"
            ),
            &watched
        ));
        assert!(!is_relevant(
            &event(
                EventKind::Modify(ModifyKind::Any),
                "/etc/interceptor/sub/a.yaml"
            ),
            &watched
        ));
    }

    #[tokio::test]
    async fn a_burst_of_changes_is_one_reload() {
        let (sender, mut receiver) = mpsc::channel(1);
        let writer = tokio::spawn(async move {
            for _ in 0..5 {
                let _ = sender.try_send(());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The watcher's sender lives as long as the daemon.
            sender
        });
        let started = tokio::time::Instant::now();
        receiver.recv().await;
        debounce(&mut receiver).await;
        // The last change came at ~200 ms; quiet for 200 ms after it.
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert!(started.elapsed() < MAX_DEBOUNCE);
        writer.await.unwrap();
    }
}
