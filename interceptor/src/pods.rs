//! Which namespace each client cgroup is in: the kubelet names a pod's cgroup after the
//! pod's uid (`pod<uid>` with the cgroupfs driver, `…-pod<uid with _>.slice` with the
//! systemd one), and its containers' cgroups sit below it. The kernel reads a
//! connecting task's cgroup id; this finds the ids of every pod's cgroups, so
//! `exportTo` can be applied per namespace.

use std::{
    collections::HashMap,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tracing::warn;

use crate::{audience::namespace_id, config::kubernetes::KubeSource, kernel::Kernel};

/// How often the cgroup tree is walked again: a container's cgroup appears when it
/// starts, which no watch event announces.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Deeper than any kubelet layout (`kubepods.slice/kubepods-burstable.slice/…pod….slice/
/// cri-containerd-….scope` and a few levels an application makes below), so a loop of
/// bind mounts cannot hold the walk.
const MAX_DEPTH: usize = 16;

/// The uid of the pod whose cgroup is named `name`, as the API server spells it.
pub(crate) fn pod_uid(name: &str) -> Option<String> {
    const UID_LEN: usize = 36;
    let mut rest = name;
    while let Some(at) = rest.find("pod") {
        let candidate = rest[at + 3..].get(..UID_LEN);
        if let Some(candidate) = candidate
            && is_uid(candidate)
        {
            return Some(candidate.replace('_', "-"));
        }
        rest = &rest[at + 3..];
    }
    None
}

/// 8-4-4-4-12 hex digits, separated by `-` or (systemd) `_`.
fn is_uid(text: &str) -> bool {
    text.char_indices().all(|(index, char)| match index {
        8 | 13 | 18 | 23 => char == '-' || char == '_',
        _ => char.is_ascii_hexdigit(),
    })
}

/// The namespace id of every cgroup under `root` that belongs to a pod in `pods`
/// (uid → namespace): the pod's own cgroup and everything below it, by cgroup id (the
/// directory's inode number on cgroup2).
pub(crate) fn client_namespaces(
    root: &Path,
    pods: &HashMap<String, String>,
) -> io::Result<HashMap<u64, u32>> {
    let mut found = HashMap::new();
    let mut pending: Vec<(PathBuf, Option<u32>, usize)> = vec![(root.to_owned(), None, 0)];
    while let Some((dir, namespace, depth)) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed since its parent was read: a container that ended.
            Err(error) if error.kind() == io::ErrorKind::NotFound && depth > 0 => continue,
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if !kind.is_dir() {
                continue;
            }
            let name = entry.file_name();
            let namespace = namespace.or_else(|| {
                let uid = pod_uid(name.to_str()?)?;
                pods.get(&uid).map(|namespace| namespace_id(namespace))
            });
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if let Some(namespace) = namespace {
                found.insert(metadata.ino(), namespace);
            }
            if depth + 1 < MAX_DEPTH {
                pending.push((entry.path(), namespace, depth + 1));
            }
        }
    }
    Ok(found)
}

/// The namespace of the pod whose cgroup `cgroup` is or is below, if it is a pod's.
pub(crate) fn namespace_of(cgroup: &Path, pods: &HashMap<String, String>) -> Option<String> {
    cgroup
        .ancestors()
        .filter_map(|dir| pod_uid(dir.file_name()?.to_str()?))
        .find_map(|uid| pods.get(&uid).cloned())
}

/// Keeps the kernel's client namespaces in step with the pods and their cgroups under
/// `root`, until the daemon ends.
pub(crate) async fn follow(kernel: Arc<Kernel>, source: Arc<KubeSource>, root: PathBuf) {
    let mut interval = tokio::time::interval(RESCAN_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        interval.tick().await;
        let pods = source.pod_namespaces();
        let walk_root = root.clone();
        let found = tokio::task::spawn_blocking(move || client_namespaces(&walk_root, &pods)).await;
        let synced = match found {
            Ok(Ok(found)) => kernel
                .sync_client_namespaces(&found)
                .map_err(|error| crate::report::Chain(&error).to_string()),
            Ok(Err(error)) => Err(format!("cannot read the cgroup tree: {error}")),
            Err(error) => Err(error.to_string()),
        };
        match synced {
            Ok(()) => failing = false,
            // Once per spell of failures: it is retried every second.
            Err(error) if !failing => {
                failing = true;
                warn!(
                    root = %root.display(),
                    "cannot update the namespaces of pods' cgroups; exportTo keeps the last known: {error}"
                );
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_uid_is_read_from_either_cgroup_driver_s_names() {
        let uid = "0c6a1f0e-3b8e-4c39-9a57-2d5f2f3b1e10";
        assert_eq!(pod_uid(&format!("pod{uid}")).as_deref(), Some(uid));
        assert_eq!(
            pod_uid(&format!(
                "kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ))
            .as_deref(),
            Some(uid)
        );
        for name in [
            "kubepods",
            "kubepods-burstable.slice",
            "pod",
            "podcast",
            "cri-containerd-0c6a1f0e3b8e.scope",
            "pod0c6a1f0e-3b8e-4c39-9a57-2d5f2f3b1e1",
        ] {
            assert_eq!(pod_uid(name), None, "{name}");
        }
    }

    #[test]
    fn a_pod_s_cgroup_and_everything_below_it_are_in_its_namespace() {
        let root = std::env::temp_dir().join(format!("interceptor-pods-{}", std::process::id()));
        let shop = "0c6a1f0e-3b8e-4c39-9a57-2d5f2f3b1e10";
        let blog = "7d1e2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b";
        let unknown = "11111111-2222-4333-8444-555555555555";
        let dirs = [
            format!("kubepods/pod{shop}/ctr/app"),
            format!(
                "kubepods.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
                blog.replace('-', "_")
            ),
            format!("kubepods/pod{unknown}/ctr"),
            "system.slice/sshd.service".to_owned(),
        ];
        for dir in &dirs {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let pods = HashMap::from([
            (shop.to_owned(), "shop".to_owned()),
            (blog.to_owned(), "blog".to_owned()),
        ]);
        let found = client_namespaces(&root, &pods).unwrap();
        let id = |dir: &str| std::fs::metadata(root.join(dir)).unwrap().ino();
        let namespace = |dir: &str| found.get(&id(dir)).copied();
        assert_eq!(
            namespace(&format!("kubepods/pod{shop}")),
            Some(namespace_id("shop"))
        );
        assert_eq!(namespace(&dirs[0]), Some(namespace_id("shop")));
        assert_eq!(namespace(&dirs[1]), Some(namespace_id("blog")));
        assert_eq!(namespace(&dirs[2]), None, "a pod the cluster did not list");
        assert_eq!(namespace("system.slice/sshd.service"), None);
        assert_eq!(namespace("kubepods"), None);
        assert_eq!(found.len(), 5, "{found:?}");
        assert_eq!(
            namespace_of(&root.join(&dirs[0]), &pods).as_deref(),
            Some("shop")
        );
        assert_eq!(namespace_of(&root.join(&dirs[2]), &pods), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
