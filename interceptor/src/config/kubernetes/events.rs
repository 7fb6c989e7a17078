//! Kubernetes Events on rejected objects, so `kubectl describe` shows why an object
//! is not in force.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    api::{ApiResource, DynamicObject},
    runtime::events::{Event, EventType, Recorder, Reporter as EventReporter},
};
use tracing::warn;

use crate::{config::Finding, report::Chain};

/// The API server caps an event's note at 1 kB.
const MAX_NOTE: usize = 1024;

#[derive(Clone)]
pub struct Reporter {
    recorder: Recorder,
}

impl Reporter {
    pub fn new(client: Client, instance: &str) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                EventReporter {
                    controller: "interceptor".into(),
                    instance: (!instance.is_empty()).then(|| instance.to_owned()),
                },
            ),
        }
    }

    /// Posts a Warning event on `object`, in the background: a failed post is logged
    /// and holds nothing up.
    pub fn rejected(&self, resource: &ApiResource, object: &DynamicObject, findings: &[Finding]) {
        let reference = ObjectReference {
            api_version: Some(resource.api_version.clone()),
            kind: Some(resource.kind.clone()),
            name: object.metadata.name.clone(),
            namespace: object.metadata.namespace.clone(),
            uid: object.metadata.uid.clone(),
            resource_version: object.metadata.resource_version.clone(),
            ..ObjectReference::default()
        };
        let mut note = findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        if note.len() > MAX_NOTE {
            let mut end = MAX_NOTE - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidConfig".into(),
            note: Some(note),
            action: "Validate".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(
                    "cannot post the event on a rejected object: {}",
                    Chain(&error)
                );
            }
        });
    }
}
