//! Tracing connects: what connect4/6 did with each connect, for `interceptor trace`.
//!
//! The programs emit nothing unless the daemon has a tracer attached: they look at
//! [`TraceSettings::enabled`] first, so a node nobody traces pays one array lookup per
//! connect. The settings also narrow what is emitted (cgroup, destination, port), so
//! tracing one client on a busy node does not flood the ring with everyone's connects.

use crate::address::{Address, SocketAddress};

/// A one-entry array of [`TraceSettings`], written by the daemon as tracers come and go.
pub const TRACE_SETTINGS_MAP: &str = "TRACE_SETTINGS";
/// The ring buffer of [`TraceEvent`]s.
pub const TRACE_EVENTS_RING: &str = "TRACE_EVENTS";
/// Bytes (a power of two, a multiple of the page size): 16,384 events of 64 bytes
/// with their headers between two reads of the daemon; more are dropped.
pub const TRACE_EVENTS_RING_BYTES: u32 = 1 << 20;

/// What connect4/6 emit while tracing, and which connects.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceSettings {
    /// Non-zero: emit events. Nothing else is read while it is zero.
    pub enabled: u32,
    /// The destination port (network byte order); zero: any.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// Only connects from this cgroup (v2 id) or one below it; zero: any.
    pub cgroup_id: u64,
    /// The depth of `cgroup_id` below the root, where the programs look for it
    /// among the connecting task's ancestors.
    pub cgroup_level: u32,
    pub _pad2: [u8; 4],
    /// Only destinations with `dst & dst_mask == dst` (both IPv4-mapped for IPv4);
    /// an all-zero mask: any.
    pub dst: Address,
    pub dst_mask: Address,
}

impl TraceSettings {
    /// Nobody traces.
    pub const OFF: Self = Self {
        enabled: 0,
        port: [0; 2],
        _pad: [0; 2],
        cgroup_id: 0,
        cgroup_level: 0,
        _pad2: [0; 4],
        dst: [0; 4],
        dst_mask: [0; 4],
    };
}

/// What connect4/6 did with one connect.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Sent to the proxy's listener.
    Proxy = 0,
    /// Sent straight to a backend (the kernel path).
    Backend = 1,
    /// The kernel-path service has no endpoint: sent to the refusing port.
    NoEndpoint = 2,
    /// An allocated VIP on a port no entry declares: sent to the refusing port.
    UndeclaredVipPort = 3,
    /// A DNS query, sent to the daemon's DNS server.
    Dns = 4,
    /// Left alone: not TCP (nor, for DNS, UDP).
    NotTcp = 5,
    /// Left alone: the connect had no socket to look at.
    NoSocket = 6,
    /// Left alone: the socket carries the bypass mark (the daemon's own).
    BypassMark = 7,
    /// Left alone: no ServiceEntry intercepts this address and port.
    NoRule = 8,
    /// Left alone: another network namespace, and no container proxy address for it.
    OtherNetns = 9,
    /// Left alone: the proxy has no listener of this family.
    NoListener = 10,
    /// Left alone: the connect is to the proxy itself.
    ToProxy = 11,
    /// Left alone: the socket's storage for the record could not be allocated.
    NoStorage = 12,
    /// Left alone: the rule's ServiceEntry is not exported to the client's namespace.
    NotExported = 13,
}

impl Verdict {
    pub const ALL: [Self; 14] = [
        Self::Proxy,
        Self::Backend,
        Self::NoEndpoint,
        Self::UndeclaredVipPort,
        Self::Dns,
        Self::NotTcp,
        Self::NoSocket,
        Self::BypassMark,
        Self::NoRule,
        Self::OtherNetns,
        Self::NoListener,
        Self::ToProxy,
        Self::NoStorage,
        Self::NotExported,
    ];

    /// The verdict a program wrote, if it is one.
    pub fn of(value: u32) -> Option<Self> {
        Self::ALL.get(value as usize).copied()
    }

    /// Whether the connect was left to go where the application asked.
    pub const fn left_alone(self) -> bool {
        self as u32 >= Self::NotTcp as u32
    }

    /// A word or two for trace lines and JSON.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Backend => "backend",
            Self::NoEndpoint => "no_endpoint",
            Self::UndeclaredVipPort => "undeclared_vip_port",
            Self::Dns => "dns",
            Self::NotTcp => "not_tcp",
            Self::NoSocket => "no_socket",
            Self::BypassMark => "bypass_mark",
            Self::NoRule => "no_rule",
            Self::OtherNetns => "other_netns",
            Self::NoListener => "no_listener",
            Self::ToProxy => "to_proxy",
            Self::NoStorage => "no_storage",
            Self::NotExported => "not_exported",
        }
    }
}

/// One connect as connect4/6 saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// The connecting task's cgroup (v2 id).
    pub cgroup_id: u64,
    /// CLOCK_MONOTONIC time of the connect: the daemon reads the ring in batches.
    pub at_ns: u64,
    /// Where the application connected.
    pub dst: SocketAddress,
    /// A [`Verdict`].
    pub verdict: u32,
    /// Where the connect was sent instead; port zero when it was left alone.
    pub to: SocketAddress,
    pub _pad: [u8; 4],
}
