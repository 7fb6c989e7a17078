//! Empty on purpose: the programs are the binary target. The library target lets the
//! daemon name this crate as a build dependency, so cargo rebuilds the programs when
//! they or interceptor-common change (aya's template does the same).
#![no_std]

// TEMPORARY, until interceptor's main.rs and metrics.rs name interceptor_common: they
// still import these two from here. Delete this line, and interceptor's [dependencies]
// entry for this crate, once they do.
pub use interceptor_common::{KernelEvent, REDIRECTS_RING_BYTES};
