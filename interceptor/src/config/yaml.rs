//! Reading a YAML stream into one value per document, within limits that bound the
//! time and memory any input can cost.
//!
//! serde-saphyr's multi-document functions skip null documents and fail as a whole,
//! but findings number documents as they appear in the file and the documents before
//! a syntax error still load. So a first pass with its event parser finds where each
//! document ends, and each document is then parsed on its own.

use serde_saphyr::{
    DuplicateKeyPolicy, MergeKeyPolicy, MessageFormatter as _, NonFiniteFloatPolicy,
    granit_parser::{self, Event, Parser},
};

/// A document as read, before its kind decides which typed resource it becomes.
pub(super) type Document = serde_json::Value;

/// Deeper than any Istio resource, and the nesting limit serde_yaml had, so no
/// configuration it accepted is refused for depth.
const MAX_DEPTH: usize = 128;

/// Parser events in one document, aliases replayed included: above what a document of
/// a few MiB produces.
const MAX_EVENTS: usize = 1_000_000;

/// Aliases in one document, and the events they may replay. Anchors in a configuration
/// stand for a few shared fields; these stop alias expansion ("billion laughs") early.
const MAX_ALIASES: usize = 10_000;
const MAX_ALIAS_REPLAY: usize = 100_000;

/// A stream split into documents: the text of each complete document, and why the
/// stream could not be read past them, if it could not.
pub(super) struct Split<'a> {
    pub documents: Vec<&'a str>,
    pub error: Option<String>,
}

/// Finds the documents of `text` without building them.
pub(super) fn split(text: &str) -> Split<'_> {
    let mut options = granit_parser::Options::default();
    options.flow_nesting_limit = MAX_DEPTH;
    options.block_nesting_limit = MAX_DEPTH;
    let mut documents = Vec::new();
    let mut start = 0;
    for event in Parser::new_from_str_with_options(text, options) {
        match event {
            Ok((Event::DocumentEnd, span)) => {
                // A document ends where its end marker does, or where the next one's
                // start marker begins; what lies between belongs to the next document.
                let end = span
                    .byte_range()
                    .map_or(text.len(), |range| range.end)
                    .clamp(start, text.len());
                documents.push(&text[start..end]);
                start = end;
            }
            Ok(_) => {}
            Err(error) => {
                let message = format!(
                    "{} at line {}, column {}",
                    error.info(),
                    error.marker().line(),
                    error.marker().col() + 1
                );
                return Split {
                    documents,
                    error: Some(message),
                };
            }
        }
    }
    Split {
        documents,
        error: None,
    }
}

/// Parses one document found by [`split`]; `None` when it is empty or null.
/// `first_line` is the line of the file the document starts on, so that errors
/// point into the file rather than into the document.
pub(super) fn parse(document: &str, first_line: usize) -> Result<Option<Document>, String> {
    serde_saphyr::from_str_with_options(document, options()).map_err(|error| {
        let message = serde_saphyr::UserMessageFormatter.format_message(&error);
        match error.location() {
            Some(location) if location.line() > 0 => format!(
                "{message} at line {}, column {}",
                location.line() as usize + first_line - 1,
                location.column()
            ),
            _ => message.into_owned(),
        }
    })
}

/// Limits on what one document may cost, and the YAML 1.2 reading serde_yaml gave:
/// `yes` and `on` are strings, `<<` is an ordinary key, a repeated key is an error.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_events: MAX_EVENTS,
            max_nodes: MAX_EVENTS,
            max_aliases: MAX_ALIASES,
            max_documents: 1,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ALIAS_REPLAY,
        },
        duplicate_keys: DuplicateKeyPolicy::Error,
        merge_keys: MergeKeyPolicy::AsOrdinary,
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        non_finite_float_policy: NonFiniteFloatPolicy::PassThrough,
        with_snippet: false,
    }
}
