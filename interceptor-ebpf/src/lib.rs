//! Map types and names shared by the kernel programs and the daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding, so the two sides agree on the
//! layout byte for byte. Addresses and ports are kept in network byte order, exactly as
//! the kernel hands them to the programs, so the hot path never converts.
#![no_std]

/// LPM trie of ServiceEntry `addresses` (IPs and CIDRs), each combined with one port.
pub const SERVICE_ADDRS_MAP: &str = "SERVICE_ADDRS";
/// Ports intercepted for every destination: ServiceEntries without `addresses`.
pub const SERVICE_PORTS_MAP: &str = "SERVICE_PORTS";
/// Original destinations recorded by connect4, until the connection is established.
pub const ORIG_BY_COOKIE_MAP: &str = "ORIG_BY_COOKIE";
/// Original destinations keyed by the client's address, where the proxy can find them.
pub const ORIG_BY_CLIENT_MAP: &str = "ORIG_BY_CLIENT";
/// Original destinations by socket cookie for as long as the client's socket lives, so
/// getpeername() on it shows where the application connected, not the proxy.
pub const PEER_BY_COOKIE_MAP: &str = "PEER_BY_COOKIE";
/// The ring buffer through which sockops hands [`RedirectRecord`]s to the proxy.
pub const REDIRECTS_RING: &str = "REDIRECTS";

/// Global: the proxy listener's IPv4 address, network byte order.
pub const PROXY_ADDR_GLOBAL: &str = "PROXY_ADDR";
/// Global: the proxy listener's port, network byte order.
pub const PROXY_PORT_GLOBAL: &str = "PROXY_PORT";
/// Global: sockets carrying this SO_MARK are the daemon's own and are never redirected.
pub const BYPASS_MARK_GLOBAL: &str = "BYPASS_MARK";

pub const SERVICE_ADDRS_CAPACITY: u32 = 65_536;
pub const SERVICE_PORTS_CAPACITY: u32 = 65_536;
pub const ORIG_DST_CAPACITY: u32 = 262_144;
/// Bytes (a power of two, a multiple of the page size). A record takes 32 bytes with
/// its header, so the proxy may fall 32,768 connections behind before sockops falls
/// back to [`ORIG_BY_CLIENT_MAP`].
pub const REDIRECTS_RING_BYTES: u32 = 1 << 20;

/// Bits of [`ServiceAddrKey`] taken by the port. The port comes first in the key, so
/// every stored prefix covers the whole port and a lookup only ever matches entries for
/// the destination's own port; the longest address prefix among those wins.
pub const SERVICE_ADDR_PORT_BITS: u32 = 16;
/// Prefix length for a lookup of one exact destination.
pub const SERVICE_ADDR_LOOKUP_PREFIX: u32 = SERVICE_ADDR_PORT_BITS + 32;

/// The data part of an LPM trie key for [`SERVICE_ADDRS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAddrKey {
    /// Destination port, network byte order.
    pub port: [u8; 2],
    /// Destination IPv4 address, network byte order.
    pub addr: [u8; 4],
}

/// Value of the interception maps: which registry rule claimed the destination.
/// The kernel only needs to know that something matched; the id helps when reading
/// the maps with bpftool.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterceptRule {
    pub rule_id: u32,
}

/// Where a redirected connection was going before connect4 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
    /// Port, network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// CLOCK_MONOTONIC time of the redirect, so the daemon can sweep records whose
    /// connection never reached it.
    pub redirected_at_ns: u64,
}

/// Key of [`ORIG_BY_CLIENT_MAP`]: the client's end of the connection to the proxy,
/// which is the peer address the proxy sees on the accepted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
    /// Port, network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// A redirected connection's record as sockops hands it to the proxy: read from a
/// ring buffer in the proxy's memory, it costs the proxy no system call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectRecord {
    pub client: ClientAddr,
    pub original: OriginalDst,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::ServiceAddrKey {}
    unsafe impl aya::Pod for super::InterceptRule {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ClientAddr {}
}
