//! The DNS server's packet path sees bytes from any process in the cgroup: any bytes
//! get a decision without a panic, and a reply it makes is never answered in turn
//! (two servers must not bounce packets between them).
#![no_main]

use interceptor::parsers::{DnsDecision, NameTable, decide_dns_query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names = NameTable::default();
    for udp in [true, false] {
        if let DnsDecision::Reply { bytes, .. } = decide_dns_query(&names, data, udp) {
            assert_eq!(decide_dns_query(&names, &bytes, udp), DnsDecision::Drop);
        }
    }
});
