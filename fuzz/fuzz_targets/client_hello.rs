//! The SNI path sees bytes from any application on the node before anything else does.
#![no_main]

use interceptor::parsers::{ClientHello, is_plausible_host, parse_client_hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    // Parsing a prefix never claims more than the whole: bytes arrive in pieces, and a
    // verdict reached early must not change as more arrive.
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        match parse_client_hello(&data[..cut]) {
            ClientHello::Incomplete => {}
            early => assert_eq!(early, whole, "verdict changed after {cut} bytes"),
        }
    }
    if let ClientHello::Complete {
        server_name: Some(name),
    } = whole
    {
        assert!(is_plausible_host(&name));
    }
});
