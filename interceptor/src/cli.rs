//! The command line: `run`, `validate`, `ready`, `explain` and `trace`.

use std::{
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use interceptor_common::host::cgroup2_root;
use nix::unistd::{SysconfVar, sysconf};
use tracing_subscriber::EnvFilter;

use crate::{
    address_file::AddressFile,
    app, config,
    copy::CopyMode,
    limits,
    load::{self, LoadError},
    probe,
    proxy::{OutboundPolicy, workers::ContainerAddrs},
    report::Chain,
    resolve::DnsSettings,
};

/// eBPF transparent egress interceptor for Istio ServiceEntry configuration.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach the programs and run the proxy until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// Check configuration files; exit 1 if any error is found.
    Validate(ValidateArgs),
    /// Ask a running daemon whether it is serving; exit 0 if it is, 1 if not. For
    /// exec readiness probes and scripts.
    Ready(ReadyArgs),
    /// Ask a running daemon what it does with a connect to ADDR:PORT: whether it is
    /// intercepted and why, which ServiceEntry takes it, by which path, to which
    /// endpoints, under which DestinationRule, and what DNS says.
    Explain(ExplainArgs),
    /// Print a running daemon's decisions as they happen, one line each, until
    /// interrupted: what connect4/6 did with each connect and why, where the proxy
    /// sent each connection and how it ended, and each kernel-path close.
    Trace(TraceArgs),
}

#[derive(Debug, clap::Args)]
struct TraceArgs {
    /// Only connects from this cgroup (v2) and those below it, as a path under the
    /// cgroup2 mount or absolute. The proxy's lines carry no cgroup and are not
    /// narrowed by it.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Only destinations in this network (ADDR or ADDR/LEN).
    #[arg(long)]
    dest: Option<ipnet::IpNet>,
    /// Only destinations on this port.
    #[arg(long)]
    port: Option<u16>,
    #[arg(long, value_enum, default_value_t = ValidateOutput::Text)]
    output: ValidateOutput,
    #[command(flatten)]
    daemon: ReadyArgs,
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The destination the application connects to.
    destination: SocketAddr,
    /// The TLS SNI the client sends, for ports that route by it.
    #[arg(long, conflicts_with = "host")]
    sni: Option<String>,
    /// The HTTP Host header the client sends, for ports that route by it.
    #[arg(long)]
    host: Option<String>,
    /// The client's cgroup (v2), as a path under the cgroup2 mount or absolute.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ValidateOutput::Text)]
    output: ValidateOutput,
    #[command(flatten)]
    daemon: ReadyArgs,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct ReadyArgs {
    /// The file the daemon keeps with --address-file: asks that daemon, wherever its
    /// admin server ended up (a daemon started next to another takes a free port).
    #[arg(long)]
    address_file: Option<PathBuf>,
    /// Ask whatever daemon serves at this admin address.
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// ServiceEntry YAML files or directories of them.
    #[arg(long = "config", required_unless_present = "kubernetes", num_args = 1..)]
    config: Vec<PathBuf>,
    /// Also read ServiceEntries, WorkloadEntries, VirtualServices, DestinationRules
    /// and pods from the Kubernetes API, through in-cluster config, or KUBECONFIG or
    /// --kubeconfig outside a cluster. Ready once every kind has been listed.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig file for --kubernetes.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// A namespace to read with --kubernetes (repeatable); default: all.
    #[arg(long = "namespace", requires = "kubernetes")]
    namespaces: Vec<String>,
    /// The namespace whose ServiceEntries (by exportTo) processes outside every pod
    /// see: host processes, with --kubernetes, which scopes each ServiceEntry to the
    /// pods of the namespaces it is exported to.
    #[arg(long, requires = "kubernetes", default_value = "default")]
    host_namespace: String,
    /// This node's name, as the source of the Events posted on rejected objects
    /// (--kubernetes). Default: the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The cgroup (v2) whose connections are intercepted. Defaults to the cgroup2
    /// root, which intercepts the whole host.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where the proxy listens for redirected IPv4 connections (dual-stack sockets'
    /// included).
    #[arg(long, default_value = "127.0.0.1:15001", value_parser = parse_proxy_addr::<SocketAddrV4>)]
    proxy_addr: SocketAddrV4,
    /// Where the proxy listens for redirected native IPv6 connections, or `off` to
    /// leave IPv6 destinations alone. Without IPv6 on the host it is off by itself.
    #[arg(long, default_value = "[::1]:15001", value_parser = parse_proxy_addr_v6)]
    proxy_addr_v6: ProxyAddrV6,
    /// Where connects from processes in other network namespaces (containers, pods) in
    /// the cgroup are redirected: an IPv4 address of this host they can reach, such as
    /// the container bridge's or the node's, never loopback. The proxy listens there
    /// too and answers only connections its programs redirected, so it relays nothing
    /// for anyone else. Without it, their connects go direct. The DNS server listens
    /// there too, at its --dns-listen port, and their captured queries go to it; it
    /// answers whoever reaches that port, so keep the address off outside networks.
    #[arg(long, value_parser = parse_container_proxy_addr::<SocketAddrV4>)]
    container_proxy_addr: Option<SocketAddrV4>,
    /// The same for native IPv6 connects from other network namespaces: an IPv6
    /// address of this host they can reach, as `[ADDR]:PORT`. Without it, they go
    /// direct.
    #[arg(long, value_parser = parse_container_proxy_addr::<SocketAddrV6>)]
    container_proxy_addr_v6: Option<SocketAddrV6>,
    /// Which path intercepted connections take: `auto` sends eligible ones (plain TCP
    /// ports of entries with IP endpoints or resolution NONE, and no routing that
    /// needs the bytes) straight to their backend from the connect hook, the rest
    /// through the proxy; `proxy` sends every one through the proxy.
    #[arg(long, value_enum, default_value_t = crate::datapath::DatapathMode::Auto)]
    datapath: crate::datapath::DatapathMode,
    /// SO_MARK on the proxy's own upstream sockets, which connect4 never redirects.
    #[arg(long, default_value = "0x1e57", value_parser = parse_u32)]
    bypass_mark: u32,
    /// Upstream connect deadline, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// How long open connections may finish after SIGTERM, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// What happens to intercepted traffic that matches no service (Istio's
    /// outboundTrafficPolicy): forwarded to its original destination, or refused.
    #[arg(long, value_enum, default_value_t = OutboundPolicy::AllowAny)]
    outbound_policy: OutboundPolicy,
    /// How long a client on a TLS or HTTP port-only port has to send its ClientHello
    /// or request head, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    sniff_timeout_ms: u64,
    /// How the proxy moves bytes.
    #[arg(long, value_enum, default_value_t = CopyMode::Splice)]
    copy_mode: CopyMode,
    /// Proxy threads, each accepting on its own SO_REUSEPORT listener. Default: the
    /// CPUs this process may use (cgroup CPU limits included).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
    /// The longest an idle proxy thread spins, watching for the next event, before
    /// it blocks. The window adapts to the gaps between the worker's events, like
    /// guest halt-polling, so a worker whose events come closer together than this
    /// spins through them and its next packet finds it running instead of having to
    /// wake it: less latency per request/response round trip, for more CPU while
    /// traffic flows. After a burst, and between requests spaced wider
    /// than this, a worker spins at most a quarter of it before blocking. While one
    /// worker's window is open this wide, every worker spins with it, keeping the
    /// CPUs awake for the threads it wakes. Timers, such as connect timeouts, may
    /// fire late by up to this long, more when other threads want the CPU. 0 never
    /// spins; at most 10000.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    busy_poll_us: u32,
    /// The most connections the proxy serves at once; more wait in the kernel's
    /// accept queue until one ends, rather than being accepted without the
    /// descriptors to serve them. Default: three quarters of the descriptors the
    /// open-files limit leaves after what the daemon holds at start and a margin, two
    /// per connection; the other quarter is for splice pipes.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Bytes of the ring buffer through which sockops hands each redirected
    /// connection's original destination to the proxy: a power of two, at least a
    /// page. At 64 bytes a record, the default holds 32,768 connections the proxy has
    /// not accepted yet; past that, records go to a map the proxy reads with a system
    /// call (`interceptor_redirect_records_total{source="map"}` counts them).
    #[arg(long, default_value_t = interceptor_common::REDIRECTS_RING_BYTES, value_parser = parse_ring_bytes)]
    redirect_ring_bytes: u32,
    /// A DNS server to use instead of /etc/resolv.conf's (repeatable).
    #[arg(long = "dns-server")]
    dns_servers: Vec<SocketAddr>,
    /// Run the DNS server, which answers A and AAAA for ServiceEntry hosts and
    /// relays every other query to the --dns-server servers (or /etc/resolv.conf's).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    dns_capture: Switch,
    /// Where the daemon keeps state across restarts: the VIPs it allocated to hosts
    /// (vips.json), so they never move.
    #[arg(long, default_value = "/var/lib/interceptor")]
    state_dir: PathBuf,
    /// A BPF filesystem through which a restarted daemon takes over its
    /// predecessor's kernel-path socket storage, so that getpeername on connections
    /// opened before the restart keeps showing their VIPs. Nothing stays pinned
    /// there. Default: the first BPF filesystem mounted (usually /sys/fs/bpf).
    #[arg(long)]
    bpf_fs: Option<PathBuf>,
    /// Where the DNS server listens, UDP and TCP (repeatable).
    #[arg(long = "dns-listen", default_values = ["127.0.0.1:15053", "[::1]:15053"])]
    dns_listen: Vec<SocketAddr>,
    /// At most this many names looked up under DYNAMIC_DNS wildcard hosts get VIPs of
    /// their own; lookups of further names are relayed upstream, as for any name.
    #[arg(long, default_value_t = 1024)]
    dns_wildcard_names: usize,
    /// Lower clamp on DNS record TTLs, in seconds.
    #[arg(long, default_value_t = 1)]
    dns_min_ttl: u64,
    /// Upper clamp on DNS record TTLs, in seconds.
    #[arg(long, default_value_t = 300)]
    dns_max_ttl: u64,
    /// How long a failed lookup is cached, in seconds.
    #[arg(long, default_value_t = 5)]
    dns_negative_ttl: u64,
    /// How long past its TTL a host's last good DNS answer is still used while
    /// lookups get no answer (a silent server, a local error), in seconds. An
    /// answer that the host has no address ends it at once.
    #[arg(long, default_value_t = crate::resolve::dns::DEFAULT_STALE_TTL.as_secs())]
    dns_stale_ttl: u64,
    /// Timeout of one DNS query, in milliseconds (a lookup makes at most two).
    #[arg(long, default_value_t = 2000)]
    dns_timeout_ms: u64,
    /// Where the admin server listens: /healthz/ready, /config_dump, /connections,
    /// /explain, /trace, /metrics. Loopback only, unless --admin-allow-non-loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Allow a non-loopback --admin-addr. The admin server has no authentication and
    /// shows the config and every live connection.
    #[arg(long)]
    admin_allow_non_loopback: bool,
    /// Keep the addresses this daemon really listens on (admin server, proxy) in
    /// this JSON file, and remove it on exit. They differ from the configured ones
    /// when another daemon held those at start; `interceptor ready --address-file`
    /// reads it. The admin server also serves at its configured address once that is
    /// free, and the file then names that. One file per daemon.
    #[arg(long)]
    address_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ValidateArgs {
    /// ServiceEntry YAML files or directories of them.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// `text`: one line per finding; `json`: machine-readable findings.
    #[arg(long, value_enum, default_value_t = ValidateOutput::Text)]
    output: ValidateOutput,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ValidateOutput {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_ring_bytes(raw: &str) -> Result<u32, String> {
    let bytes: u32 = raw.parse().map_err(|error| format!("{raw}: {error}"))?;
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |page| page.max(4096)) as u32;
    if bytes.is_power_of_two() && bytes >= page {
        Ok(bytes)
    } else {
        Err(format!(
            "{bytes} must be a power of two of at least the page size ({page})"
        ))
    }
}

/// `Option` itself would make clap treat the flag as optional, not as "off".
#[derive(Debug, Clone, Copy)]
struct ProxyAddrV6(Option<SocketAddrV6>);

fn parse_proxy_addr_v6(raw: &str) -> Result<ProxyAddrV6, String> {
    if raw == "off" {
        return Ok(ProxyAddrV6(None));
    }
    parse_proxy_addr(raw)
        .map(|addr| ProxyAddrV6(Some(addr)))
        .map_err(|error| match raw.parse::<SocketAddrV6>() {
            Ok(_) => error,
            Err(_) => format!("{raw} is neither an IPv6 socket address ([::1]:15001) nor `off`"),
        })
}

/// A connect to the unspecified address reaches loopback, so a redirected socket
/// would never show the proxy address its records are handed over for.
fn parse_proxy_addr<Addr>(raw: &str) -> Result<Addr, String>
where
    Addr: std::str::FromStr + Into<std::net::SocketAddr> + Copy,
{
    parse_listen_addr(
        raw,
        std::net::IpAddr::is_unspecified,
        "the proxy needs a specific address, such as 127.0.0.1 or ::1",
    )
}

fn parse_container_proxy_addr<Addr>(raw: &str) -> Result<Addr, String>
where
    Addr: std::str::FromStr + Into<std::net::SocketAddr> + Copy,
{
    parse_listen_addr(
        raw,
        |ip| ip.is_loopback() || ip.is_unspecified(),
        "containers cannot reach this host on a loopback or unspecified address; \
         give one of its addresses on their network",
    )
}

/// A socket address of `Addr`'s family whose IP `refused` does not reject (`why`).
fn parse_listen_addr<Addr>(
    raw: &str,
    refused: impl Fn(&std::net::IpAddr) -> bool,
    why: &str,
) -> Result<Addr, String>
where
    Addr: std::str::FromStr + Into<std::net::SocketAddr> + Copy,
{
    let addr: Addr = raw
        .parse()
        .map_err(|_| format!("{raw} is not a socket address of this family"))?;
    if refused(&Into::<std::net::SocketAddr>::into(addr).ip()) {
        return Err(format!("{raw}: {why}"));
    }
    Ok(addr)
}

fn parse_u32(raw: &str) -> Result<u32, String> {
    let parsed = match raw.strip_prefix("0x").or_else(|| raw.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => raw.parse(),
    };
    match parsed {
        Ok(0) => Err("the bypass mark must not be 0: unmarked sockets would bypass".into()),
        Ok(value) => Ok(value),
        Err(error) => Err(error.to_string()),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("interceptor: {}", report(&error));
                ExitCode::FAILURE
            }
        },
        Command::Validate(args) => validate(&args),
        Command::Ready(args) => ready(&args),
        Command::Explain(args) => explain(&args),
        Command::Trace(args) => trace(&args),
    }
}

fn trace(args: &TraceArgs) -> ExitCode {
    let traced = || -> anyhow::Result<()> {
        let (admin, _) = admin_of(&args.daemon)?;
        let mut query = Vec::new();
        if let Some(cgroup) = &args.cgroup {
            query.push(format!(
                "cgroup={}",
                crate::explain::percent_encode(&cgroup.display().to_string())
            ));
        }
        if let Some(dest) = args.dest {
            query.push(format!(
                "dest={}",
                crate::explain::percent_encode(&dest.to_string())
            ));
        }
        if let Some(port) = args.port {
            query.push(format!("port={port}"));
        }
        if matches!(args.output, ValidateOutput::Json) {
            query.push("output=json".to_owned());
        }
        let path = format!("/trace?{}", query.join("&"));
        let stdout = std::io::stdout();
        probe::stream(admin, &path, |line| {
            // Empty lines are the server's heartbeat.
            if !line.is_empty() {
                let mut out = stdout.lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Ok(())
        })?;
        anyhow::bail!("the daemon at {admin} ended the trace (shutting down?)")
    };
    match traced() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("interceptor: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// The admin address of the daemon `args` names.
fn admin_of(args: &ReadyArgs) -> anyhow::Result<(SocketAddr, Option<u64>)> {
    match (&args.address_file, args.admin_addr) {
        (Some(path), _) => {
            let addresses = AddressFile::read(path)?;
            Ok((addresses.admin, Some(addresses.instance)))
        }
        (None, Some(admin)) => Ok((admin, None)),
        (None, None) => unreachable!("clap requires one of them"),
    }
}

fn explain(args: &ExplainArgs) -> ExitCode {
    let asked = || -> anyhow::Result<String> {
        let (admin, _) = admin_of(&args.daemon)?;
        let mut path = format!(
            "/explain?dest={}",
            crate::explain::percent_encode(&args.destination.to_string())
        );
        for (key, value) in [
            ("sni", args.sni.clone()),
            ("host", args.host.clone()),
            (
                "cgroup",
                args.cgroup.as_ref().map(|path| path.display().to_string()),
            ),
        ] {
            if let Some(value) = value {
                path.push_str(&format!(
                    "&{key}={}",
                    crate::explain::percent_encode(&value)
                ));
            }
        }
        if matches!(args.output, ValidateOutput::Json) {
            path.push_str("&output=json");
        }
        let answer = probe::get(admin, &path, probe::PROBE_TIMEOUT * 5)?;
        if answer.status != 200 {
            anyhow::bail!(
                "the admin server at {admin} answered {}: {}",
                answer.status,
                answer.body.trim()
            );
        }
        Ok(answer.body)
    };
    match asked() {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("interceptor: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}

fn ready(args: &ReadyArgs) -> ExitCode {
    let (admin, instance) = match admin_of(args) {
        Ok(found) => found,
        Err(error) => {
            eprintln!("interceptor: {}", report(&error));
            return ExitCode::FAILURE;
        }
    };
    match probe::ready(admin, instance, probe::PROBE_TIMEOUT) {
        Ok(body) => {
            println!("{body} ({admin})");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("interceptor: {}", Chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, outermost first: each error says only its own part.
fn report(error: &anyhow::Error) -> String {
    Chain(error.as_ref()).to_string()
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // kube's client logs an error for every failed request, with no context; the
        // daemon reports each failure itself (start-up's one line, a watch's warning).
        .add_directive(
            "kube_client::client::builder=off"
                .parse()
                .expect("a valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    limits::raise_open_files_limit();
    let cgroup = match args.cgroup {
        Some(cgroup) => cgroup,
        None => cgroup2_root().context("finding the cgroup2 root")?,
    };
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    // The proxy runs on its own threads (see proxy::workers); this runtime only
    // serves the admin endpoints, reloads, DNS refreshes and signals.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(app::run(app::RunConfig {
        config_paths: args.config,
        cgroup,
        proxy_addr: args.proxy_addr,
        proxy_addr_v6: args.proxy_addr_v6.0,
        container_proxy_addrs: ContainerAddrs {
            v4: args.container_proxy_addr,
            v6: args.container_proxy_addr_v6,
        },
        redirect_ring_bytes: args.redirect_ring_bytes,
        bypass_mark: args.bypass_mark,
        datapath: args.datapath,
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        state_dir: args.state_dir,
        bpf_fs: args
            .bpf_fs
            .or_else(|| interceptor_common::host::bpf_fs_root().ok()),
        dns_server: (args.dns_capture == Switch::On).then(|| crate::dns::DnsConfig {
            listen: args.dns_listen,
            container_ips: [
                args.container_proxy_addr.map(|addr| IpAddr::V4(*addr.ip())),
                args.container_proxy_addr_v6
                    .map(|addr| IpAddr::V6(*addr.ip())),
            ]
            .into_iter()
            .flatten()
            .collect(),
            upstreams: args.dns_servers.clone(),
            bypass_mark: args.bypass_mark,
            wildcard_names: args.dns_wildcard_names,
        }),
        dns: DnsSettings {
            servers: args.dns_servers,
            min_ttl: Duration::from_secs(args.dns_min_ttl),
            max_ttl: Duration::from_secs(args.dns_max_ttl),
            negative_ttl: Duration::from_secs(args.dns_negative_ttl),
            stale_ttl: Duration::from_secs(args.dns_stale_ttl),
            query_timeout: Duration::from_millis(args.dns_timeout_ms),
            bypass_mark: args.bypass_mark,
        },
        outbound_policy: args.outbound_policy,
        sniff_timeout: Duration::from_millis(args.sniff_timeout_ms),
        copy_mode: args.copy_mode,
        workers,
        busy_poll: Duration::from_micros(u64::from(args.busy_poll_us)),
        max_connections: args.max_connections.map(|max| max as usize),
        admin_addr: args.admin_addr,
        admin_allow_non_loopback: args.admin_allow_non_loopback,
        address_file: args.address_file,
        kubernetes: args.kubernetes.then(|| config::kubernetes::Options {
            kubeconfig: args.kubeconfig,
            namespaces: args.namespaces,
            host_namespace: args.host_namespace,
            instance: args.node_name.unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|name| name.trim().to_owned())
                    .unwrap_or_default()
            }),
        }),
    }))?;
    Ok(())
}

fn validate(args: &ValidateArgs) -> ExitCode {
    let findings = match load::load(&args.paths)
        .map_or_else(LoadError::into_findings, |loaded| Ok(loaded.warnings))
    {
        Ok(findings) => findings,
        Err(error) => {
            println!("error: {}", Chain(&error));
            return ExitCode::FAILURE;
        }
    };
    let format = match args.output {
        ValidateOutput::Text => config::OutputFormat::Text,
        ValidateOutput::Json => config::OutputFormat::Json,
    };
    print!("{}", config::render(&findings, format));
    let errors = findings
        .iter()
        .filter(|finding| finding.severity == config::Severity::Error)
        .count();
    // On stderr, so stdout stays one line per finding (or pure JSON) for scripts.
    eprintln!(
        "interceptor validate: {errors} error(s), {} warning(s)",
        findings.len() - errors
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use crate::app::AppError;

    use super::{
        ProxyAddrV6, parse_container_proxy_addr, parse_proxy_addr, parse_proxy_addr_v6, report,
    };

    #[test]
    fn the_proxy_addresses_must_be_specific() {
        assert!(parse_proxy_addr::<SocketAddrV4>("127.0.0.1:15001").is_ok());
        let error = parse_proxy_addr::<SocketAddrV4>("0.0.0.0:15001").unwrap_err();
        assert!(error.contains("specific address"), "{error}");
        assert!(matches!(
            parse_proxy_addr_v6("[::1]:15001"),
            Ok(ProxyAddrV6(Some(_)))
        ));
        assert!(matches!(parse_proxy_addr_v6("off"), Ok(ProxyAddrV6(None))));
        assert!(parse_proxy_addr_v6("[::]:15001").is_err());
        let error = parse_proxy_addr_v6("127.0.0.1:15001").unwrap_err();
        assert!(error.contains("neither an IPv6 socket address"), "{error}");
        // Containers need an address of the host on their network.
        assert!(parse_container_proxy_addr::<SocketAddrV4>("198.18.5.1:15001").is_ok());
        for refused in ["127.0.0.1:15001", "0.0.0.0:15001"] {
            let error = parse_container_proxy_addr::<SocketAddrV4>(refused).unwrap_err();
            assert!(error.contains("containers cannot reach"), "{error}");
        }
    }

    #[test]
    fn each_cause_is_reported_once() {
        let refused = || std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        let error = anyhow::Error::new(AppError::Listen {
            addr: "198.18.5.1:15001".parse().unwrap(),
            source: refused(),
        });
        assert_eq!(
            report(&error),
            format!("cannot listen on 198.18.5.1:15001: {}", refused())
        );
        let error = anyhow::Error::new(refused()).context("starting the tokio runtime");
        assert_eq!(
            report(&error),
            format!("starting the tokio runtime: {}", refused())
        );
    }
}
