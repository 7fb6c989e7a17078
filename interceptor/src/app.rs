//! Wiring: bind the admin server, load config, bind the proxy, attach the programs,
//! serve and reload, shut down.

use std::{
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    signal::unix::{Signal, SignalKind},
    sync::Semaphore,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    address_file::{self, AddressFile, AddressFileError, Addresses},
    admin::{self, AdminError, AdminState, Phase, Readiness},
    config::kubernetes,
    copy::{CopyMode, PipeBudget},
    kernel::{DnsListeners, Kernel, KernelConfig, KernelError},
    limits::{self, ConnectionLimits},
    load::{self, LoadError},
    metrics::Metrics,
    proxy::workers::{ContainerAddrs, ProxyListeners, Workers},
    proxy::{self, OutboundPolicy, ProxyConfig, Shared, tracking::ConnectionTable},
    registry::{Registry, StateError, StateFile},
    reload::{self, Reloader},
    resolve::{DnsCache, DnsSettings, dns::DnsSetupError},
    systemd,
    trace::Tracer,
};

/// Records older than this never reached the proxy: their client gave up or the
/// accept queue overflowed.
const UNCLAIMED_RECORD_MAX_AGE: Duration = Duration::from_secs(60);
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How long after connect4 comes off the proxy still takes connects it rewrote: a
/// handshake with a proxy on the same host takes microseconds.
const IN_FLIGHT_REDIRECTS: Duration = Duration::from_millis(100);
/// How often a daemon on a free admin port checks whether the configured one came free.
const ADMIN_RECLAIM_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub config_paths: Vec<PathBuf>,
    pub cgroup: PathBuf,
    pub proxy_addr: SocketAddrV4,
    /// The IPv6 listener, for native IPv6 destinations; `None` leaves them alone.
    pub proxy_addr_v6: Option<SocketAddrV6>,
    /// The listeners for containers in other network namespaces; a family without one
    /// leaves their connects alone.
    pub container_proxy_addrs: ContainerAddrs,
    pub redirect_ring_bytes: u32,
    pub bypass_mark: u32,
    /// Whether eligible destinations take the kernel path.
    pub datapath: crate::datapath::DatapathMode,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub dns: DnsSettings,
    /// Where VIP allocations are kept across restarts.
    pub state_dir: PathBuf,
    /// A BPF filesystem for taking over the previous daemon's kernel-path storage.
    pub bpf_fs: Option<PathBuf>,
    /// The DNS server; `None` runs none.
    pub dns_server: Option<crate::dns::DnsConfig>,
    pub outbound_policy: OutboundPolicy,
    pub sniff_timeout: Duration,
    pub copy_mode: CopyMode,
    /// Proxy threads, each with its own listener and runtime.
    pub workers: usize,
    /// How long an idle worker spins before it blocks; zero never spins.
    pub busy_poll: Duration,
    /// None: derived from the open-files limit.
    pub max_connections: Option<usize>,
    pub admin_addr: SocketAddr,
    pub admin_allow_non_loopback: bool,
    /// Where to keep the addresses this daemon really listens on.
    pub address_file: Option<PathBuf>,
    /// Read config objects from the Kubernetes API too.
    pub kubernetes: Option<kubernetes::Options>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Dns(#[from] DnsSetupError),
    #[error(transparent)]
    DnsServer(#[from] crate::dns::DnsStartError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the proxy workers")]
    Workers(#[source] proxy::workers::WorkersError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    AddressFile(#[from] AddressFileError),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeError),
    #[error("cannot read the cgroup tree under {} to find pods' cgroups", root.display())]
    PodCgroups {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stopped by {0} while waiting for the initial list from the Kubernetes API")]
    StoppedStarting(&'static str),
}

/// A daemon that serves: its programs attached, its listeners bound, its config
/// applied. [`Bound::wait_termination`] runs it until a signal and shuts it down.
pub struct Bound {
    terminate: Signal,
    interrupt: Signal,
    drain_timeout: Duration,
    admin_state: Arc<AdminState>,
    kernel: Arc<Kernel>,
    stop_reloading: CancellationToken,
    reloader: JoinHandle<()>,
    shutdown: CancellationToken,
    workers: Workers,
    sweeper: JoinHandle<()>,
    connections: TaskTracker,
    admin_server: JoinHandle<()>,
    admin_reclaim: Option<JoinHandle<()>>,
    address_file: Option<Arc<AddressFile>>,
}

/// Starts the daemon and serves until SIGTERM or SIGINT.
pub async fn run(config: RunConfig) -> Result<(), AppError> {
    build(config).await?.wait_termination().await
}

/// Binds the admin server, loads config, binds the proxy, attaches the programs and
/// starts serving and reloading.
pub async fn build(config: RunConfig) -> Result<Bound, AppError> {
    // Before anything slow: SIGHUP's default action would kill a daemon that is
    // still starting, and a SIGTERM then must wait for a clean shutdown.
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(AppError::Signals);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let hangup = signal(SignalKind::hangup())?;
    if let Some(path) = &config.address_file {
        AddressFile::clear_stale(path)?;
    }

    // Listening comes before attaching, so no connection is ever redirected to a
    // closed port; and before the admin server, which reports the port bound.
    let listeners = ProxyListeners::bind(
        config.proxy_addr,
        config.proxy_addr_v6,
        config.container_proxy_addrs,
        config.workers,
    )
    .map_err(|(addr, source)| AppError::Listen { addr, source })?;
    let (proxy_v4, proxy_v6, container_proxy) = (listeners.v4, listeners.v6, listeners.containers);
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(ArcSwap::from_pointee(Registry::default()));
    let instance = address_file::new_instance();
    let tracer = Tracer::new(metrics.trace_streams.clone());
    let admin_state = Arc::new(AdminState {
        instance,
        readiness: Readiness::default(),
        config_paths: config.config_paths.clone(),
        proxy_addrs: listeners.addrs(),
        registry: Arc::clone(&registry),
        connections: ConnectionTable::new(Arc::clone(&metrics), Arc::clone(&tracer)),
        metrics: Arc::clone(&metrics),
        maps: OnceLock::new(),
        explain: OnceLock::new(),
        tracer: Arc::clone(&tracer),
    });
    // First, so a readiness probe during start-up gets a 503, not a refused connection.
    let admin_listener = admin::bind(config.admin_addr, config.admin_allow_non_loopback).await?;
    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin_addr);
    let admin_server = tokio::spawn(admin::serve(admin_listener, Arc::clone(&admin_state)));
    let address_file = match &config.address_file {
        Some(path) => Some(Arc::new(AddressFile::create(
            path.clone(),
            Addresses {
                admin: admin_addr,
                proxy: admin_state.proxy_addrs.clone(),
                pid: std::process::id(),
                instance,
            },
        )?)),
        None => None,
    };
    let admin_reclaim = (admin_addr.port() != config.admin_addr.port()
        && config.admin_addr.port() != 0)
        .then(|| {
            // Weak: the file goes when the daemon lets go of it, on every way out,
            // aborted task or not.
            let address_file = address_file.as_ref().map(Arc::downgrade);
            tokio::spawn(admin::reclaim(
                config.admin_addr,
                Arc::clone(&admin_state),
                ADMIN_RECLAIM_INTERVAL,
                move |addr| {
                    if let Some(file) = address_file.and_then(|file| file.upgrade()) {
                        file.admin_moved(addr);
                    }
                },
            ))
        });

    let mut config_watch = reload::ConfigWatch::start(&config.config_paths);
    let mut kube_source = None;
    if let Some(options) = &config.kubernetes {
        metrics.config_source.enable();
        let (changed, changes) = tokio::sync::mpsc::channel(1);
        let source =
            kubernetes::KubeSource::start(options.clone(), Arc::clone(&metrics), changed).await?;
        info!("waiting for the initial list of every kind from the Kubernetes API");
        // Ready only once every kind is applied: a partial config would let traffic
        // to the missing services go direct.
        tokio::select! {
            () = source.wait_listed() => {}
            _ = terminate.recv() => return Err(AppError::StoppedStarting("SIGTERM")),
            _ = interrupt.recv() => return Err(AppError::StoppedStarting("SIGINT")),
        }
        config_watch = config_watch.with_kubernetes(changes);
        kube_source = Some(Arc::new(source));
    }
    let objects = kube_source
        .as_ref()
        .map(|source| source.config_set())
        .unwrap_or_default();
    let state = StateFile::in_dir(&config.state_dir);
    let kept = state.read()?;
    let initial = Arc::new(load::load_and_log(&config.config_paths, objects, &kept)?);
    if initial.allocations() != &kept {
        state.write(initial.allocations())?;
    }
    // Before the DNS server starts: next to a running daemon (SO_REUSEPORT) it gets
    // captured queries at once, and from an empty registry it would answer NXDOMAIN
    // for every ServiceEntry host until the programs attached.
    registry.store(Arc::clone(&initial));
    let dns = DnsCache::new(config.dns.clone())?;
    let _ = admin_state.explain.set(admin::ExplainContext {
        datapath: config.datapath,
        outbound_policy: config.outbound_policy,
        cgroup: config.cgroup.clone(),
        dns: Arc::clone(&dns),
        scope: config
            .kubernetes
            .as_ref()
            .zip(kube_source.as_ref())
            .map(|(options, source)| admin::ExportScope {
                host_namespace: options.host_namespace.clone(),
                pods: Arc::clone(source),
            }),
    });
    let shutdown = CancellationToken::new();
    // Served once the reloader exists; lookups wait for it meanwhile, within bounds.
    let (allocation_requests, allocation_queue) = tokio::sync::mpsc::channel(64);
    // Before the programs attach: a captured query must find the server listening.
    let dns_listeners = match &config.dns_server {
        Some(dns_server) => {
            let bound = crate::dns::start(
                dns_server,
                Arc::clone(&registry),
                metrics.dns_queries.clone(),
                allocation_requests,
                &shutdown,
            )?;
            info!(?bound.listeners, "DNS server listening");
            DnsListeners::from_bound(&bound.listeners, &bound.containers)
        }
        None => DnsListeners::default(),
    };

    let kernel = Arc::new(Kernel::attach(&KernelConfig {
        cgroup: config.cgroup.clone(),
        proxy: proxy_v4,
        proxy_v6,
        container_proxy: container_proxy.v4,
        container_proxy_v6: container_proxy.v6,
        redirect_ring_bytes: config.redirect_ring_bytes,
        bypass_mark: config.bypass_mark,
        datapath: config.datapath,
        dns: dns_listeners,
        bpf_fs: config.bpf_fs.clone(),
        host_namespace: config
            .kubernetes
            .as_ref()
            .map(|options| options.host_namespace.clone()),
    })?);
    if let Some(source) = &kube_source {
        // Before the first rules: until then every client would count as the host's.
        let found = crate::pods::client_namespaces(&config.cgroup, &source.pod_namespaces())
            .map_err(|source| AppError::PodCgroups {
                root: config.cgroup.clone(),
                source,
            })?;
        kernel.sync_client_namespaces(&found)?;
        tokio::spawn(crate::pods::follow(
            Arc::clone(&kernel),
            Arc::clone(source),
            config.cgroup.clone(),
        ));
    }
    kernel.sync(&initial)?;
    // DNS entries take the kernel path once their hostnames are resolved.
    kernel.refresh_dns(&dns).await?;
    tokio::spawn(Arc::clone(&kernel).follow_dns(Arc::clone(&dns)));
    if let Some(closes) = kernel.take_close_events() {
        tokio::spawn(crate::kernel::closes::follow(
            closes,
            Arc::clone(&registry),
            Arc::clone(&metrics),
            Arc::clone(&kernel),
            Arc::clone(&tracer),
        ));
    }
    if let Some(trace) = kernel.take_trace() {
        trace.connect(&tracer);
    }
    let _ = admin_state.maps.set(kernel.map_occupancy());
    metrics
        .vips_allocated
        .set(initial.allocations().hosts.len() as i64);
    metrics.config_applied();

    let original_destinations = kernel.original_destinations();
    let shared = Arc::new(Shared {
        registry: Arc::clone(&registry),
        original_destinations: Arc::clone(&original_destinations),
        dns,
        config: ProxyConfig {
            bypass_mark: config.bypass_mark,
            connect_timeout: config.connect_timeout,
            outbound_policy: config.outbound_policy,
            sniff_timeout: config.sniff_timeout,
            copy_mode: config.copy_mode,
        },
        connections: Arc::clone(&admin_state.connections),
        // Filled once the workers run, so their descriptors are counted first.
        connection_slots: Arc::new(Semaphore::new(0)),
        pipes: PipeBudget::new(0),
    });
    let connections = TaskTracker::new();
    let listener_count = listeners.count();
    let workers = proxy::workers::start(
        listeners,
        config.busy_poll,
        &shared,
        &connections,
        &shutdown,
    )
    .map_err(AppError::Workers)?;
    let ConnectionLimits {
        max_connections,
        splice_pipes,
    } = limits::connection_limits(listener_count, config.copy_mode, config.max_connections);
    shared.connection_slots.add_permits(max_connections);
    shared.pipes.grant(splice_pipes);
    metrics.connections_limit.set(max_connections as i64);
    info!(max_connections, splice_pipes, "connection limit");
    if splice_pipes == 0 && config.copy_mode == CopyMode::Splice {
        warn!(
            "the open-files limit leaves no descriptors for splice pipes beside \
             --max-connections; bulk transfers are copied in user space"
        );
    }
    let sweeper = tokio::spawn(async move {
        let mut interval = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            interval.tick().await;
            let removed = original_destinations.sweep(UNCLAIMED_RECORD_MAX_AGE);
            if removed > 0 {
                info!(removed, "swept unclaimed redirect records");
            }
        }
    });
    let stop_reloading = CancellationToken::new();
    let reloads = Arc::new(Reloader {
        config_paths: config.config_paths.clone(),
        registry: Arc::clone(&registry),
        kernel: Arc::clone(&kernel),
        metrics: Arc::clone(&metrics),
        state,
        kubernetes: kube_source,
        applying: Default::default(),
    });
    let wildcard_names = config
        .dns_server
        .as_ref()
        .map_or(0, |dns| dns.wildcard_names);
    tokio::spawn(reload::allocate(
        Arc::clone(&reloads),
        allocation_queue,
        wildcard_names,
    ));
    let reloader = tokio::spawn(reload::run(
        reloads,
        config_watch,
        hangup,
        stop_reloading.clone(),
    ));

    admin_state.readiness.set(Phase::Serving);
    systemd::ready();
    info!(
        proxy = %proxy_v4,
        proxy_v6 = proxy_v6.map_or_else(|| "none".to_owned(), |addr| addr.to_string()),
        container_proxy = container_proxy.v4.map_or_else(|| "none".to_owned(), |addr| addr.to_string()),
        container_proxy_v6 = container_proxy.v6.map_or_else(|| "none".to_owned(), |addr| addr.to_string()),
        admin = %admin_addr,
        cgroup = %config.cgroup.display(),
        services = registry.load().services().len(),
        "ready"
    );
    Ok(Bound {
        terminate,
        interrupt,
        drain_timeout: config.drain_timeout,
        admin_state,
        kernel,
        stop_reloading,
        reloader,
        shutdown,
        workers,
        sweeper,
        connections,
        admin_server,
        admin_reclaim,
        address_file,
    })
}

impl Bound {
    /// Serves until SIGTERM or SIGINT, then shuts down in order: redirects off,
    /// in-flight connects finished, programs detached, reloads and accepts stopped,
    /// connections drained (up to the drain timeout), workers ended.
    pub async fn wait_termination(self) -> Result<(), AppError> {
        let Self {
            mut terminate,
            mut interrupt,
            drain_timeout,
            admin_state,
            kernel,
            stop_reloading,
            reloader,
            shutdown,
            mut workers,
            sweeper,
            connections,
            admin_server,
            admin_reclaim,
            address_file,
        } = self;
        let signal = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        info!(signal, "shutting down");
        admin_state.readiness.set(Phase::Draining);
        systemd::stopping();
        // Stop redirecting first: new connections go direct rather than to a proxy
        // that is closing. Connects rewritten just before are still completing their
        // handshakes; the rest of the programs and the listeners stay until they have.
        kernel.stop_redirecting();
        tokio::time::sleep(IN_FLIGHT_REDIRECTS).await;
        kernel.detach();
        stop_reloading.cancel();
        let _ = reloader.await;
        shutdown.cancel();
        workers.stopped_accepting().await;
        sweeper.abort();
        connections.close();
        if tokio::time::timeout(drain_timeout, connections.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = connections.len(),
                "drain timeout reached; closing the remaining connections"
            );
        }
        workers.finish().await;
        admin_server.abort();
        if let Some(reclaim) = admin_reclaim {
            reclaim.abort();
        }
        drop(address_file);
        info!("stopped");
        Ok(())
    }
}
