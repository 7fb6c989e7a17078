//! The one test bed of the root integration tests (`tests/`) and the benchmark
//! (`cargo xtask bench`): a [`Sandbox`] (a network namespace of its own and a cgroup),
//! the interceptor [`Daemon`] and other child processes ([`Proc`]) run in it, all
//! cleaned up on every exit path.
//!
//! Everything here needs root, cgroup v2 and iproute2.

pub mod bpf;
pub mod daemon;
pub mod process;
pub mod sandbox;

pub use daemon::{Daemon, DaemonOptions};
pub use process::{Proc, SpawnOptions};
pub use sandbox::{
    Placement, Sandbox, ip, remove_cgroup, remove_stale_cgroups, systemd_v1_hierarchy,
};

/// The integration tests' sandboxes are `<this><pid>-<test>`.
pub const TEST_CGROUP_PREFIX: &str = "interceptor-test-";
