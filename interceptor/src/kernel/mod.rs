//! The kernel side seen from the daemon: loading the programs with their globals and
//! attaching them (here), keeping the interception maps in step with the registry
//! (`maps`), reading original destinations (`records`), reporting counters and map
//! occupancy (`stats`), and the system calls aya does not wrap (`sys`).
//!
//! Links are created with `bpf_link` and owned by this process's file descriptors, never
//! pinned: when the daemon exits, however it exits, the kernel detaches the programs and
//! connections go direct instead of to a dead proxy port.

pub mod closes;
mod dns;
mod features;
mod handover;
mod maps;
mod namespaces;
mod records;
mod stats;
mod sys;
mod trace;

use std::{
    collections::BTreeSet,
    fs::File,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};
use interceptor_common::{
    ALLOCATED_VIPS_MAP, AUDIENCES_MAP, BACKENDS_MAP, CLIENT_NAMESPACES_MAP, DNS_CAPTURE_SYMBOL,
    GLOBALS_SYMBOL, Globals, KERNEL_EVENTS_MAP, KERNEL_PATH_CLOSES_RING, KERNEL_PATH_DST_MAP,
    ORIG_BY_CLIENT_MAP, PORT_FILTER_MAP, REDIRECTS_RING, SERVICE_ADDRS_MAP, SERVICE_PORTS_MAP,
    SocketAddress, TRACE_EVENTS_RING, TRACE_SETTINGS_MAP, VIP_REFUSE_SYMBOL,
};
use tracing::{debug, info, warn};

pub use self::{
    dns::DnsListeners,
    records::{OriginalDestinations, RecordSource},
    stats::{KernelEvents, MapOccupancy, MapUsage},
    trace::TraceMaps,
};
use self::{maps::InterceptionMaps, namespaces::ClientNamespaces, stats::InterceptCounts};
use crate::{
    datapath::{self, DatapathMode, Plan, Resolved},
    outlier::{KernelEndpoint, KernelOutliers},
    registry::Registry,
    resolve::DnsCache,
};

static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

const CONNECT4_PROGRAM: &str = "egress_connect4";
const CONNECT6_PROGRAM: &str = "egress_connect6";
const GETPEERNAME4_PROGRAM: &str = "egress_getpeername4";
const GETPEERNAME6_PROGRAM: &str = "egress_getpeername6";
const SOCKOPS_PROGRAM: &str = "egress_sockops";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open cgroup {}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the BPF object")]
    Load(#[from] aya::EbpfError),
    #[error(transparent)]
    Unsupported(#[from] features::Unsupported),
    #[error("BPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("BPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("BPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot duplicate a map descriptor")]
    Dup(#[source] std::io::Error),
    #[error("cannot bind the loopback port that refuses connects to undeclared VIP ports")]
    Refusal(#[source] std::io::Error),
    #[error(
        "a container proxy address needs this network namespace's cookie, and reading it \
         (SO_NETNS_COOKIE, Linux 5.14) failed"
    )]
    NetnsCookie(#[source] std::io::Error),
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
    /// Whether eligible destinations take the kernel path.
    pub datapath: DatapathMode,
    /// Where DNS queries are captured to; none: not captured.
    pub dns: DnsListeners,
    /// A BPF filesystem, through which the previous daemon's kernel-path storage is
    /// taken over (see [`handover`]).
    pub bpf_fs: Option<PathBuf>,
    /// Set: rules intercept only the clients of the namespaces their ServiceEntries
    /// are exported to, and a client outside every known pod is in this namespace.
    /// Unset: every rule intercepts every client.
    pub host_namespace: Option<String>,
}

impl KernelConfig {
    /// The programs' [`Globals`]: the listeners, with port zero for the absent ones.
    fn globals(&self) -> Result<Globals, KernelError> {
        let serves_containers = self.container_proxy.is_some() || self.container_proxy_v6.is_some();
        let proxy_netns_cookie = match sys::own_netns_cookie() {
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
        let listener = |addr: Option<std::net::SocketAddr>| {
            addr.map_or(SocketAddress::NONE, SocketAddress::of)
        };
        Ok(Globals {
            proxy_v4: SocketAddress::of(self.proxy.into()),
            proxy_v6: listener(self.proxy_v6.map(Into::into)),
            container_proxy_v4: listener(self.container_proxy.map(Into::into)),
            container_proxy_v6: listener(self.container_proxy_v6.map(Into::into)),
            bypass_mark: self.bypass_mark,
            host_namespace: self
                .host_namespace
                .as_deref()
                .map_or(0, crate::audience::namespace_id),
            proxy_netns_cookie,
        })
    }
}

/// How often the kernel path looks at the DNS cache for changed answers.
const DNS_FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The interception maps and what they were last synced from.
struct Interceptions {
    maps: InterceptionMaps,
    plan: Plan,
    resolved: Resolved,
    outliers: KernelOutliers,
    /// The endpoints the backend sets were last written without.
    ejected: BTreeSet<KernelEndpoint>,
}

/// The loaded and attached programs and their maps. Dropping it detaches everything.
pub struct Kernel {
    // Field order matters: the maps are dropped after the programs' links. The
    // programs sit behind a lock so shutdown can detach them while the reloader
    // still holds the kernel to sync maps (which is harmless once detached).
    ebpf: Mutex<Option<Ebpf>>,
    interceptions: Mutex<Interceptions>,
    /// The kernel path's close events, until the daemon takes them to follow.
    close_events: Mutex<Option<RingBuf<MapData>>>,
    /// The trace maps, until the daemon takes them for its tracer.
    trace: Mutex<Option<TraceMaps>>,
    original_destinations: Arc<OriginalDestinations>,
    intercept_counts: Arc<InterceptCounts>,
    events: Arc<KernelEvents>,
    cgroup: PathBuf,
    datapath: DatapathMode,
    /// Whether rules are scoped by `exportTo` (see [`KernelConfig::host_namespace`]).
    scoped: bool,
    client_namespaces: Mutex<ClientNamespaces>,
    vips: Mutex<dns::AllocatedVips>,
    /// Held as long as the programs may send connects there.
    _refusal: dns::Refusal,
}

impl Kernel {
    /// Loads the programs and attaches them to `config.cgroup`. The maps start empty,
    /// so nothing is redirected until [`Kernel::sync`] fills them.
    pub fn attach(config: &KernelConfig) -> Result<Self, KernelError> {
        let cgroup = File::open(&config.cgroup).map_err(|source| KernelError::OpenCgroup {
            path: config.cgroup.clone(),
            source,
        })?;
        let globals = config.globals()?;
        let refusal = dns::Refusal::bind()?;
        let staged = handover::StagedStorage::previous(&cgroup, config.bpf_fs.as_deref());
        let dns_capture = config.dns.capture();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBALS_SYMBOL, &globals, true)
            .override_global(DNS_CAPTURE_SYMBOL, &dns_capture, true)
            .override_global(VIP_REFUSE_SYMBOL, &refusal.settings, true)
            .map_max_entries(REDIRECTS_RING, config.redirect_ring_bytes);
        if let Some(staged) = &staged {
            loader.map_pin_path(KERNEL_PATH_DST_MAP, staged.path());
        }
        let mut ebpf = loader.load(PROGRAMS).map_err(features::object_error)?;
        if staged.is_some() {
            info!(
                "sharing the previous daemon's kernel-path storage: getpeername of its connections keeps showing their VIPs"
            );
        }
        drop(staged);

        let interceptions = InterceptionMaps::new(
            take_map(&mut ebpf, SERVICE_ADDRS_MAP)?,
            take_map(&mut ebpf, SERVICE_PORTS_MAP)?,
            take_map(&mut ebpf, PORT_FILTER_MAP)?,
            take_map(&mut ebpf, BACKENDS_MAP)?,
            take_map(&mut ebpf, AUDIENCES_MAP)?,
        );
        let client_namespaces = ClientNamespaces::new(take_map(&mut ebpf, CLIENT_NAMESPACES_MAP)?);
        let original_destinations = Arc::new(OriginalDestinations::new(
            take_map(&mut ebpf, ORIG_BY_CLIENT_MAP)?,
            take_map(&mut ebpf, REDIRECTS_RING)?,
        )?);
        let events = Arc::new(KernelEvents::new(take_map(&mut ebpf, KERNEL_EVENTS_MAP)?));
        let close_events = take_map(&mut ebpf, KERNEL_PATH_CLOSES_RING)?;
        let trace = TraceMaps {
            settings: take_map(&mut ebpf, TRACE_SETTINGS_MAP)?,
            events: take_map(&mut ebpf, TRACE_EVENTS_RING)?,
        };
        let vips = dns::AllocatedVips::new(take_map(&mut ebpf, ALLOCATED_VIPS_MAP)?);

        // With bpf_link, the kernel always attaches as "multi" and rejects any flag, so
        // Single (no flags) still coexists with other programs on the same cgroup.
        // sockops first: a connect4 redirect is only useful once the record can be re-keyed.
        let sockops: &mut SockOps = program(&mut ebpf, SOCKOPS_PROGRAM)?;
        let attached = sockops
            .load()
            .and_then(|()| sockops.attach(&cgroup, CgroupAttachMode::Single));
        features::check(SOCKOPS_PROGRAM, attached.map(drop))?;
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
            let attached = connect
                .load()
                .and_then(|()| connect.attach(&cgroup, CgroupAttachMode::Single));
            // Required programs end the start; optional ones are logged and skipped.
            features::check(name, attached.map(drop))?;
        }
        if config.dns != DnsListeners::default() {
            dns::attach(&mut ebpf, &cgroup)?;
        }
        info!(cgroup = %config.cgroup.display(), "programs attached");

        Ok(Self {
            ebpf: Mutex::new(Some(ebpf)),
            close_events: Mutex::new(Some(close_events)),
            trace: Mutex::new(Some(trace)),
            interceptions: Mutex::new(Interceptions {
                maps: interceptions,
                plan: Plan::default(),
                resolved: Resolved::new(),
                outliers: KernelOutliers::default(),
                ejected: BTreeSet::new(),
            }),
            original_destinations,
            intercept_counts: Arc::default(),
            events,
            cgroup: config.cgroup.clone(),
            datapath: config.datapath,
            scoped: config.host_namespace.is_some(),
            client_namespaces: Mutex::new(client_namespaces),
            vips: Mutex::new(vips),
            _refusal: refusal,
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
    ///
    /// Which path each destination takes is decided here, from `registry` and the
    /// `--datapath` mode (see [`crate::datapath`]).
    pub fn sync(&self, registry: &Registry) -> Result<(), KernelError> {
        let plan = datapath::plan(registry, self.datapath, self.scoped);
        let mut state = self.interceptions.lock().unwrap_or_else(|e| e.into_inner());
        state.plan = plan;
        let applied = self.apply(&mut state);
        // The VIP map is apart from the plan: it refuses what no rule takes.
        applied.and(
            self.vips
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sync(&registry.intercepts().vips),
        )
    }

    /// Resolves the hostnames of kernel-path endpoints through `dns` (served from its
    /// cache while fresh) and rewrites the backend sets whose addresses changed. The
    /// cache decides which addresses are current, for the proxy too: a lookup that
    /// got no answer keeps the last good one, so only a host with no usable answer
    /// loses its addresses here (and its connects are refused).
    pub async fn refresh_dns(&self, dns: &Arc<DnsCache>) -> Result<(), KernelError> {
        let hosts = {
            let state = self.interceptions.lock().unwrap_or_else(|e| e.into_inner());
            state.plan.hosts()
        };
        let mut resolved = Resolved::new();
        for host in hosts {
            let addresses = dns.lookup(&host).await.unwrap_or_else(|error| {
                debug!(%error, "kernel path: no addresses");
                Arc::from([])
            });
            resolved.insert(host, addresses);
        }
        let mut state = self.interceptions.lock().unwrap_or_else(|e| e.into_inner());
        // A reload may have changed the plan meanwhile: hosts it added are resolved
        // by the next refresh, and are on the proxy path until then.
        if state.resolved == resolved {
            return Ok(());
        }
        state.resolved = resolved;
        self.apply(&mut state)
    }

    /// Keeps the kernel-path backend sets of DNS entries in step with the DNS cache,
    /// which refreshes each answer before its TTL runs out.
    pub async fn follow_dns(self: Arc<Self>, dns: Arc<DnsCache>) {
        let mut interval = tokio::time::interval(DNS_FOLLOW_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(error) = self.refresh_dns(&dns).await {
                warn!(error = %crate::report::Chain(&error), "cannot update the kernel path's DNS backends");
            }
            // The same tick ends ejections whose time is up.
            let mut state = self.interceptions.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(error) = self.apply_ejections(&mut state, Instant::now()) {
                warn!(error = %crate::report::Chain(&error), "cannot put ejected endpoints back");
            }
        }
    }

    /// Counts a kernel-path connect of `service`'s port `port` to `endpoint` that
    /// established (`ok`) or not, and rewrites the backend set when that ejects the
    /// endpoint. A connect to an endpoint the set no longer has (a reload or DNS
    /// change since) counts for nothing.
    pub fn connect_outcome(
        &self,
        service: &str,
        port: u16,
        endpoint: SocketAddr,
        ok: bool,
    ) -> Result<(), KernelError> {
        let id = datapath::backend_id(service, port);
        let now = Instant::now();
        let mut state = self.interceptions.lock().unwrap_or_else(|e| e.into_inner());
        let set = state.plan.endpoints(id, &state.resolved);
        if !set.contains(&endpoint) {
            return Ok(());
        }
        let ejected = state.outliers.connected((id, endpoint), ok, &set, now);
        let applied = self.apply_ejections(&mut state, now);
        // Logged once the backend set no longer holds it, so whoever reads the line
        // can count on the next connects going elsewhere.
        if ejected && applied.is_ok() {
            warn!(
                service,
                port,
                %endpoint,
                datapath = "kernel",
                "endpoint ejected after consecutive failed connects"
            );
        }
        applied
    }

    /// Writes the backend sets again when the endpoints ejected at `now` differ from
    /// those they were written without.
    fn apply_ejections(&self, state: &mut Interceptions, now: Instant) -> Result<(), KernelError> {
        let ejected = state.outliers.ejected(now);
        if ejected == state.ejected {
            return Ok(());
        }
        for (_, endpoint) in state.ejected.difference(&ejected) {
            info!(%endpoint, datapath = "kernel", "ejection ended");
        }
        state.ejected = ejected;
        self.apply(state)
    }

    fn apply(&self, state: &mut Interceptions) -> Result<(), KernelError> {
        let wanted = state.plan.rules(&state.resolved, &state.ejected);
        for (service, port, reason) in &wanted.proxied {
            debug!(service, port, reason = reason.label(), "datapath=proxy");
        }
        let applied = state.maps.sync(&wanted);
        let current = state.maps.current();
        self.intercept_counts
            .store(current.addresses.len(), current.ports.len());
        // Logged once the maps hold it, so whoever reads the line can count on the
        // next connects taking these paths.
        if applied.is_ok() {
            info!(
                kernel_path = wanted.backends.len(),
                proxy_path = wanted.proxied.len(),
                "service ports by datapath"
            );
        }
        applied
    }

    /// Writes the namespace of each pod cgroup (by cgroup id) that `exportTo` is
    /// applied by; cgroups not in it are the host's.
    pub fn sync_client_namespaces(
        &self,
        wanted: &std::collections::HashMap<u64, u32>,
    ) -> Result<(), KernelError> {
        self.client_namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync(wanted)
    }

    /// The ring of kernel-path close events, for [`closes::follow`]; once.
    pub fn take_close_events(&self) -> Option<RingBuf<MapData>> {
        self.close_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The trace maps, for [`TraceMaps::connect`]; once.
    pub fn take_trace(&self) -> Option<TraceMaps> {
        self.trace.lock().unwrap_or_else(|e| e.into_inner()).take()
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

/// Takes the map `name` out of the object, typed as the caller wants it; aya checks
/// the key and value sizes against the types.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(map).map_err(map_error(name))
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
