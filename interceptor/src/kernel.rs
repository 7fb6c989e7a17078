//! The kernel side seen from the daemon: loading and attaching the programs, keeping
//! the interception maps in step with the registry, and reading original destinations.
//!
//! Links are created with `bpf_link` and owned by this process's file descriptors, never
//! pinned: when the daemon exits, however it exits, the kernel detaches the programs and
//! connections go direct instead of to a dead proxy port.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs::File,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf,
        lpm_trie::Key,
    },
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};
use interceptor_ebpf::{
    BYPASS_MARK_GLOBAL, CONTAINER_PROXY_ADDR4_GLOBAL, CONTAINER_PROXY_ADDR6_GLOBAL,
    CONTAINER_PROXY_PORT4_GLOBAL, CONTAINER_PROXY_PORT6_GLOBAL, IPV4_MAPPED_PREFIX_BITS,
    InterceptRule, KERNEL_EVENTS_MAP, KernelEvent, ORIG_BY_CLIENT_MAP, ORIG_DST_CAPACITY,
    OriginalDst, PORT_FILTER_MAP, PORT_WORDS, PROXY_ADDR4_GLOBAL, PROXY_ADDR6_GLOBAL,
    PROXY_NETNS_COOKIE_GLOBAL, PROXY_PORT4_GLOBAL, PROXY_PORT6_GLOBAL, REDIRECTS_RING,
    RedirectRecord, SERVICE_ADDR_PORT_BITS, SERVICE_ADDRS_CAPACITY, SERVICE_ADDRS_MAP,
    SERVICE_PORTS_CAPACITY, SERVICE_PORTS_MAP, ServiceAddrKey, SocketAddress, address_of, port_bit,
};
use tracing::{debug, info, warn};

use crate::registry::InterceptSet;

static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

const CONNECT4_PROGRAM: &str = "egress_connect4";
const CONNECT6_PROGRAM: &str = "egress_connect6";
const GETPEERNAME4_PROGRAM: &str = "egress_getpeername4";
const GETPEERNAME6_PROGRAM: &str = "egress_getpeername6";
const SOCKOPS_PROGRAM: &str = "egress_sockops";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open cgroup {}: {source}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("BPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot duplicate a map descriptor: {0}")]
    Dup(#[source] std::io::Error),
    #[error(
        "a container proxy address needs this network namespace's cookie, and reading it \
         (SO_NETNS_COOKIE, Linux 5.14) failed: {0}"
    )]
    NetnsCookie(#[source] std::io::Error),
}

/// The cookie the kernel gives the network namespace this process runs in, which
/// `bpf_get_netns_cookie` returns for sockets created in it.
fn own_netns_cookie() -> std::io::Result<u64> {
    // Any socket will do; an unbound one needs no address in the namespace.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie = 0u64;
    let mut length = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the option writes one u64 into `cookie`, whose size `length` gives.
    let result = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut length,
        )
    };
    if result == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Settings the programs are loaded with.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    pub cgroup: PathBuf,
    /// Where IPv4 connects (and dual-stack sockets' IPv4-mapped ones) are sent.
    pub proxy: SocketAddrV4,
    /// Where native IPv6 connects are sent; without it they are left alone.
    pub proxy_v6: Option<SocketAddrV6>,
    /// Where IPv4 connects from other network namespaces (containers) are sent;
    /// without it they are left alone.
    pub container_proxy: Option<SocketAddrV4>,
    /// The same for their native IPv6 connects.
    pub container_proxy_v6: Option<SocketAddrV6>,
    /// Size of the REDIRECTS ring: a power of two, at least a page.
    pub redirect_ring_bytes: u32,
    pub bypass_mark: u32,
}

/// The loaded and attached programs and their maps. Dropping it detaches everything.
pub struct Kernel {
    // Field order matters: the maps are dropped after the programs' links. The
    // programs sit behind a lock so shutdown can detach them while the reloader
    // still holds the kernel to sync maps (which is harmless once detached).
    ebpf: Mutex<Option<Ebpf>>,
    interceptions: Mutex<InterceptionMaps>,
    original_destinations: Arc<OriginalDestinations>,
    intercept_counts: Arc<InterceptCounts>,
    events: Arc<KernelEvents>,
    cgroup: PathBuf,
}

/// The programs' per-CPU counters of what they could not do.
pub struct KernelEvents(Mutex<PerCpuArray<MapData, u64>>);

impl KernelEvents {
    /// Each event's count so far, summed over the CPUs; an unreadable counter reads 0.
    pub fn read(&self) -> Vec<(KernelEvent, u64)> {
        let counters = self.0.lock().unwrap_or_else(|e| e.into_inner());
        KernelEvent::ALL
            .iter()
            .map(|&event| {
                let total = counters
                    .get(&(event as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (event, total)
            })
            .collect()
    }
}

/// Entries in the interception maps, kept by [`Kernel::sync`], which is the only
/// writer: counting them on every scrape would walk up to 65,536 keys each.
#[derive(Debug, Default)]
struct InterceptCounts {
    addresses: AtomicUsize,
    ports: AtomicUsize,
}

/// How full one BPF map is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// Reads the occupancy of every map; cheap to clone, and keeps working after the
/// programs are detached.
#[derive(Clone)]
pub struct MapOccupancy {
    intercept_counts: Arc<InterceptCounts>,
    original_destinations: Arc<OriginalDestinations>,
    pub events: Arc<KernelEvents>,
}

impl MapOccupancy {
    /// The interception maps from the counts [`Kernel::sync`] keeps; the original
    /// destination maps by walking their keys, which are few in steady state
    /// (records live from connect to accept). May block for a walk of a full map:
    /// call it off the async runtime.
    pub fn read(&self) -> Vec<MapUsage> {
        let by_client = self.original_destinations.in_fallback_map();
        vec![
            MapUsage {
                name: SERVICE_ADDRS_MAP,
                entries: self.intercept_counts.addresses.load(Ordering::Relaxed),
                capacity: SERVICE_ADDRS_CAPACITY,
            },
            MapUsage {
                name: SERVICE_PORTS_MAP,
                entries: self.intercept_counts.ports.load(Ordering::Relaxed),
                capacity: SERVICE_PORTS_CAPACITY,
            },
            MapUsage {
                name: ORIG_BY_CLIENT_MAP,
                entries: by_client,
                capacity: ORIG_DST_CAPACITY,
            },
        ]
    }
}

struct InterceptionMaps {
    addresses: LpmTrie<MapData, ServiceAddrKey, InterceptRule>,
    ports: HashMap<MapData, u16, InterceptRule>,
    port_filter: Array<MapData, u64>,
    /// What `port_filter` holds, word by word.
    port_filter_words: Vec<u64>,
    current: InterceptSet,
}

impl Kernel {
    /// Loads the programs and attaches them to `config.cgroup`. The maps start empty,
    /// so nothing is redirected until [`Kernel::sync`] fills them.
    pub fn attach(config: &KernelConfig) -> Result<Self, KernelError> {
        let cgroup = File::open(&config.cgroup).map_err(|source| KernelError::OpenCgroup {
            path: config.cgroup.clone(),
            source,
        })?;
        let proxy_addr4 = config.proxy.ip().octets();
        let proxy_port4 = config.proxy.port().to_be_bytes();
        // Port zero tells the programs there is no IPv6 listener.
        let proxy_v6 = config
            .proxy_v6
            .map(|proxy| SocketAddress::of(SocketAddr::V6(proxy)));
        let proxy_addr6 = proxy_v6.map_or([0; 4], |proxy| proxy.addr);
        let proxy_port6 = proxy_v6.map_or([0; 2], |proxy| proxy.port);
        let container_v6 = config
            .container_proxy_v6
            .map(|proxy| SocketAddress::of(SocketAddr::V6(proxy)));
        let container_addr6 = container_v6.map_or([0; 4], |proxy| proxy.addr);
        let container_port6 = container_v6.map_or([0; 2], |proxy| proxy.port);
        let container_addr4 = config
            .container_proxy
            .map_or([0; 4], |proxy| proxy.ip().octets());
        let container_port4 = config
            .container_proxy
            .map_or([0; 2], |proxy| proxy.port().to_be_bytes());
        let serves_containers =
            config.container_proxy.is_some() || config.container_proxy_v6.is_some();
        let proxy_netns_cookie = match own_netns_cookie() {
            Ok(cookie) => cookie,
            // Without the cookie every namespace looks like the daemon's, and containers
            // would be sent to their own loopback: the opposite of what was asked.
            Err(error) if serves_containers => return Err(KernelError::NetnsCookie(error)),
            Err(error) => {
                warn!(
                    %error,
                    "cannot read this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14): \
                     connects from every network namespace in the cgroup are redirected, and those \
                     outside this one fail"
                );
                0
            }
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(PROXY_ADDR4_GLOBAL, &proxy_addr4, true)
            .override_global(PROXY_PORT4_GLOBAL, &proxy_port4, true)
            .override_global(PROXY_ADDR6_GLOBAL, &proxy_addr6, true)
            .override_global(PROXY_PORT6_GLOBAL, &proxy_port6, true)
            .override_global(BYPASS_MARK_GLOBAL, &config.bypass_mark, true)
            .override_global(PROXY_NETNS_COOKIE_GLOBAL, &proxy_netns_cookie, true)
            .override_global(CONTAINER_PROXY_ADDR4_GLOBAL, &container_addr4, true)
            .override_global(CONTAINER_PROXY_PORT4_GLOBAL, &container_port4, true)
            .override_global(CONTAINER_PROXY_ADDR6_GLOBAL, &container_addr6, true)
            .override_global(CONTAINER_PROXY_PORT6_GLOBAL, &container_port6, true)
            .map_max_entries(REDIRECTS_RING, config.redirect_ring_bytes)
            .load(PROGRAMS)?;

        let addresses = LpmTrie::try_from(take_map(&mut ebpf, SERVICE_ADDRS_MAP)?)
            .map_err(map_error(SERVICE_ADDRS_MAP))?;
        let ports = HashMap::try_from(take_map(&mut ebpf, SERVICE_PORTS_MAP)?)
            .map_err(map_error(SERVICE_PORTS_MAP))?;
        let port_filter = Array::try_from(take_map(&mut ebpf, PORT_FILTER_MAP)?)
            .map_err(map_error(PORT_FILTER_MAP))?;
        let by_client: HashMap<MapData, SocketAddress, OriginalDst> =
            HashMap::try_from(take_map(&mut ebpf, ORIG_BY_CLIENT_MAP)?)
                .map_err(map_error(ORIG_BY_CLIENT_MAP))?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, REDIRECTS_RING)?)
            .map_err(map_error(REDIRECTS_RING))?;
        let original_destinations = Arc::new(OriginalDestinations::new(by_client, ring)?);
        let events = Arc::new(KernelEvents(Mutex::new(
            PerCpuArray::try_from(take_map(&mut ebpf, KERNEL_EVENTS_MAP)?)
                .map_err(map_error(KERNEL_EVENTS_MAP))?,
        )));

        // With bpf_link, the kernel always attaches as "multi" and rejects any flag, so
        // Single (no flags) still coexists with other programs on the same cgroup.
        // sockops first: a connect4 redirect is only useful once the record can be re-keyed.
        let sockops: &mut SockOps = program(&mut ebpf, SOCKOPS_PROGRAM)?;
        sockops.load().map_err(program_error(SOCKOPS_PROGRAM))?;
        sockops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(program_error(SOCKOPS_PROGRAM))?;
        // connect6 handles native IPv6 and dual-stack sockets connecting to IPv4-mapped
        // addresses; the getpeername hooks show applications their original
        // destination. They go on first, so no redirected socket ever reports the
        // proxy as its peer.
        for name in [
            GETPEERNAME4_PROGRAM,
            GETPEERNAME6_PROGRAM,
            CONNECT4_PROGRAM,
            CONNECT6_PROGRAM,
        ] {
            let connect: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            connect.load().map_err(program_error(name))?;
            connect
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
        }
        info!(cgroup = %config.cgroup.display(), "programs attached");

        Ok(Self {
            ebpf: Mutex::new(Some(ebpf)),
            interceptions: Mutex::new(InterceptionMaps {
                addresses,
                ports,
                port_filter,
                port_filter_words: vec![0; 2 * PORT_WORDS as usize],
                current: InterceptSet::default(),
            }),
            original_destinations,
            intercept_counts: Arc::default(),
            events,
            cgroup: config.cgroup.clone(),
        })
    }

    /// Brings the interception maps to `wanted` in an order that never drops a
    /// destination both old and new config intercept: add new keys, then update
    /// changed values, then delete stale keys.
    ///
    /// If a step fails, the maps hold part of the change. The next sync (a rollback
    /// to the running config, or a later reload) then rewrites every wanted key and
    /// deletes every key either side may have left, so it converges however far the
    /// failed one got.
    pub fn sync(&self, wanted: &InterceptSet) -> Result<(), KernelError> {
        let mut maps = self.interceptions.lock().unwrap_or_else(|e| e.into_inner());
        let old_addresses: StdHashMap<_, _> = maps
            .current
            .addresses
            .iter()
            .map(|(net, port, id)| ((*net, *port), *id))
            .collect();
        let new_addresses: StdHashMap<_, _> = wanted
            .addresses
            .iter()
            .map(|(net, port, id)| ((*net, *port), *id))
            .collect();
        let old_ports: StdHashMap<_, _> = maps.current.ports.iter().copied().collect();
        let new_ports: StdHashMap<_, _> = wanted.ports.iter().copied().collect();

        let applied = apply_changes(
            &mut maps,
            (&old_addresses, &new_addresses),
            (&old_ports, &new_ports),
        );
        maps.current = match &applied {
            Ok(()) => {
                debug!(
                    addresses = wanted.addresses.len(),
                    ports = wanted.ports.len(),
                    "interception maps synced"
                );
                wanted.clone()
            }
            // Unknown values make the next sync rewrite every key; keys from both
            // sides make it delete whatever it no longer wants.
            Err(_) => InterceptSet {
                addresses: old_addresses
                    .keys()
                    .chain(new_addresses.keys())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .map(|(net, port)| (*net, *port, UNKNOWN_RULE))
                    .collect(),
                ports: old_ports
                    .keys()
                    .chain(new_ports.keys())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .map(|port| (*port, UNKNOWN_RULE))
                    .collect(),
            },
        };
        self.intercept_counts
            .addresses
            .store(maps.current.addresses.len(), Ordering::Relaxed);
        self.intercept_counts
            .ports
            .store(maps.current.ports.len(), Ordering::Relaxed);
        applied
    }

    /// What the interception maps hold now: after a failed [`Kernel::sync`], part of
    /// the wanted set may be in place.
    pub fn current_intercepts(&self) -> InterceptSet {
        let maps = self.interceptions.lock().unwrap_or_else(|e| e.into_inner());
        maps.current.clone()
    }

    pub fn map_occupancy(&self) -> MapOccupancy {
        MapOccupancy {
            intercept_counts: Arc::clone(&self.intercept_counts),
            original_destinations: Arc::clone(&self.original_destinations),
            events: Arc::clone(&self.events),
        }
    }

    pub fn original_destinations(&self) -> Arc<OriginalDestinations> {
        Arc::clone(&self.original_destinations)
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Takes connect4 and connect6 off, so nothing new is sent to the proxy. sockops
    /// stays: a connect rewritten just before still needs its record when its
    /// handshake completes, or the proxy would find none and reset it.
    pub fn stop_redirecting(&self) {
        let mut programs = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ebpf) = programs.as_mut() else {
            return;
        };
        for name in [CONNECT4_PROGRAM, CONNECT6_PROGRAM] {
            let unloaded = program::<CgroupSockAddr>(ebpf, name)
                .and_then(|connect| connect.unload().map_err(program_error(name)));
            if let Err(error) = unloaded {
                // Dropping everything in `detach` still takes it off.
                warn!(%error, "cannot detach {name} ahead of the other programs");
            }
        }
        info!(cgroup = %self.cgroup.display(), "stopped redirecting");
    }

    /// Detaches the programs now, so new connections go direct while the proxy drains.
    /// The maps stay, so records of connections already redirected can still be read.
    pub fn detach(&self) {
        let programs = self.ebpf.lock().unwrap_or_else(|e| e.into_inner()).take();
        if programs.is_some() {
            drop(programs);
            info!(cgroup = %self.cgroup.display(), "programs detached");
        }
    }
}

/// A rule id no registry produces (ids are service indexes), standing for "this key
/// may or may not be in the map, with any value".
const UNKNOWN_RULE: u32 = u32::MAX;

type AddressRules = StdHashMap<(ipnet::IpNet, u16), u32>;
type PortRules = StdHashMap<u16, u32>;

fn apply_changes(
    maps: &mut InterceptionMaps,
    (old_addresses, new_addresses): (&AddressRules, &AddressRules),
    (old_ports, new_ports): (&PortRules, &PortRules),
) -> Result<(), KernelError> {
    // Ports of both configs pass the filter while the rules change, and only the new
    // config's once they have.
    let old_filter = port_filter_words(old_addresses, old_ports);
    let new_filter = port_filter_words(new_addresses, new_ports);
    let both: Vec<u64> = old_filter
        .iter()
        .zip(&new_filter)
        .map(|(old, new)| old | new)
        .collect();
    write_port_filter(maps, &both)?;
    let (added, changed): (Vec<_>, Vec<_>) = new_addresses
        .iter()
        .filter(|(key, id)| old_addresses.get(key) != Some(id))
        .partition(|(key, _)| !old_addresses.contains_key(key));
    for ((net, port), id) in added.into_iter().chain(changed) {
        maps.addresses
            .insert(&address_key(*net, *port), InterceptRule { rule_id: *id }, 0)
            .map_err(map_error(SERVICE_ADDRS_MAP))?;
    }
    let (added, changed): (Vec<_>, Vec<_>) = new_ports
        .iter()
        .filter(|(port, id)| old_ports.get(port) != Some(id))
        .partition(|(port, _)| !old_ports.contains_key(port));
    for (port, id) in added.into_iter().chain(changed) {
        maps.ports
            .insert(*port, InterceptRule { rule_id: *id }, 0)
            .map_err(map_error(SERVICE_PORTS_MAP))?;
    }
    for (net, port) in old_addresses
        .keys()
        .filter(|key| !new_addresses.contains_key(key))
    {
        ignore_missing(maps.addresses.remove(&address_key(*net, *port)))
            .map_err(map_error(SERVICE_ADDRS_MAP))?;
    }
    for port in old_ports
        .keys()
        .filter(|port| !new_ports.contains_key(port))
    {
        ignore_missing(maps.ports.remove(port)).map_err(map_error(SERVICE_PORTS_MAP))?;
    }
    write_port_filter(maps, &new_filter)
}

/// The [`PORT_FILTER_MAP`] bitmaps for a set of rules.
fn port_filter_words(addresses: &AddressRules, ports: &PortRules) -> Vec<u64> {
    let mut words = vec![0; 2 * PORT_WORDS as usize];
    for (_, port) in addresses.keys() {
        let (word, bit) = port_bit(*port);
        words[word as usize] |= bit;
    }
    for port in ports.keys() {
        let (word, bit) = port_bit(*port);
        words[(PORT_WORDS + word) as usize] |= bit;
    }
    words
}

/// Writes the words that differ from what the map holds.
fn write_port_filter(maps: &mut InterceptionMaps, wanted: &[u64]) -> Result<(), KernelError> {
    for (index, &word) in wanted.iter().enumerate() {
        if maps.port_filter_words[index] != word {
            maps.port_filter
                .set(index as u32, word, 0)
                .map_err(map_error(PORT_FILTER_MAP))?;
            maps.port_filter_words[index] = word;
        }
    }
    Ok(())
}

/// A delete of a key that is already gone has done its job: after a failed sync the
/// daemon only knows which keys may be present.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(aya::sys::SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// IPv4 networks go in IPv4-mapped, as the programs look IPv4 destinations up.
fn address_key(network: ipnet::IpNet, port: u16) -> Key<ServiceAddrKey> {
    let prefix_len = match network {
        ipnet::IpNet::V4(network) => IPV4_MAPPED_PREFIX_BITS + network.prefix_len(),
        ipnet::IpNet::V6(network) => network.prefix_len(),
    };
    Key::new(
        SERVICE_ADDR_PORT_BITS + u32::from(prefix_len),
        ServiceAddrKey {
            port: port.to_be_bytes(),
            _pad: [0; 2],
            addr: address_of(network.network()),
        },
    )
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelError> {
    ebpf.take_map(name).ok_or(KernelError::MissingMap(name))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?;
    program.try_into().map_err(program_error(name))
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

fn program_error(name: &'static str) -> impl Fn(ProgramError) -> KernelError {
    move |source| KernelError::Program { name, source }
}

/// The records connect4 and sockops leave for the proxy.
pub struct OriginalDestinations {
    /// Records sockops handed over through the ring buffer, not yet claimed.
    handed_over: Mutex<HandedOver>,
    /// A private descriptor of the by-client map, where sockops leaves records when the
    /// ring is full; taking one costs one lock-free syscall.
    by_client_fd: OwnedFd,
    /// A typed handle for the sweeper, which is rare and may take a lock.
    by_client: Mutex<HashMap<MapData, SocketAddress, OriginalDst>>,
}

struct HandedOver {
    ring: RingBuf<MapData>,
    unclaimed: StdHashMap<SocketAddress, OriginalDst>,
}

impl HandedOver {
    /// Moves every record in the ring into `unclaimed`. A record is in the ring before
    /// its connection can be accepted: sockops writes it when the client's handshake
    /// completes, before the ACK that puts the connection in the accept queue.
    fn drain_ring(&mut self) {
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<RedirectRecord>() {
                continue;
            }
            // SAFETY: sockops wrote a whole RedirectRecord, plain integers and bytes;
            // the ring gives no alignment guarantee, hence the unaligned read.
            let record =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RedirectRecord>()) };
            // A newer record for the same client address replaces an unclaimed older
            // one: that connection is gone, or its address could not be reused.
            self.unclaimed.insert(record.client, record.original);
        }
    }
}

/// Where the proxy found a connection's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordSource {
    /// The ring buffer, read in the proxy's own memory.
    Ring,
    /// The fallback map, with a system call.
    Map,
}

impl OriginalDestinations {
    fn new(
        by_client: HashMap<MapData, SocketAddress, OriginalDst>,
        ring: RingBuf<MapData>,
    ) -> Result<Self, KernelError> {
        let by_client_fd = IterableMap::map(&by_client)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(KernelError::Dup)?;
        Ok(Self {
            handed_over: Mutex::new(HandedOver {
                ring,
                unclaimed: StdHashMap::new(),
            }),
            by_client_fd,
            by_client: Mutex::new(by_client),
        })
    }

    /// Takes the original destination of the connection whose client end is `client`,
    /// so no other accept can claim it. `None` means the connection was not redirected.
    pub fn take(&self, client: SocketAddr) -> Option<(SocketAddr, RecordSource)> {
        let key = SocketAddress::of(client);
        let handed_over = {
            let mut handed_over = self.handed_over.lock().unwrap_or_else(|e| e.into_inner());
            handed_over.drain_ring();
            handed_over.unclaimed.remove(&key)
        };
        let (original, source) = match handed_over {
            Some(original) => (original, RecordSource::Ring),
            None => {
                let mut value = std::mem::MaybeUninit::<OriginalDst>::uninit();
                if !lookup_and_delete(&self.by_client_fd, &key, value.as_mut_ptr()) {
                    return None;
                }
                // SAFETY: the kernel filled the whole value on success.
                (unsafe { value.assume_init() }, RecordSource::Map)
            }
        };
        Some((original.dst.socket_addr(), source))
    }

    /// Entries in the by-client map, capped at its capacity: a walk that races with
    /// deletions can restart from the first key.
    pub fn in_fallback_map(&self) -> usize {
        let by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        by_client.keys().take(ORIG_DST_CAPACITY as usize).count()
    }

    /// Deletes records older than `max_age`: connections that were redirected but
    /// never reached the proxy. Returns how many were removed.
    pub fn sweep(&self, max_age: Duration) -> usize {
        let now = monotonic_ns();
        let cutoff = now.saturating_sub(max_age.as_nanos() as u64);
        let unclaimed_removed = {
            let mut handed_over = self.handed_over.lock().unwrap_or_else(|e| e.into_inner());
            handed_over.drain_ring();
            let before = handed_over.unclaimed.len();
            handed_over
                .unclaimed
                .retain(|_, original| original.redirected_at_ns >= cutoff);
            before - handed_over.unclaimed.len()
        };
        let mut by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        let stale_clients: Vec<SocketAddress> = by_client
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, original)| original.redirected_at_ns < cutoff)
            .map(|(key, _)| key)
            .collect();
        unclaimed_removed
            + stale_clients
                .iter()
                .filter(|key| by_client.remove(key).is_ok())
                .count()
    }
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM: one syscall, atomic, so two accepts can never
/// claim one record.
fn lookup_and_delete<K, V>(map: &OwnedFd, key: &K, value: *mut V) -> bool {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: attr points at live key and value buffers of the map's sizes.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    result == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_filter_has_a_bit_per_port_with_rules_of_each_kind() {
        let addresses: AddressRules = [
            (("240.240.0.0/16".parse().unwrap(), 443), 1),
            (("2001:2::/64".parse().unwrap(), 443), 2),
            (("198.18.0.10/32".parse().unwrap(), 65_535), 3),
        ]
        .into();
        let ports: PortRules = [(0, 4), (5432, 5)].into();
        let words = port_filter_words(&addresses, &ports);
        let set = |offset: u32, port: u16| {
            let (word, bit) = port_bit(port);
            words[(offset + word) as usize] & bit != 0
        };
        let with_addresses: Vec<u16> = (0..=u16::MAX).filter(|&port| set(0, port)).collect();
        let with_port_rule: Vec<u16> = (0..=u16::MAX)
            .filter(|&port| set(PORT_WORDS, port))
            .collect();
        assert_eq!(with_addresses, [443, 65_535]);
        assert_eq!(with_port_rule, [0, 5432]);
        assert_eq!(words.len(), 2 * PORT_WORDS as usize);
    }
}
