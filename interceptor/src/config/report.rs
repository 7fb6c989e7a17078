//! Rendering findings for people (one line each) and for machines (JSON).

use std::{fmt, str::FromStr};

use serde::Serialize;

use super::{Finding, Severity};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown output format {0:?}; expected \"text\" or \"json\"")]
pub struct UnknownOutputFormat(String);

impl FromStr for OutputFormat {
    type Err = UnknownOutputFormat;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(UnknownOutputFormat(text.to_owned())),
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// The JSON document: every finding plus the counts a caller needs to pick an
/// exit status.
#[derive(Serialize)]
struct JsonReport<'a> {
    errors: usize,
    warnings: usize,
    findings: Vec<JsonFinding<'a>>,
}

/// A finding with its file as text, so that a non-UTF-8 path cannot make
/// serialization fail.
#[derive(Serialize)]
struct JsonFinding<'a> {
    severity: Severity,
    file: String,
    document: usize,
    object: &'a str,
    field: &'a str,
    message: &'a str,
}

/// Text: one line per finding (its `Display`), each ending in a newline.
/// JSON: `{"errors": N, "warnings": N, "findings": [...]}` followed by a newline.
pub fn render(findings: &[Finding], format: OutputFormat) -> String {
    match format {
        OutputFormat::Text => findings
            .iter()
            .map(|finding| format!("{finding}\n"))
            .collect(),
        OutputFormat::Json => {
            let count = |severity| {
                findings
                    .iter()
                    .filter(|finding| finding.severity == severity)
                    .count()
            };
            let report = JsonReport {
                errors: count(Severity::Error),
                warnings: count(Severity::Warning),
                findings: findings
                    .iter()
                    .map(|finding| JsonFinding {
                        severity: finding.severity,
                        file: finding.file.display().to_string(),
                        document: finding.document,
                        object: &finding.object,
                        field: &finding.field,
                        message: &finding.message,
                    })
                    .collect(),
            };
            // Only strings and numbers: serializing cannot fail.
            let mut text = serde_json::to_string_pretty(&report)
                .unwrap_or_else(|error| format!("{{\"error\": {:?}}}", error.to_string()));
            text.push('\n');
            text
        }
    }
}
