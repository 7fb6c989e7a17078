//! The Kubernetes source's metrics, registered with the daemon's others.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::store::Kind;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Debug, Default)]
pub struct SourceMetrics {
    rejected: Family<KindLabels, Counter>,
    up: Family<SourceLabels, Gauge>,
}

impl SourceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "config_objects_rejected",
            "Config objects from the Kubernetes API skipped as invalid, by kind; the \
             previous valid version of each stays in force",
            self.rejected.clone(),
        );
        registry.register(
            "config_source_up",
            "Whether every watch of the config source is connected to its API server \
             (1) or retrying (0); the last applied config keeps serving meanwhile",
            self.up.clone(),
        );
    }

    /// Makes the series exist from the start: a kubernetes source is down until its
    /// first list answers.
    pub fn enable(&self) {
        for kind in Kind::ALL {
            let _ = self
                .rejected
                .get_or_create(&KindLabels { kind: kind.name() });
        }
        self.set_up(false);
    }

    pub fn rejected(&self, kind: Kind) {
        self.rejected
            .get_or_create(&KindLabels { kind: kind.name() })
            .inc();
    }

    pub fn set_up(&self, up: bool) {
        self.up
            .get_or_create(&SourceLabels {
                source: "kubernetes",
            })
            .set(i64::from(up));
    }
}
