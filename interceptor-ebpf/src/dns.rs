//! DNS capture without iptables: queries to port 53 go to the daemon's DNS server,
//! and its replies come back with the nameserver's address as their source, so every
//! stub resolver (which checks where a reply came from) accepts them.
//!
//! Unconnected UDP sockets are caught per datagram by sendmsg4/6; connected UDP
//! sockets (glibc's) and TCP are caught at connect by [`capture`], which the connect
//! hooks call first. Each captured socket
//! remembers the nameserver in its storage, where recvmsg4/6 find it for the reply.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use core::{
    mem,
    ptr::{self, read_volatile},
};
use interceptor_common::{
    ALLOCATED_VIPS_CAPACITY, Address, DNS_PORT, DnsCapture, Globals, KernelEvent, OriginalDst,
    SocketAddress, VipRefuse, ipv4_in_mapped, ipv4_mapped,
};

use crate::{
    maps::{ORIGINAL_DST, count, globals},
    redirect::{
        Endpoint, eligible, in_daemon_netns, same_endpoint, set_user_ipv4, set_user_ipv6,
        user_ipv4, user_ipv6,
    },
};

/// sendmsg and recvmsg hooks must return 1: 0 fails the application's call.
const ALLOW: i32 = 1;

/// Set by the loader (see [`interceptor_common::DNS_CAPTURE_SYMBOL`]).
#[unsafe(no_mangle)]
static DNS_CAPTURE: DnsCapture = DnsCapture::OFF;

/// See [`interceptor_common::ALLOCATED_VIPS_MAP`].
#[map]
static ALLOCATED_VIPS: HashMap<Address, u8> =
    HashMap::with_max_entries(ALLOCATED_VIPS_CAPACITY, BPF_F_NO_PREALLOC);

/// Set by the loader (see [`interceptor_common::VIP_REFUSE_SYMBOL`]).
#[unsafe(no_mangle)]
static VIP_REFUSE: VipRefuse = VipRefuse::OFF;

/// Read a word at a time and volatile, as [`globals`] is, so LLVM neither folds the
/// zero initialiser nor splits the read into bytes. Both globals are socket addresses
/// only.
#[inline(always)]
fn read_words<T: Copy, const WORDS: usize>(global: &T) -> T {
    const {
        assert!(mem::size_of::<T>() == WORDS * 4 && mem::align_of::<T>() == 4);
    }
    // SAFETY: `global` is 4-aligned and WORDS words long.
    let words = unsafe { read_volatile(ptr::from_ref(global).cast::<[u32; WORDS]>()) };
    // SAFETY: the same size, and it holds only integers.
    unsafe { mem::transmute_copy::<[u32; WORDS], T>(&words) }
}

#[inline(always)]
fn listeners() -> DnsCapture {
    read_words::<_, { mem::size_of::<DnsCapture>() / 4 }>(&DNS_CAPTURE)
}

/// The listener a query to `dst` goes to: IPv4 (mapped) for IPv4 nameservers, IPv6
/// for native IPv6 ones; the container listeners for a socket outside the daemon's
/// network namespace, which cannot reach its loopback. Port zero: none.
#[inline(always)]
fn listener_for(capture: &DnsCapture, dst: Endpoint, own_netns: bool) -> Endpoint {
    let v4 = ipv4_in_mapped(dst.0).is_some();
    let listener = match (own_netns, v4) {
        (true, true) => capture.v4,
        (true, false) => capture.v6,
        (false, true) => capture.container_v4,
        (false, false) => capture.container_v6,
    };
    (listener.addr, listener.port)
}

/// Where a query from `ctx` to `dst` goes instead, if it is captured: port 53, UDP or
/// TCP, not the daemon's own socket, to the listener the socket's network namespace
/// reaches. The nameserver is recorded in the socket's storage first; if that fails
/// the query goes direct, since its reply would otherwise come from an address the
/// resolver does not expect.
#[inline(always)]
pub fn capture(ctx: &SockAddrContext, globals: &Globals, dst: Endpoint) -> Option<Endpoint> {
    if dst.1 != DNS_PORT {
        return None;
    }
    if eligible(ctx, globals, true).is_err() {
        return None;
    }
    let listener = listener_for(&listeners(), dst, in_daemon_netns(ctx, globals));
    if listener.1 == [0, 0] || same_endpoint(dst, listener) {
        return None;
    }
    let stored = unsafe { ORIGINAL_DST.get_or_insert_ptr_mut(ctx, None) };
    if stored.is_null() {
        count(KernelEvent::StorageUnavailable);
        return None;
    }
    unsafe {
        stored.write(OriginalDst {
            dst: SocketAddress {
                addr: dst.0,
                port: dst.1,
                _pad: [0; 2],
            },
            _pad: [0; 4],
            redirected_at_ns: 0,
        })
    };
    Some(listener)
}

/// The nameserver a reply from `src` (or a TCP socket connected to `src`) stands
/// for, when `src` is a DNS listener and the socket's query was captured. Either
/// listener of the family will do: only a captured socket has a port-53 record, and
/// the record says where it asked.
#[inline(always)]
pub fn nameserver(ctx: &SockAddrContext, src: Endpoint) -> Option<Endpoint> {
    let capture = listeners();
    let is = |listener: Endpoint| listener.1 != [0, 0] && same_endpoint(src, listener);
    if !is(listener_for(&capture, src, true)) && !is(listener_for(&capture, src, false)) {
        return None;
    }
    let stored = unsafe { ORIGINAL_DST.get_ptr_mut(ctx) };
    if stored.is_null() {
        return None;
    }
    let original = unsafe { (*stored).dst };
    (original.port == DNS_PORT).then_some((original.addr, original.port))
}

/// Unconnected UDP: each datagram to a nameserver goes to the DNS listener instead.
#[cgroup_sock_addr(sendmsg4)]
pub fn dns_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_ipv4(ctx.sock_addr);
    if let Some((listener, port)) = capture(&ctx, &globals(), (ipv4_mapped(addr), port))
        && let Some(listener) = ipv4_in_mapped(listener)
    {
        set_user_ipv4(ctx.sock_addr, (listener, port));
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dns_sendmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(listener) = capture(&ctx, &globals(), user_ipv6(ctx.sock_addr)) {
        set_user_ipv6(ctx.sock_addr, listener);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dns_recvmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_ipv4(ctx.sock_addr);
    if let Some((nameserver, port)) = nameserver(&ctx, (ipv4_mapped(addr), port))
        && let Some(nameserver) = ipv4_in_mapped(nameserver)
    {
        set_user_ipv4(ctx.sock_addr, (nameserver, port));
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dns_recvmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(nameserver) = nameserver(&ctx, user_ipv6(ctx.sock_addr)) {
        set_user_ipv6(ctx.sock_addr, nameserver);
    }
    ALLOW
}

/// For connect4 and connect6, once a connect was not intercepted: a TCP connect to
/// an allocated VIP goes to the refusing port, so the application gets
/// ECONNREFUSED at once: a VIP intercepts only the ports its entries declare.
#[inline(always)]
pub fn refuse(ctx: &SockAddrContext, globals: &Globals, dst: Endpoint) -> Option<Endpoint> {
    let in_vip_range = match ipv4_in_mapped(dst.0) {
        Some(v4) => v4[0] == 240 && v4[1] == 240,
        None => {
            let first = dst.0[0].to_ne_bytes();
            let second = dst.0[1].to_ne_bytes();
            first == [0x20, 0x01, 0x00, 0x02] && second[0] == 0 && second[1] == 0
        }
    };
    // The range test first: most connects are to no VIP, and it costs no lookup.
    if !in_vip_range || unsafe { ALLOCATED_VIPS.get(&dst.0) }.is_none() {
        return None;
    }
    let to = refusal(dst)?;
    if eligible(ctx, globals, false).is_err() || !in_daemon_netns(ctx, globals) {
        return None;
    }
    Some(to)
}

/// Where a connect that must fail is sent, in `dst`'s family: the loopback port the
/// daemon holds bound and never listens on, so the connect gets ECONNREFUSED at once.
/// A redirect rather than bpf_set_retval, which kernels before 5.18 lack.
#[inline(always)]
pub fn refusal(dst: Endpoint) -> Option<Endpoint> {
    let refuse = read_words::<_, { mem::size_of::<VipRefuse>() / 4 }>(&VIP_REFUSE);
    let to = if ipv4_in_mapped(dst.0).is_some() {
        refuse.v4
    } else {
        refuse.v6
    };
    (to.port != [0, 0]).then_some((to.addr, to.port))
}
