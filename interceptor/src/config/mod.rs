//! Loading Istio configuration from YAML files and directories.
//!
//! A load either yields a complete [`ConfigSet`] or fails with every finding, so a
//! caller never applies part of a configuration.

mod finding;
pub mod kubernetes;
pub mod model;
pub mod report;
mod shape;
pub mod validate;
mod yaml;

#[cfg(test)]
mod tests;

use std::{
    fs,
    path::{Path, PathBuf},
};

pub use finding::{Finding, Severity};
pub use model::*;
pub use report::{OutputFormat, render};
use yaml::Document;

const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";
const SERVED_VERSIONS: [&str; 3] = ["v1alpha3", "v1beta1", "v1"];

/// Where a resource came from, for error messages and the config dump.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    pub file: PathBuf,
    pub document: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sourced<T> {
    pub source: Source,
    pub resource: T,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSet {
    pub service_entries: Vec<Sourced<ServiceEntry>>,
    pub workload_entries: Vec<Sourced<WorkloadEntry>>,
    pub virtual_services: Vec<Sourced<VirtualService>>,
    pub destination_rules: Vec<Sourced<DestinationRule>>,
}

/// A successful load: the resources and the warnings (never errors) found on the way.
#[derive(Debug, Default)]
pub struct Loaded {
    pub config: ConfigSet,
    pub warnings: Vec<Finding>,
    /// Documents of kinds this program does not handle, as `file: document N: Kind`.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no configuration files found in {}", path.display())]
    Empty { path: PathBuf },
    #[error("invalid configuration:\n{}", render_lines(findings))]
    Invalid { findings: Vec<Finding> },
}

fn render_lines(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// [`load_with`] and nothing else: the files alone.
#[cfg(test)]
pub fn load(paths: &[PathBuf]) -> Result<Loaded, LoadError> {
    load_with(paths, ConfigSet::default())
}

/// Loads every YAML document under `paths` (files, or directories of `.yaml`, `.yml`
/// and `.json` files, read in name order), adds the resources from another source
/// (the Kubernetes API), and validates the result as a whole, so cross-object checks
/// see both.
pub fn load_with(paths: &[PathBuf], extra: ConfigSet) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded::default();
    let mut findings = Vec::new();
    for file in config_files(paths)? {
        let text = fs::read_to_string(&file).map_err(|source| LoadError::Read {
            path: file.clone(),
            source,
        })?;
        load_documents(&file, &text, &mut loaded, &mut findings);
    }
    loaded.config.extend(extra);
    finish(loaded, findings)
}

/// Loads one object that is already decoded as JSON (a Kubernetes API object), with
/// the same rules as a document in a file; `source` only locates findings.
pub fn load_value(source: Source, value: serde_json::Value) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded::default();
    let mut findings = Vec::new();
    load_object(&source, value, &mut loaded, &mut findings);
    finish(loaded, findings)
}

impl ConfigSet {
    pub fn extend(&mut self, other: ConfigSet) {
        self.service_entries.extend(other.service_entries);
        self.workload_entries.extend(other.workload_entries);
        self.virtual_services.extend(other.virtual_services);
        self.destination_rules.extend(other.destination_rules);
    }
}

/// Loads YAML text that is already in memory, as if it had been read from `file`
/// (which is only used to locate findings). Same rules as [`load_with`].
pub fn load_str(file: &Path, text: &str) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded::default();
    let mut findings = Vec::new();
    load_documents(file, text, &mut loaded, &mut findings);
    finish(loaded, findings)
}

fn finish(mut loaded: Loaded, mut findings: Vec<Finding>) -> Result<Loaded, LoadError> {
    findings.extend(validate::config_set(&loaded.config));
    let (errors, warnings): (Vec<_>, Vec<_>) = findings
        .into_iter()
        .partition(|finding| finding.severity == Severity::Error);
    if !errors.is_empty() {
        let mut all = errors;
        all.extend(warnings);
        return Err(LoadError::Invalid { findings: all });
    }
    loaded.warnings = warnings;
    Ok(loaded)
}

fn config_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        let metadata = fs::metadata(path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        if !metadata.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries = fs::read_dir(path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        let mut in_dir = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| LoadError::Read {
                path: path.clone(),
                source,
            })?;
            let candidate = entry.path();
            if candidate.is_file() && has_config_extension(&candidate) {
                in_dir.push(candidate);
            }
        }
        if in_dir.is_empty() {
            return Err(LoadError::Empty { path: path.clone() });
        }
        in_dir.sort();
        files.extend(in_dir);
    }
    Ok(files)
}

fn has_config_extension(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|ext| ext.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn load_documents(file: &Path, text: &str, loaded: &mut Loaded, findings: &mut Vec<Finding>) {
    let split = yaml::split(text);
    let mut first_line = 1;
    for (document, document_text) in split.documents.iter().enumerate() {
        let source = Source {
            file: file.to_path_buf(),
            document,
        };
        match yaml::parse(document_text, first_line) {
            Ok(None) => {}
            Ok(Some(value)) => load_object(&source, value, loaded, findings),
            Err(message) => {
                findings.push(yaml_error(&source, &message));
                return;
            }
        }
        first_line += document_text.matches('\n').count();
    }
    if let Some(message) = split.error {
        let source = Source {
            file: file.to_path_buf(),
            document: split.documents.len(),
        };
        // The YAML stream cannot be resynchronised after a syntax error.
        findings.push(yaml_error(&source, &message));
    }
}

fn yaml_error(source: &Source, message: &str) -> Finding {
    error_finding(source, "", "", format!("invalid YAML: {message}"))
}

fn load_object(source: &Source, value: Document, loaded: &mut Loaded, findings: &mut Vec<Finding>) {
    let text_field = |name: &str| {
        value
            .get(name)
            .and_then(Document::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let api_version = text_field("apiVersion");
    let kind = text_field("kind");
    if kind.is_empty() || api_version.is_empty() {
        let missing = if kind.is_empty() {
            "kind"
        } else {
            "apiVersion"
        };
        findings.push(error_finding(source, "", missing, "Required value".into()));
        return;
    }
    if kind == "List" && api_version == "v1" {
        if let Some(Document::Array(items)) = value.get("items") {
            for item in items.clone() {
                load_object(source, item, loaded, findings);
            }
        }
        return;
    }
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    if group != ISTIO_NETWORKING_GROUP {
        loaded.skipped.push(format!(
            "{}: document {}: {api_version} {kind}",
            source.file.display(),
            source.document
        ));
        return;
    }
    if !HANDLED_KINDS.contains(&kind.as_str()) {
        loaded.skipped.push(format!(
            "{}: document {}: {api_version} {kind}",
            source.file.display(),
            source.document
        ));
        return;
    }
    if !SERVED_VERSIONS.contains(&version) {
        findings.push(error_finding(
            source,
            &kind,
            "apiVersion",
            format!(
                "unsupported version {api_version:?}; served versions are {}",
                SERVED_VERSIONS
                    .map(|v| format!("{ISTIO_NETWORKING_GROUP}/{v}"))
                    .join(", ")
            ),
        ));
        return;
    }
    let object = object_label(&kind, &value);
    let shape_problems = shape::check(&kind, &value);
    if !shape_problems.is_empty() {
        for (field, message) in shape_problems {
            findings.push(error_finding(source, &object, &field, message));
        }
        return;
    }
    let config = &mut loaded.config;
    let decoded = match kind.as_str() {
        "ServiceEntry" => decode_into(source, value, &mut config.service_entries),
        "WorkloadEntry" => decode_into(source, value, &mut config.workload_entries),
        "VirtualService" => decode_into(source, value, &mut config.virtual_services),
        _ => decode_into(source, value, &mut config.destination_rules),
    };
    if let Err((field, message)) = decoded {
        findings.push(error_finding(source, &object, &field, message));
    }
}

/// `Kind/namespace/name` when the metadata can be read, else just the kind, so
/// that decode errors still name the object.
fn object_label(kind: &str, document: &Document) -> String {
    let metadata = match document.get("metadata") {
        None => Some(ObjectMeta::default()),
        Some(metadata) => serde_json::from_value::<ObjectMeta>(metadata.clone()).ok(),
    };
    match metadata {
        Some(metadata) => object_name(kind, &metadata),
        None => kind.to_owned(),
    }
}

/// The `networking.istio.io` kinds this program reads; others are skipped.
const HANDLED_KINDS: [&str; 4] = [
    "ServiceEntry",
    "WorkloadEntry",
    "VirtualService",
    "DestinationRule",
];

fn decode_into<T: serde::de::DeserializeOwned>(
    source: &Source,
    value: Document,
    into: &mut Vec<Sourced<T>>,
) -> Result<(), (String, String)> {
    let resource = decode::<T>(value)?;
    into.push(Sourced {
        source: source.clone(),
        resource,
    });
    Ok(())
}

/// Decodes strictly, as kubectl's strict decoding does, and reports the failing field path.
fn decode<T: serde::de::DeserializeOwned>(value: Document) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { String::new() } else { path };
        (field, error.into_inner().to_string())
    })
}

fn error_finding(source: &Source, kind: &str, field: &str, message: String) -> Finding {
    Finding::at(
        Severity::Error,
        source,
        kind.to_owned(),
        field.to_owned(),
        message,
    )
}

/// `Kind/namespace/name`, the way findings name an object.
pub fn object_name(kind: &str, metadata: &ObjectMeta) -> String {
    format!("{kind}/{}/{}", metadata.namespace(), metadata.name)
}
