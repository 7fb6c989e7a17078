use std::{fmt, path::PathBuf};

use serde::Serialize;

use super::Source;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One problem in the configuration, located precisely enough to fix it without
/// searching: file, document index, object and field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub file: PathBuf,
    /// Zero-based index of the YAML document in its file.
    pub document: usize,
    /// `Kind/namespace/name`, or empty when the document could not be identified.
    pub object: String,
    /// Field path such as `spec.ports[1].targetPort`, or empty for the whole document.
    pub field: String,
    pub message: String,
}

impl Finding {
    /// A finding about `object` (`Kind/namespace/name`) in the document at `source`.
    pub(crate) fn at(
        severity: Severity,
        source: &Source,
        object: String,
        field: String,
        message: String,
    ) -> Self {
        Self {
            severity,
            file: source.file.clone(),
            document: source.document,
            object,
            field,
            message,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(
            f,
            "{severity}: {}: document {}",
            self.file.display(),
            self.document
        )?;
        if !self.object.is_empty() {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}
