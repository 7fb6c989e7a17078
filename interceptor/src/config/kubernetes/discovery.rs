//! Which version of each kind to read: the cluster's discovery documents, and a
//! fixed preference among the versions it serves.

use kube::{
    Client,
    api::{ApiResource, GroupVersionKind},
};
use tracing::warn;

use super::store::Kind;

const GROUP: &str = "networking.istio.io";
/// The versions read, most preferred first: v1 is what Istio stores since 1.22.
pub(super) const PREFERENCE: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// A version the group serves, and the kinds (with their plural resource names) it
/// serves at that version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub version: String,
    /// `(kind, plural)`.
    pub kinds: Vec<(String, String)>,
}

/// The version to read `kind` at, and its plural: the most preferred served one.
pub fn choose(served: &[Served], kind: &str) -> Option<(String, String)> {
    PREFERENCE.iter().find_map(|preferred| {
        let version = served.iter().find(|served| served.version == *preferred)?;
        let (_, plural) = version.kinds.iter().find(|(name, _)| name == kind)?;
        Some((version.version.clone(), plural.clone()))
    })
}

/// The resource to watch for each kind the cluster serves. A kind it does not serve
/// (its CRD is not installed) is left out with a warning: it has no objects.
pub async fn resources(client: &Client) -> Result<Vec<(Kind, ApiResource)>, kube::Error> {
    let groups = client.list_api_groups().await?;
    let mut served = Vec::new();
    if let Some(group) = groups.groups.iter().find(|group| group.name == GROUP) {
        for version in &group.versions {
            if !PREFERENCE.contains(&version.version.as_str()) {
                continue;
            }
            let list = client
                .list_api_group_resources(&version.group_version)
                .await?;
            served.push(Served {
                version: version.version.clone(),
                kinds: list
                    .resources
                    .into_iter()
                    // Subresources (`serviceentries/status`) are no kinds to watch.
                    .filter(|resource| !resource.name.contains('/'))
                    .map(|resource| (resource.kind, resource.name))
                    .collect(),
            });
        }
    }
    let mut resources = Vec::new();
    for kind in Kind::ISTIO {
        match choose(&served, kind.name()) {
            Some((version, plural)) => resources.push((
                kind,
                ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(GROUP, &version, kind.name()),
                    &plural,
                ),
            )),
            None => warn!(
                kind = kind.name(),
                "the cluster serves no {GROUP} version of this kind ({}); none is read",
                PREFERENCE.join(", ")
            ),
        }
    }
    resources.push((
        Kind::Pod,
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods"),
    ));
    Ok(resources)
}
