//! The bench's [`testbed::Sandbox`], entered by the harness's main thread before it
//! starts any other thread or child, so the backends, the daemon, HAProxy and the
//! clients all live in its network namespace. Only the clients go into its cgroup.
//! Besides loopback, the namespace has the backend host on `lo`: 198.18.0.1 and
//! 2001:2:0:1::1, from the IPv4 and IPv6 benchmarking ranges.

use std::{fs, net::IpAddr, ops::Deref};

use anyhow::{Context as _, Result};
use interceptor_common::host::raise_open_files_limit;

use super::proto::{BACKEND_IPV4, BACKEND_IPV6, EPHEMERAL_PORTS};

/// Enough descriptors for 10,000 idle connections through a proxy (two sockets each
/// in the proxy, one in the client, one in the backend) with room to spare.
const OPEN_FILES: u64 = 262_144;

const CGROUP_PREFIX: &str = "interceptor-bench-";

pub struct Sandbox {
    sandbox: testbed::Sandbox,
    /// RLIMIT_NOFILE of the harness and its children.
    pub open_files: u64,
}

impl Deref for Sandbox {
    type Target = testbed::Sandbox;

    fn deref(&self) -> &testbed::Sandbox {
        &self.sandbox
    }
}

impl Sandbox {
    /// Must run on the main thread before any other thread exists.
    pub fn create() -> Result<Self> {
        let open_files = raise_open_files_limit(OPEN_FILES).context("raising RLIMIT_NOFILE")?;
        testbed::remove_stale_cgroups(CGROUP_PREFIX)?;
        let sandbox = testbed::Sandbox::create(
            &format!("{CGROUP_PREFIX}{}", std::process::id()),
            testbed::Placement::Children,
        )?;
        for backend in [IpAddr::V4(BACKEND_IPV4), IpAddr::V6(BACKEND_IPV6)] {
            sandbox.add_address(backend)?;
        }
        // /proc/sys/net follows the network namespace of the thread that opens it.
        // TIME_WAIT reuse for the 198.18/15 hosts too (the default 2 covers 127/8 only),
        // and a wide ephemeral range: the connection-rate runs open ~100k connections.
        fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").context("setting tcp_tw_reuse")?;
        fs::write("/proc/sys/net/ipv4/ip_local_port_range", EPHEMERAL_PORTS)
            .context("setting ip_local_port_range")?;
        Ok(Self {
            sandbox,
            open_files,
        })
    }
}
