//! The loader reads files an operator may have got from anywhere; no input may make it
//! panic, and every finding must say which file it is about.
#![no_main]

use std::path::Path;

use interceptor::parsers::{LoadError, OutputFormat, load_str, render};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    if let Err(LoadError::Invalid { findings }) = load_str(file, text) {
        assert!(findings.iter().all(|finding| finding.file == file));
        let _ = render(&findings, OutputFormat::Text);
        let _ = render(&findings, OutputFormat::Json);
    }
});
