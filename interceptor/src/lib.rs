//! interceptor: an eBPF transparent egress interceptor for Istio ServiceEntry
//! configuration. The binary in `main.rs` is a thin CLI over these modules.

pub mod config;
