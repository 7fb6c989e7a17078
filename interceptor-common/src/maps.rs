//! The maps both sides use: their names, sizes, keys and values.
//!
//! The names are the identifiers of the programs' `static`s, which aya's map macros
//! take as the maps' names; the daemon finds the maps by them.

use crate::address::{Address, SocketAddress};

/// LPM trie of ServiceEntry `addresses` (IPs and CIDRs), each combined with one port.
pub const SERVICE_ADDRS_MAP: &str = "SERVICE_ADDRS";
/// Ports intercepted for every destination: ServiceEntries without `addresses`.
pub const SERVICE_PORTS_MAP: &str = "SERVICE_PORTS";
/// Two bitmaps over the 65,536 ports, in 64-bit words: which ports have address
/// rules (words `0..PORT_WORDS`), and which have a rule for every destination (words
/// `PORT_WORDS..`). connect4/6 read them first, so a connect to a port no
/// ServiceEntry names costs two array reads, not a trie walk and a hash lookup.
pub const PORT_FILTER_MAP: &str = "PORT_FILTER";
/// 64-bit words per bitmap of [`PORT_FILTER_MAP`].
pub const PORT_WORDS: u32 = 65_536 / 64;

/// Where `port`'s bit is in [`PORT_FILTER_MAP`]: the word of the address-rules
/// bitmap (add [`PORT_WORDS`] for the port-rules one) and the bit's mask.
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

/// Original destinations keyed by the client's address, where the proxy can find them.
pub const ORIG_BY_CLIENT_MAP: &str = "ORIG_BY_CLIENT";
/// The ring buffer through which sockops hands [`RedirectRecord`]s to the proxy.
pub const REDIRECTS_RING: &str = "REDIRECTS";
/// Per-CPU counters of what the programs could not do, indexed by [`KernelEvent`].
pub const KERNEL_EVENTS_MAP: &str = "KERNEL_EVENTS";

/// What the programs count in [`KERNEL_EVENTS_MAP`]: failures they cannot report to
/// anyone at the time, because they fail open or happen before the proxy is involved.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// connect4/6 could not allocate the socket's storage for its record, so the
    /// connect went direct instead of to the proxy.
    StorageUnavailable = 0,
    /// sockops found the ring and the fallback map full: the record was lost and the
    /// proxy refuses that connection.
    RecordLost = 1,
    /// connect4/6 found the trace ring full: a line `interceptor trace` never shows.
    TraceLost = 2,
}

impl KernelEvent {
    pub const ALL: [Self; 3] = [Self::StorageUnavailable, Self::RecordLost, Self::TraceLost];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The value of the `event` label in the daemon's metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::StorageUnavailable => "storage_unavailable",
            Self::RecordLost => "record_lost",
            Self::TraceLost => "trace_lost",
        }
    }
}

pub const SERVICE_ADDRS_CAPACITY: u32 = 65_536;
pub const SERVICE_PORTS_CAPACITY: u32 = 65_536;
pub const ORIG_DST_CAPACITY: u32 = 262_144;
/// Bytes (a power of two, a multiple of the page size). A record takes 64 bytes with
/// its header, so the proxy may fall 32,768 connections behind before sockops falls
/// back to [`ORIG_BY_CLIENT_MAP`].
pub const REDIRECTS_RING_BYTES: u32 = 1 << 21;

/// Bits of [`ServiceAddrKey`] before the address: the port and its padding, always
/// zero. The port comes first in the key, so every stored prefix covers the whole port
/// and a lookup only ever matches entries for the destination's own port; the longest
/// address prefix among those wins.
pub const SERVICE_ADDR_PORT_BITS: u32 = 32;
/// Prefix length for a lookup of one exact destination.
pub const SERVICE_ADDR_LOOKUP_PREFIX: u32 = SERVICE_ADDR_PORT_BITS + 128;

/// The data part of an LPM trie key for [`SERVICE_ADDRS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAddrKey {
    /// Destination port, network byte order.
    pub port: [u8; 2],
    /// Zero, and part of every prefix (see [`SERVICE_ADDR_PORT_BITS`]).
    pub _pad: [u8; 2],
    pub addr: Address,
}

/// Value of the interception maps: which registry rule claimed the destination, which
/// path its connects take, and from which clients. The rule id helps when reading the
/// maps with bpftool.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterceptRule {
    pub rule_id: u32,
    /// The key of the destination's [`BackendSet`] in [`BACKENDS_MAP`] when connects
    /// go straight to a backend (the kernel path), or [`PROXY_PATH`].
    pub backends: u32,
    /// The namespaces whose clients the rule intercepts (`exportTo`): [`EVERYONE`],
    /// or an audience whose members [`AUDIENCES_MAP`] lists.
    pub audience: u32,
}

/// [`InterceptRule::audience`] of a rule that intercepts every client.
pub const EVERYONE: u32 = 0;

/// The namespace of each client cgroup the daemon knows (a pod's, from the cluster's
/// pods), keyed by cgroup v2 id; a cgroup not in it is the host's, whose namespace is
/// [`crate::Globals::host_namespace`]. Namespaces are ids the daemon derives from their
/// names.
pub const CLIENT_NAMESPACES_MAP: &str = "CLIENT_NAMESPACES";
pub const CLIENT_NAMESPACES_CAPACITY: u32 = 65_536;

/// The members of each audience: an entry per (audience, namespace) that belongs.
pub const AUDIENCES_MAP: &str = "AUDIENCES";
pub const AUDIENCES_CAPACITY: u32 = 65_536;

/// Key of [`AUDIENCES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AudienceKey {
    pub audience: u32,
    pub namespace: u32,
}

/// [`InterceptRule::backends`] of a destination whose connects go to the proxy.
pub const PROXY_PATH: u32 = u32::MAX;

/// Kernel-path backend sets, keyed by [`InterceptRule::backends`].
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const BACKENDS_CAPACITY: u32 = 16_384;
/// The most endpoints a kernel-path backend set holds; a service with more takes the
/// proxy path, so the connect hook's pick stays a short bounded loop.
pub const MAX_BACKEND_ENDPOINTS: usize = 16;

/// One endpoint of a [`BackendSet`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEndpoint {
    /// IPv4-mapped for IPv4, as everywhere.
    pub addr: Address,
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// The sum of the weights of this endpoint and those before it: a ticket below it
    /// and at or above the previous one picks this endpoint.
    pub cumulative_weight: u32,
}

impl BackendEndpoint {
    pub const NONE: Self = Self {
        addr: [0; 4],
        port: [0; 2],
        _pad: [0; 2],
        cumulative_weight: 0,
    };
}

/// Where kernel-path connects to one service port go: either the destination's own
/// address with another port (resolution NONE), or one of `endpoints[..count]` picked
/// by weight. No endpoint at all refuses the connect with ECONNREFUSED.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSet {
    /// Endpoints in use, at most [`MAX_BACKEND_ENDPOINTS`].
    pub count: u32,
    /// The last endpoint's cumulative weight: tickets are drawn below it.
    pub total_weight: u32,
    /// Non-zero (network byte order): keep the destination address and connect to
    /// this port instead; `endpoints` is unused.
    pub keep_address_port: [u8; 2],
    pub _pad: [u8; 6],
    pub endpoints: [BackendEndpoint; MAX_BACKEND_ENDPOINTS],
}

/// Socket storage of a kernel-path socket: where the application connected (the VIP)
/// and the backend connect4/6 sent it to, so getpeername can show the former while
/// the socket is connected to the latter.
pub const KERNEL_PATH_DST_MAP: &str = "KERNEL_PATH_DST";

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPathDst {
    pub original: SocketAddress,
    pub backend: SocketAddress,
    /// CLOCK_MONOTONIC times of the connect and of the handshake's end (zero until
    /// then), for the close event.
    pub connected_at_ns: u64,
    pub established_at_ns: u64,
    /// The cgroup of the process that connected, for `interceptor trace --cgroup`.
    pub cgroup_id: u64,
}

/// The ring buffer through which sockops reports each kernel-path connection's close.
pub const KERNEL_PATH_CLOSES_RING: &str = "KERNEL_PATH_CLOSES";
/// Bytes (a power of two, a multiple of the page size): about 5,000 close events of
/// 104 bytes with their headers before the daemon must have read them.
pub const KERNEL_PATH_CLOSES_RING_BYTES: u32 = 1 << 19;

/// A kernel-path connection that closed, from sockops: its record and its byte counts.
/// `record.established_at_ns` zero: the connect never established (refused, timed out).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPathClose {
    pub record: KernelPathDst,
    /// Bytes the application sent that the backend acknowledged.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub closed_at_ns: u64,
    /// The TCP state the socket closed from, and whether everything it sent, its FIN
    /// included, was acknowledged (snd_una = snd_nxt): the byte counts are in sequence
    /// space, where the SYN and each FIN count one.
    pub old_state: u32,
    pub all_acked: u32,
}

/// Where a redirected connection was going before connect4/6 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    pub dst: SocketAddress,
    pub _pad: [u8; 4],
    /// CLOCK_MONOTONIC time of the redirect, so the daemon can sweep records whose
    /// connection never reached it.
    pub redirected_at_ns: u64,
}

/// A redirected connection's record as sockops hands it to the proxy: read from a
/// ring buffer in the proxy's memory, it costs the proxy no system call. `client` is
/// the client's end of its connection to the proxy: the peer address the proxy sees
/// on the accepted socket (IPv4-mapped for IPv4, as everywhere).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectRecord {
    pub client: SocketAddress,
    pub _pad: [u8; 4],
    pub original: OriginalDst,
}
