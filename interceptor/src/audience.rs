//! `exportTo`: which namespaces' clients a ServiceEntry intercepts, and the ids the
//! kernel knows namespaces and audiences by.
//!
//! Istio scopes a ServiceEntry to the sidecars of the namespaces it is exported to. A
//! node agent has no sidecar to scope, so the kernel asks instead: the connecting
//! task's cgroup gives its pod and namespace (or the host's, `--host-namespace`), and a
//! rule's audience says whether that namespace may use it.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
};

use interceptor_common::{AudienceKey, EVERYONE};
use serde::Serialize;

/// Who a service is exported to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// `*`, or no `exportTo` (Istio's default).
    Everyone,
    /// These namespaces; none at all for `~`.
    Namespaces(BTreeSet<String>),
}

impl Audience {
    /// The audience of an object in `namespace` with this `exportTo` (validated).
    pub fn of(export_to: &[String], namespace: &str) -> Self {
        if export_to.is_empty() || export_to.iter().any(|to| to == "*") {
            return Self::Everyone;
        }
        Self::Namespaces(
            export_to
                .iter()
                .filter(|to| *to != "~")
                .map(|to| if to == "." { namespace } else { to }.to_owned())
                .collect(),
        )
    }

    /// Whoever either one is exported to: a destination that several services share
    /// (a port without addresses) is intercepted for the clients of any of them.
    pub fn union(&self, other: &Self) -> Self {
        match (self, other) {
            (Self::Namespaces(one), Self::Namespaces(other)) => {
                Self::Namespaces(one.union(other).cloned().collect())
            }
            _ => Self::Everyone,
        }
    }

    /// Whoever any of `audiences` is exported to; nobody if there are none.
    pub fn union_of(audiences: impl IntoIterator<Item = Self>) -> Self {
        audiences
            .into_iter()
            .reduce(|one, other| one.union(&other))
            .unwrap_or_else(|| Self::Namespaces(BTreeSet::new()))
    }

    pub fn includes(&self, namespace: &str) -> bool {
        match self {
            Self::Everyone => true,
            Self::Namespaces(namespaces) => namespaces.contains(namespace),
        }
    }
}

/// The id the kernel knows a namespace by: a hash of its name, so the audiences the
/// registry writes and the clients the pod watch writes agree without sharing state.
/// Never [`EVERYONE`], which no namespace is.
pub fn namespace_id(namespace: &str) -> u32 {
    let mut hasher = DefaultHasher::new();
    namespace.hash(&mut hasher);
    match hasher.finish() as u32 {
        EVERYONE => 1,
        id => id,
    }
}

/// Ids for a set of audiences, and the [`AudienceKey`]s that list their members.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AudienceIds {
    ids: BTreeMap<BTreeSet<String>, u32>,
}

impl AudienceIds {
    /// Gives each audience an id: a hash of its namespaces, so an audience keeps its id
    /// across reloads and a rule never points at another audience's members while the
    /// maps change. A collision takes the next free id.
    pub fn new<'a>(audiences: impl IntoIterator<Item = &'a Audience>) -> Self {
        let mut ids = BTreeMap::new();
        let mut taken = HashSet::from([EVERYONE]);
        for audience in audiences {
            let Audience::Namespaces(namespaces) = audience else {
                continue;
            };
            if ids.contains_key(namespaces) {
                continue;
            }
            let mut hasher = DefaultHasher::new();
            namespaces.hash(&mut hasher);
            let mut id = hasher.finish() as u32;
            while !taken.insert(id) {
                id = id.wrapping_add(1);
            }
            ids.insert(namespaces.clone(), id);
        }
        Self { ids }
    }

    /// The id of `audience`, which [`AudienceIds::new`] was given.
    pub fn id(&self, audience: &Audience) -> u32 {
        match audience {
            Audience::Everyone => EVERYONE,
            Audience::Namespaces(namespaces) => self
                .ids
                .get(namespaces)
                .copied()
                .unwrap_or_else(|| unreachable!("audience {namespaces:?} was not given an id")),
        }
    }

    /// What the audiences map must hold: each audience with each of its namespaces.
    pub fn members(&self) -> BTreeSet<AudienceKey> {
        self.ids
            .iter()
            .flat_map(|(namespaces, audience)| {
                namespaces.iter().map(|namespace| AudienceKey {
                    audience: *audience,
                    namespace: namespace_id(namespace),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(to: &[&str], namespace: &str) -> Audience {
        let to: Vec<String> = to.iter().map(|to| (*to).to_owned()).collect();
        Audience::of(&to, namespace)
    }

    fn namespaces(names: &[&str]) -> Audience {
        Audience::Namespaces(names.iter().map(|name| (*name).to_owned()).collect())
    }

    #[test]
    fn export_to_reads_as_istio_does() {
        assert_eq!(export(&[], "shop"), Audience::Everyone);
        assert_eq!(export(&["*"], "shop"), Audience::Everyone);
        assert_eq!(export(&["."], "shop"), namespaces(&["shop"]));
        assert_eq!(export(&[".", "web"], "shop"), namespaces(&["shop", "web"]));
        assert_eq!(export(&["~"], "shop"), namespaces(&[]));
        assert!(!export(&["~"], "shop").includes("shop"));
        assert!(export(&["."], "shop").includes("shop"));
        assert!(!export(&["."], "shop").includes("web"));
    }

    #[test]
    fn a_shared_destination_is_exported_to_whoever_any_of_its_services_is() {
        let shop = namespaces(&["shop"]);
        assert_eq!(
            shop.union(&namespaces(&["web"])),
            namespaces(&["shop", "web"])
        );
        assert_eq!(shop.union(&Audience::Everyone), Audience::Everyone);
    }

    #[test]
    fn audiences_keep_their_ids_whatever_else_is_configured_and_list_their_members() {
        let shop = namespaces(&["shop"]);
        let both = namespaces(&["shop", "web"]);
        let alone = AudienceIds::new([&shop]);
        let together = AudienceIds::new([&both, &Audience::Everyone, &shop]);
        assert_eq!(alone.id(&shop), together.id(&shop));
        assert_ne!(together.id(&shop), together.id(&both));
        assert_eq!(together.id(&Audience::Everyone), EVERYONE);
        assert_ne!(together.id(&shop), EVERYONE);
        let members = together.members();
        assert_eq!(members.len(), 3);
        assert!(members.contains(&AudienceKey {
            audience: together.id(&both),
            namespace: namespace_id("web"),
        }));
        // `~`: an audience with no member, which no client is in.
        let nobody = namespaces(&[]);
        assert!(AudienceIds::new([&nobody]).members().is_empty());
        assert_ne!(AudienceIds::new([&nobody]).id(&nobody), EVERYONE);
    }
}
