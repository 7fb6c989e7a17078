//! What the kernel programs, the daemon, the integration tests and xtask share.
//!
//! The crate is `no_std` so that the kernel programs can use it. The `std` feature adds
//! the host facts that every userspace part reads the same way; `user` adds the
//! `aya::Pod` impls the daemon needs to put the shared types in maps and globals.
//!
//! Every type the two sides exchange is `#[repr(C)]` with explicit padding, so they
//! agree on the layout byte for byte. Ports are kept in network byte order, exactly as
//! the kernel hands them to the programs, so the hot path never converts.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

mod address;
mod dns;
mod globals;
mod maps;
mod trace;

#[cfg(feature = "std")]
pub mod host;

pub use address::{
    Address, IPV4_MAPPED_PREFIX_BITS, SocketAddress, address_of, ip_of, ipv4_in_mapped,
    ipv4_mapped, mapped_bits, mapped_prefix_len,
};
pub use dns::{
    ALLOCATED_VIPS_CAPACITY, ALLOCATED_VIPS_MAP, DNS_CAPTURE_SYMBOL, DNS_PORT, DnsCapture,
    VIP_REFUSE_SYMBOL, VipRefuse,
};
pub use globals::{GLOBALS_SYMBOL, Globals};
pub use maps::{
    AUDIENCES_CAPACITY, AUDIENCES_MAP, AudienceKey, BACKENDS_CAPACITY, BACKENDS_MAP,
    BackendEndpoint, BackendSet, CLIENT_NAMESPACES_CAPACITY, CLIENT_NAMESPACES_MAP, EVERYONE,
    InterceptRule, KERNEL_EVENTS_MAP, KERNEL_PATH_CLOSES_RING, KERNEL_PATH_CLOSES_RING_BYTES,
    KERNEL_PATH_DST_MAP, KernelEvent, KernelPathClose, KernelPathDst, MAX_BACKEND_ENDPOINTS,
    ORIG_BY_CLIENT_MAP, ORIG_DST_CAPACITY, OriginalDst, PORT_FILTER_MAP, PORT_WORDS, PROXY_PATH,
    REDIRECTS_RING, REDIRECTS_RING_BYTES, RedirectRecord, SERVICE_ADDR_LOOKUP_PREFIX,
    SERVICE_ADDR_PORT_BITS, SERVICE_ADDRS_CAPACITY, SERVICE_ADDRS_MAP, SERVICE_PORTS_CAPACITY,
    SERVICE_PORTS_MAP, ServiceAddrKey, port_bit,
};

pub use trace::{
    TRACE_EVENTS_RING, TRACE_EVENTS_RING_BYTES, TRACE_SETTINGS_MAP, TraceEvent, TraceSettings,
    Verdict,
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::ServiceAddrKey {}
    unsafe impl aya::Pod for super::InterceptRule {}
    unsafe impl aya::Pod for super::AudienceKey {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::SocketAddress {}
    unsafe impl aya::Pod for super::Globals {}
    unsafe impl aya::Pod for super::BackendSet {}
    unsafe impl aya::Pod for super::DnsCapture {}
    unsafe impl aya::Pod for super::VipRefuse {}
    unsafe impl aya::Pod for super::TraceSettings {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<ServiceAddrKey>(), 2 + 2 + 16);
        assert_eq!(size_of::<SocketAddress>(), 16 + 2 + 2);
        assert_eq!(size_of::<OriginalDst>(), 20 + 4 + 8);
        assert_eq!(size_of::<RedirectRecord>(), 20 + 4 + 32);
        assert_eq!(size_of::<Globals>(), 4 * 20 + 4 + 4 + 8);
        assert_eq!(size_of::<InterceptRule>(), 4 + 4 + 4);
        assert_eq!(size_of::<AudienceKey>(), 4 + 4);
        assert_eq!(size_of::<BackendEndpoint>(), 16 + 2 + 2 + 4);
        assert_eq!(
            size_of::<BackendSet>(),
            4 + 4 + 2 + 6 + MAX_BACKEND_ENDPOINTS * 24
        );
        assert_eq!(size_of::<KernelPathDst>(), 2 * 20 + 3 * 8);
        assert_eq!(size_of::<KernelPathClose>(), 64 + 3 * 8 + 2 * 4);
        assert_eq!(size_of::<TraceSettings>(), 4 + 2 + 2 + 8 + 4 + 4 + 2 * 16);
        assert_eq!(size_of::<TraceEvent>(), 8 + 8 + 20 + 4 + 20 + 4);
    }

    #[test]
    fn every_verdict_reads_back_from_its_number() {
        for (index, verdict) in Verdict::ALL.into_iter().enumerate() {
            assert_eq!(verdict as usize, index);
            assert_eq!(Verdict::of(index as u32), Some(verdict));
        }
        assert_eq!(Verdict::of(Verdict::ALL.len() as u32), None);
    }
}
