//! The settings the daemon gives the programs when it loads them.

use crate::address::SocketAddress;

/// The symbol of the programs' one global, a [`Globals`], which the loader overrides.
pub const GLOBALS_SYMBOL: &str = "GLOBALS";

/// Every setting of the programs, in one read-only global: the daemon writes it once at
/// load time and the programs read it as a whole, so the two sides share its layout
/// instead of keeping a list of names in step.
///
/// A listener with port zero is not there, and connects it would take are left alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Globals {
    /// Where IPv4 connects (and dual-stack sockets' IPv4-mapped ones) in the proxy's
    /// network namespace go: the proxy's IPv4 listener, IPv4-mapped.
    pub proxy_v4: SocketAddress,
    /// Where native IPv6 connects in the proxy's network namespace go.
    pub proxy_v6: SocketAddress,
    /// Where IPv4 connects from other network namespaces (containers) go: an address of
    /// the host they can reach, IPv4-mapped.
    pub container_proxy_v4: SocketAddress,
    /// The same for native IPv6 connects from other network namespaces.
    pub container_proxy_v6: SocketAddress,
    /// Sockets carrying this SO_MARK are the daemon's own and are never redirected.
    pub bypass_mark: u32,
    /// The namespace id of clients outside every pod the daemon knows (host
    /// processes), for `exportTo`.
    pub host_namespace: u32,
    /// The cookie of the network namespace the proxy listens in. Only sockets in it go
    /// to the proxy's own listeners, since its loopback address means nothing in
    /// another one; zero (a kernel without SO_NETNS_COOKIE) treats every namespace as
    /// the proxy's.
    pub proxy_netns_cookie: u64,
}

impl Globals {
    /// What the programs hold until the loader overrides it: no listeners, so nothing
    /// is redirected.
    pub const UNSET: Self = Self {
        proxy_v4: SocketAddress::NONE,
        proxy_v6: SocketAddress::NONE,
        container_proxy_v4: SocketAddress::NONE,
        container_proxy_v6: SocketAddress::NONE,
        bypass_mark: 0,
        host_namespace: 0,
        proxy_netns_cookie: 0,
    };
}
