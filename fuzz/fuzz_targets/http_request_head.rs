#![no_main]

use interceptor::parsers::{HttpRequest, parse_request_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let HttpRequest::Complete { host: Some(host) } = parse_request_head(data) {
        assert!(!host.contains(':') && !host.is_empty());
    }
});
