//! The root integration tests, one binary with a module per feature; the fixtures they
//! share are the `integration_tests` library. Run one feature with a filter, e.g.
//! `cargo test -p integration-tests --test integration redirect::`.

mod deploy;
mod destination_rule;
mod dns;
mod dns_capture;
mod explain;
mod kernel_path;
mod kubernetes;
mod ops;
mod redirect;
mod resets;
mod sni;
mod trace;
