//! What the kernel programs, the daemon, the integration tests and xtask share.
//!
//! The crate is `no_std` so that the kernel programs can use it; the `std` feature adds
//! the host facts that every userspace part reads the same way.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "std")]
pub mod host;
