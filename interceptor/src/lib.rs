//! interceptor: an eBPF transparent egress interceptor for Istio ServiceEntry
//! configuration. The binary in `main.rs` calls [`cli::main`]; every other module is
//! private, so the compiler reports what nothing uses.

mod address_file;
mod admin;
mod app;
mod audience;
pub mod cli;
mod config;
mod copy;
mod datapath;
mod dns;
mod explain;
mod kernel;
mod limits;
mod load;
mod metrics;
mod outlier;
mod pods;
mod probe;
mod proxy;
mod registry;
mod reload;
mod report;
mod resolve;
mod sockdiag;
mod socket;
mod systemd;
mod trace;

/// The parsers that read untrusted bytes, for the fuzz targets.
pub mod parsers {
    pub use crate::{
        config::{LoadError, OutputFormat, load_str, render},
        dns::{Decision as DnsDecision, NameTable, packet::decide as decide_dns_query},
        proxy::{
            http::{HttpRequest, parse_request_head},
            sni::{ClientHello, is_plausible_host, parse_client_hello},
        },
    };
}
