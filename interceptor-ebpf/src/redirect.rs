//! The decision the connect hooks share: is this connect to an intercepted destination,
//! and if so, record where it was going; if not, why not. Also the checks every hook
//! makes on a socket before it looks at the destination (DNS capture and the VIP
//! refusal too), and the context accessors they and the getpeername hooks share.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns,
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use core::ptr::{read_volatile, write_volatile};
use interceptor_common::{
    Address, AudienceKey, EVERYONE, Globals, KernelEvent, KernelPathDst, OriginalDst, PORT_WORDS,
    PROXY_PATH, SERVICE_ADDR_LOOKUP_PREFIX, ServiceAddrKey, SocketAddress, Verdict, ipv4_in_mapped,
    port_bit,
};

use crate::maps::{
    AUDIENCES, BACKENDS, CLIENT_NAMESPACES, KERNEL_PATH_DST, ORIGINAL_DST, PORT_FILTER,
    SERVICE_ADDRS, SERVICE_PORTS, count,
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// A socket address as the hooks see it: the address (IPv4-mapped for IPv4) and the
/// port in network byte order.
pub type Endpoint = (Address, [u8; 2]);

/// An IPv4 socket address, both parts in network byte order.
pub type Ipv4Endpoint = ([u8; 4], [u8; 2]);

/// Where a connect may be sent: the proxy's listener in its own network namespace, and
/// the address it listens on for other namespaces (containers). Port zero means none:
/// plain values rather than `Option`s, whose unset payload LLVM may copy from a
/// register the verifier counts as unread.
pub struct Proxies {
    pub own_netns: Endpoint,
    pub other_netns: Endpoint,
}

/// What a connect hook does with an intercepted connect.
pub enum Redirect {
    /// To the proxy's listener; the original destination is in `ORIGINAL_DST`.
    Proxy(Endpoint),
    /// Straight to this backend (the kernel path); the original destination and the
    /// backend are in `KERNEL_PATH_DST`.
    Backend(Endpoint),
    /// The service has no endpoint: the connect fails at once with ECONNREFUSED
    /// instead of hanging.
    Refuse,
}

/// What connect4/6 do with a connect to `dst`, and where it goes: a DNS query to the
/// daemon's DNS server, an intercepted destination to the proxy or a backend, a
/// VIP's undeclared port to the refusing port. Port zero in the endpoint: the connect
/// is left alone, for the reason the verdict gives, or (`NoEndpoint`) must fail.
/// `ipv4_socket`: the socket is AF_INET, so only an IPv4 backend can take it.
#[inline(always)]
pub fn connect(
    ctx: &SockAddrContext,
    globals: &Globals,
    dst: Endpoint,
    proxies: Proxies,
    ipv4_socket: bool,
) -> (Verdict, Endpoint) {
    if let Some(listener) = crate::dns::capture(ctx, globals, dst) {
        return (Verdict::Dns, listener);
    }
    match redirect(ctx, globals, dst, proxies, ipv4_socket) {
        Ok(Redirect::Proxy(to)) => (Verdict::Proxy, to),
        Ok(Redirect::Backend(to)) => (Verdict::Backend, to),
        Ok(Redirect::Refuse) => (
            Verdict::NoEndpoint,
            crate::dns::refusal(dst).unwrap_or(NOWHERE),
        ),
        // Not exported to this client: as if no entry named the destination for it,
        // which an allocated VIP's refusal would contradict.
        Err(Verdict::NotExported) => (Verdict::NotExported, NOWHERE),
        Err(reason) => match crate::dns::refuse(ctx, globals, dst) {
            Some(to) => (Verdict::UndeclaredVipPort, to),
            None => (reason, NOWHERE),
        },
    }
}

/// Whether the connecting task's namespace (its pod's, or the host's) is one of
/// `audience`'s: the rule's ServiceEntry is exported to it.
#[inline(always)]
fn in_audience(globals: &Globals, audience: u32) -> bool {
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let namespace = unsafe { CLIENT_NAMESPACES.get(&cgroup) }
        .copied()
        .unwrap_or(globals.host_namespace);
    unsafe {
        AUDIENCES.get(&AudienceKey {
            audience,
            namespace,
        })
    }
    .is_some()
}

/// The endpoint of a connect that stays where it was.
pub const NOWHERE: Endpoint = ([0; 4], [0; 2]);

/// The checks every hook makes on the socket before it looks at the destination:
/// TCP (or, with `udp_too`, UDP), a socket there, and not the daemon's own (the
/// bypass mark).
#[inline(always)]
pub fn eligible(ctx: &SockAddrContext, globals: &Globals, udp_too: bool) -> Result<(), Verdict> {
    let sock_addr = ctx.sock_addr;
    // Each context field is read on its own: LLVM would otherwise merge neighbouring
    // reads into one wide load, which the verifier rejects for this context.
    let protocol = unsafe { read_volatile(&(*sock_addr).protocol) };
    if protocol != IPPROTO_TCP && !(udp_too && protocol == IPPROTO_UDP) {
        return Err(Verdict::NotTcp);
    }
    let sk = unsafe { (*sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return Err(Verdict::NoSocket);
    }
    let mark = unsafe { read_volatile(&(*sk).mark) };
    if mark != 0 && mark == globals.bypass_mark {
        return Err(Verdict::BypassMark);
    }
    Ok(())
}

/// Whether the connecting socket is in the daemon's network namespace, where its
/// loopback listeners are reachable. A zero cookie (a kernel without SO_NETNS_COOKIE)
/// counts every namespace as the daemon's.
#[inline(always)]
pub fn in_daemon_netns(ctx: &SockAddrContext, globals: &Globals) -> bool {
    let own = globals.proxy_netns_cookie;
    own == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == own
}

/// Where the connect of `ctx` to `dst` must be sent instead, if it is intercepted; the
/// original destination is then recorded in the socket's own storage. If it is not,
/// why not.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    globals: &Globals,
    dst: Endpoint,
    proxies: Proxies,
    ipv4_socket: bool,
) -> Result<Redirect, Verdict> {
    eligible(ctx, globals, false)?;

    let (addr, port) = dst;
    let (word, bit) = port_bit(u16::from_be_bytes(port));
    let has_address_rules = PORT_FILTER.get(word).is_some_and(|words| words & bit != 0);
    let has_port_rule = PORT_FILTER
        .get(word + PORT_WORDS)
        .is_some_and(|words| words & bit != 0);
    // The bitmaps only filter: the rule maps stay the truth, so a bit set a moment
    // before its rule is added (or cleared a moment after) changes nothing. An address
    // rule beats a port rule, as in the registry's lookup.
    let address_rule = if has_address_rules {
        SERVICE_ADDRS
            .get(&Key::new(
                SERVICE_ADDR_LOOKUP_PREFIX,
                ServiceAddrKey {
                    port,
                    _pad: [0; 2],
                    addr,
                },
            ))
            .map(|rule| (rule.backends, rule.audience))
    } else {
        None
    };
    let (backends, audience) = match address_rule {
        Some(rule) => rule,
        None if has_port_rule => unsafe { SERVICE_PORTS.get(&u16::from_be_bytes(port)) }
            .map(|rule| (rule.backends, rule.audience))
            .ok_or(Verdict::NoRule)?,
        None => return Err(Verdict::NoRule),
    };
    if audience != EVERYONE && !in_audience(globals, audience) {
        return Err(Verdict::NotExported);
    }
    if backends != PROXY_PATH
        && let Some(kernel_path) = kernel_path(ctx, dst, backends, ipv4_socket)
    {
        return Ok(kernel_path);
    }

    // A container or pod in a network namespace of its own cannot reach the proxy's
    // loopback address: it goes to the address the proxy has for containers, or, if
    // there is none, direct.
    let own_netns = in_daemon_netns(ctx, globals);
    let proxy = if own_netns {
        proxies.own_netns
    } else {
        proxies.other_netns
    };
    if proxy.1 == [0, 0] {
        return Err(if own_netns {
            Verdict::NoListener
        } else {
            Verdict::OtherNetns
        });
    }
    if same_endpoint(dst, proxy) {
        return Err(Verdict::ToProxy);
    }

    let original = OriginalDst {
        dst: SocketAddress {
            addr,
            port,
            _pad: [0; 2],
        },
        _pad: [0; 4],
        redirected_at_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Without a record the proxy would refuse the connection, so fail open instead.
    // A socket may connect again after a failed connect: its storage is overwritten.
    let stored = unsafe { ORIGINAL_DST.get_or_insert_ptr_mut(ctx, None) };
    if stored.is_null() {
        count(KernelEvent::StorageUnavailable);
        return Err(Verdict::NoStorage);
    }
    unsafe { stored.write(original) };
    Ok(Redirect::Proxy(proxy))
}

/// The kernel path: picks the backend from the destination's backend set. `None`
/// leaves the connect to the proxy path: the set is not there (a reload is between
/// writing the rule and the set), or an AF_INET socket drew an IPv6 backend.
#[inline(always)]
fn kernel_path(
    ctx: &SockAddrContext,
    dst: Endpoint,
    backends: u32,
    ipv4_socket: bool,
) -> Option<Redirect> {
    let set = unsafe { BACKENDS.get(&backends) }?;
    let backend = if set.keep_address_port != [0, 0] {
        (dst.0, set.keep_address_port)
    } else {
        let count = set.count;
        let total = set.total_weight;
        if count == 0 || total == 0 {
            return Some(Redirect::Refuse);
        }
        let ticket = unsafe { bpf_get_prandom_u32() } % total;
        let mut chosen = None;
        for endpoint in &set.endpoints {
            if ticket < endpoint.cumulative_weight {
                chosen = Some((endpoint.addr, endpoint.port));
                break;
            }
        }
        chosen?
    };
    if ipv4_socket && ipv4_in_mapped(backend.0).is_none() {
        return None;
    }
    let record = KernelPathDst {
        original: SocketAddress {
            addr: dst.0,
            port: dst.1,
            _pad: [0; 2],
        },
        backend: SocketAddress {
            addr: backend.0,
            port: backend.1,
            _pad: [0; 2],
        },
        connected_at_ns: unsafe { bpf_ktime_get_ns() },
        established_at_ns: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    // Without the record the connection still works; only getpeername shows the
    // backend instead of the address the application asked for.
    let stored = unsafe { KERNEL_PATH_DST.get_or_insert_ptr_mut(ctx, None) };
    if stored.is_null() {
        count(KernelEvent::StorageUnavailable);
    } else {
        unsafe { stored.write(record) };
    }
    Some(Redirect::Backend(backend))
}

/// Where an IPv4 connect may go, as IPv4-mapped endpoints.
#[inline(always)]
pub fn proxies_for_ipv4(globals: &Globals) -> Proxies {
    Proxies {
        own_netns: endpoint(globals.proxy_v4),
        other_netns: endpoint(globals.container_proxy_v4),
    }
}

/// Where an AF_INET6 socket reaching `addr` may go: the IPv4 listeners (as IPv4-mapped
/// addresses) for a dual-stack socket reaching an IPv4 destination, the IPv6 ones for
/// native IPv6.
#[inline(always)]
pub fn proxies_for_ipv6_socket(globals: &Globals, addr: Address) -> Proxies {
    if ipv4_in_mapped(addr).is_some() {
        proxies_for_ipv4(globals)
    } else {
        Proxies {
            own_netns: endpoint(globals.proxy_v6),
            other_netns: endpoint(globals.container_proxy_v6),
        }
    }
}

#[inline(always)]
fn endpoint(listener: SocketAddress) -> Endpoint {
    (listener.addr, listener.port)
}

impl Proxies {
    /// Whether a socket connected to `peer` was connected to one of the proxies.
    #[inline(always)]
    pub fn contain(&self, peer: Endpoint) -> bool {
        let is = |proxy: Endpoint| proxy.1 != [0, 0] && same_endpoint(peer, proxy);
        is(self.own_netns) || is(self.other_netns)
    }
}

/// Word by word: a whole-array compare may become a library call BPF does not have.
#[inline(always)]
pub fn same_endpoint(a: Endpoint, b: Endpoint) -> bool {
    a.0[0] == b.0[0] && a.0[1] == b.0[1] && a.0[2] == b.0[2] && a.0[3] == b.0[3] && a.1 == b.1
}

/// The IPv4 address and port of a connect4/getpeername4 context.
#[inline(always)]
pub fn user_ipv4(sock_addr: *mut bpf_sock_addr) -> Ipv4Endpoint {
    // Each context field is read on its own: the verifier rejects merged loads.
    let addr = unsafe { read_volatile(&(*sock_addr).user_ip4) }.to_ne_bytes();
    (addr, user_port(sock_addr))
}

#[inline(always)]
pub fn set_user_ipv4(sock_addr: *mut bpf_sock_addr, (addr, port): Ipv4Endpoint) {
    unsafe { write_volatile(&mut (*sock_addr).user_ip4, u32::from_ne_bytes(addr)) };
    set_user_port(sock_addr, port);
}

/// The address (IPv6 or IPv4-mapped) and port of a connect6/getpeername6 context.
#[inline(always)]
pub fn user_ipv6(sock_addr: *mut bpf_sock_addr) -> Endpoint {
    // One 32-bit read per word: the verifier rejects wider loads of user_ip6.
    let addr = [0, 1, 2, 3].map(|word| unsafe { read_volatile(&(*sock_addr).user_ip6[word]) });
    (addr, user_port(sock_addr))
}

#[inline(always)]
pub fn set_user_ipv6(sock_addr: *mut bpf_sock_addr, (addr, port): Endpoint) {
    for (word, value) in addr.into_iter().enumerate() {
        unsafe { write_volatile(&mut (*sock_addr).user_ip6[word], value) };
    }
    set_user_port(sock_addr, port);
}

/// user_port holds the port in network byte order in its first two bytes in memory.
#[inline(always)]
fn user_port(sock_addr: *mut bpf_sock_addr) -> [u8; 2] {
    let word = unsafe { read_volatile(&(*sock_addr).user_port) }.to_ne_bytes();
    [word[0], word[1]]
}

#[inline(always)]
fn set_user_port(sock_addr: *mut bpf_sock_addr, port: [u8; 2]) {
    let word = u32::from_ne_bytes([port[0], port[1], 0, 0]);
    unsafe { write_volatile(&mut (*sock_addr).user_port, word) };
}
