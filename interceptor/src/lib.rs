//! interceptor: an eBPF transparent egress interceptor for Istio ServiceEntry
//! configuration. The binary in `main.rs` is a thin CLI over these modules.

pub mod address_file;
pub mod admin;
pub mod app;
pub mod config;
pub mod copy;
pub mod kernel;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod report;
pub mod resolve;
pub mod sockdiag;
pub mod socket;
pub mod systemd;
