//! interceptor: an eBPF transparent egress interceptor for Istio ServiceEntry
//! configuration. The binary in `main.rs` is a thin CLI over these modules.

pub mod app;
pub mod config;
pub mod copy;
pub mod kernel;
pub mod proxy;
pub mod registry;
pub mod resolve;
pub mod socket;
