//! Empty on purpose: the programs are the binary target. The library target lets the
//! daemon name this crate as a build dependency, so cargo rebuilds the programs when
//! they or interceptor-common change (aya's template does the same).
#![no_std]
