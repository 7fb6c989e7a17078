//! `interceptor trace`: live decisions, one line each, for as long as someone watches.
//!
//! Three sources feed it: connect4/6 (what they did with each connect, and why, from
//! the trace ring), the proxy (where each connection it took went, and how it ended)
//! and the kernel path's close events. A [`Tracer`] fans them out to the `/trace`
//! streams. Nothing is gathered while no stream is open: the proxy and the close
//! follower look at one atomic flag, and the programs at one map entry, which the
//! tracer sets when the first stream opens and clears when the last one ends.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use interceptor_common::{TraceEvent, TraceSettings, Verdict, address_of};
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::broadcast;
use tracing::warn;

/// Lines a slow stream may fall behind before it loses some (and is told how many).
const BACKLOG: usize = 4096;

/// What a stream wants to see. Empty: everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filter {
    /// Connections from this cgroup or one below it: its id and depth (see
    /// [`TraceSettings::cgroup_level`]). A proxy line whose client's cgroup is not
    /// known (a client in another network namespace) is not shown.
    pub cgroup: Option<Cgroup>,
    /// Destinations in this network (the original destination, for the proxy's lines).
    pub dest: Option<IpNet>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cgroup {
    pub path: std::path::PathBuf,
    pub id: u64,
    pub level: u32,
}

impl Cgroup {
    /// The cgroup at `path` (canonical, under the cgroup2 mount `root`): its id is its
    /// directory's inode number, its level the number of directories below the root.
    pub fn of(path: &std::path::Path, root: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let below = path.strip_prefix(root).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is not under the cgroup2 mount {}",
                    path.display(),
                    root.display()
                ),
            )
        })?;
        Ok(Self {
            path: path.to_owned(),
            id: std::fs::metadata(path)?.ino(),
            level: below.components().count() as u32,
        })
    }
}

/// Whether the cgroup with id `id` is `root` or below it: its directory's inode.
fn cgroup_within(root: &std::path::Path, id: u64) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        if std::fs::metadata(&dir).is_ok_and(|meta| meta.ino() == id) {
            return true;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(
                entries
                    .flatten()
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    false
}

impl Filter {
    /// Whether the line's destination matches; the cgroup is the stream's to check.
    fn admits(&self, line: &Line) -> bool {
        let destination = match &line.event {
            Event::Connect(connect) => Some(connect.destination),
            Event::Proxy(proxy) => proxy.destination,
            Event::KernelClose(close) => Some(close.destination),
        };
        // A proxy line without a destination (no redirect record) has no port or
        // network to match: it shows only to streams that ask for neither.
        let port_ok = self
            .port
            .is_none_or(|port| destination.is_some_and(|d| d.port() == port));
        let dest_ok = self
            .dest
            .is_none_or(|net| destination.is_some_and(|d| contains(net, d.ip())));
        port_ok && dest_ok
    }
}

/// `net` contains `ip`, IPv4 networks matching IPv4-mapped addresses too.
fn contains(net: IpNet, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    net.contains(&ip)
}

/// The settings the programs emit under for these streams: the narrowest that still
/// lets every stream see what it asked for. A part the streams disagree on is left
/// open; each stream narrows its own lines again.
pub fn kernel_settings<'a>(filters: impl IntoIterator<Item = &'a Filter>) -> TraceSettings {
    let mut filters = filters.into_iter();
    let Some(first) = filters.next() else {
        return TraceSettings::OFF;
    };
    let (mut cgroup, mut dest, mut port) = (first.cgroup.as_ref(), first.dest, first.port);
    for filter in filters {
        if filter.cgroup.as_ref() != cgroup {
            cgroup = None;
        }
        if filter.dest != dest {
            dest = None;
        }
        if filter.port != port {
            port = None;
        }
    }
    let (dst, dst_mask) = dest.map_or(([0; 4], [0; 4]), |net| {
        let net = net.trunc();
        let bits = u32::from(interceptor_common::mapped_prefix_len(
            net.addr(),
            net.prefix_len(),
        ));
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        (address_of(net.addr()), address_of(IpAddr::V6(mask.into())))
    });
    TraceSettings {
        enabled: 1,
        port: port.unwrap_or(0).to_be_bytes(),
        _pad: [0; 2],
        cgroup_id: cgroup.map_or(0, |cgroup| cgroup.id),
        cgroup_level: cgroup.map_or(0, |cgroup| cgroup.level),
        _pad2: [0; 4],
        dst,
        dst_mask,
    }
}

/// One traced decision, with the time the daemon learnt of it.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Seconds since the epoch.
    pub time: f64,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Event {
    /// What connect4/6 did.
    Connect(Connect),
    /// A connection the proxy took, once it ended.
    Proxy(Proxied),
    /// A kernel-path connection, once it closed.
    KernelClose(KernelClose),
}

#[derive(Debug, Clone, Serialize)]
pub struct Connect {
    pub cgroup_id: u64,
    pub destination: SocketAddr,
    /// [`Verdict::label`].
    pub verdict: &'static str,
    pub intercepted: bool,
    /// Where the connect was sent instead.
    pub to: Option<SocketAddr>,
}

impl Connect {
    /// An event as connect4/6 wrote it; `None` for a verdict this daemon does not know.
    pub fn of(event: &TraceEvent) -> Option<Self> {
        let verdict = Verdict::of(event.verdict)?;
        Some(Self {
            cgroup_id: event.cgroup_id,
            destination: event.dst.socket_addr(),
            verdict: verdict.label(),
            intercepted: !verdict.left_alone(),
            to: (event.to.port != [0, 0]).then(|| event.to.socket_addr()),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Proxied {
    pub client: Option<SocketAddr>,
    /// The client socket's cgroup, looked up at accept while a stream asks for a
    /// cgroup; `None` otherwise, or when the client is in another network namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// The original destination, from the redirect record.
    pub destination: Option<SocketAddr>,
    pub service_entry: Option<String>,
    pub host: Option<String>,
    pub endpoint: Option<String>,
    /// `closed`, or the reason the proxy reset the client without forwarding
    /// (`no_upstream`, `upstream_refused`, `upstream_tls`, ...).
    pub outcome: String,
    /// How the connection ended (`client_fin`, `upstream_reset`, ...), once forwarded.
    pub close: Option<String>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelClose {
    /// The cgroup of the process that connected.
    pub cgroup_id: u64,
    pub destination: SocketAddr,
    pub endpoint: SocketAddr,
    pub service_entry: String,
    /// `closed`, or `upstream_connect` for a connect that never established.
    pub outcome: &'static str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// One line of a text stream, without the newline.
pub fn render(line: &Line) -> String {
    let mut text = clock(line.time);
    match &line.event {
        Event::Connect(connect) => {
            let _ = write!(
                text,
                " connect {} cgroup={}: ",
                connect.destination, connect.cgroup_id
            );
            let to = connect.to.map(|to| to.to_string()).unwrap_or_default();
            text.push_str(&match Verdict::ALL
                .into_iter()
                .find(|verdict| verdict.label() == connect.verdict)
            {
                Some(Verdict::Proxy) => format!("redirected to the proxy at {to}"),
                Some(Verdict::Backend) => format!("sent straight to backend {to} (kernel path)"),
                Some(Verdict::NoEndpoint) => {
                    "refused: the service has no endpoint (kernel path)".to_owned()
                }
                Some(Verdict::UndeclaredVipPort) => {
                    "refused: no entry declares this port of the VIP".to_owned()
                }
                Some(Verdict::Dns) => format!("DNS query sent to the daemon's server at {to}"),
                Some(Verdict::NotTcp) => "left alone: not TCP".to_owned(),
                Some(Verdict::NoSocket) => "left alone: no socket to look at".to_owned(),
                Some(Verdict::BypassMark) => {
                    "left alone: the socket carries the bypass mark".to_owned()
                }
                Some(Verdict::NoRule) => {
                    "left alone: no ServiceEntry intercepts this address and port".to_owned()
                }
                Some(Verdict::OtherNetns) => {
                    "left alone: another network namespace, and no --container-proxy-addr"
                        .to_owned()
                }
                Some(Verdict::NoListener) => {
                    "left alone: the proxy has no listener of this address family".to_owned()
                }
                Some(Verdict::ToProxy) => "left alone: a connect to the proxy itself".to_owned(),
                Some(Verdict::NoStorage) => {
                    "left alone: no socket storage for the redirect record".to_owned()
                }
                Some(Verdict::NotExported) => {
                    "left alone: the entry is not exported to this client's namespace".to_owned()
                }
                None => connect.verdict.to_owned(),
            });
        }
        Event::Proxy(proxy) => {
            let _ = write!(
                text,
                " proxy   {} from {}: {}",
                optional(proxy.destination.as_ref()),
                optional(proxy.client.as_ref()),
                proxy.service_entry.as_deref().unwrap_or("no service"),
            );
            if let Some(endpoint) = &proxy.endpoint {
                let _ = write!(text, " -> {endpoint}");
            }
            if proxy.outcome == "closed" {
                let _ = write!(
                    text,
                    ", closed ({}), {} bytes sent, {} received",
                    proxy.close.as_deref().unwrap_or("-"),
                    proxy.bytes_sent.unwrap_or(0),
                    proxy.bytes_received.unwrap_or(0)
                );
            } else {
                let _ = write!(text, ", refused: {}", proxy.outcome);
            }
        }
        Event::KernelClose(close) => {
            let _ = write!(
                text,
                " kernel  {}: {} -> {}, ",
                close.destination, close.service_entry, close.endpoint
            );
            if close.outcome == "closed" {
                let _ = write!(
                    text,
                    "closed, {} bytes sent, {} received",
                    close.bytes_sent, close.bytes_received
                );
            } else {
                text.push_str("upstream connect failed");
            }
        }
    }
    text
}

fn optional(value: Option<&SocketAddr>) -> String {
    value.map_or_else(|| "?".to_owned(), ToString::to_string)
}

/// Seconds since the epoch, now.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// `HH:MM:SS.mmm` (UTC) of `time` seconds since the epoch.
fn clock(time: f64) -> String {
    let millis = (time * 1000.0) as u64;
    let seconds = millis / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
        millis % 1000
    )
}

/// The programs' side of tracing: writes the settings where connect4/6 read them.
pub type KernelSwitch = Box<dyn FnMut(&TraceSettings) -> anyhow::Result<()> + Send>;
/// Reads every event connect4/6 wrote since the last read, with its time.
pub type KernelRing = Box<dyn FnMut(&mut Vec<Line>) + Send>;

/// Fans traced decisions out to the open streams.
pub struct Tracer {
    /// Any stream open: the sources look at this before building a line.
    active: AtomicBool,
    /// Any stream narrowed to a cgroup: the proxy then looks up each client's.
    cgroups: AtomicBool,
    sender: broadcast::Sender<Arc<Line>>,
    streams: Mutex<Streams>,
    /// The programs' events, read only while a stream is open.
    ring: Mutex<Option<KernelRing>>,
    /// How many streams are open, for the metrics.
    open: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Default)]
struct Streams {
    next_id: u64,
    filters: BTreeMap<u64, Filter>,
    kernel: Option<KernelSwitch>,
}

impl Streams {
    fn any_cgroup(&self) -> bool {
        self.filters.values().any(|filter| filter.cgroup.is_some())
    }

    /// Tells the programs what the open streams want now.
    fn apply(&mut self) {
        let settings = kernel_settings(self.filters.values());
        if let Some(switch) = &mut self.kernel
            && let Err(error) = switch(&settings)
        {
            warn!(error = %crate::report::Chain(error.as_ref()), "cannot switch the programs' tracing");
        }
    }
}

impl Tracer {
    /// `open` counts the open streams.
    pub fn new(open: prometheus_client::metrics::gauge::Gauge) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicBool::new(false),
            cgroups: AtomicBool::new(false),
            sender: broadcast::channel(BACKLOG).0,
            streams: Mutex::default(),
            ring: Mutex::new(None),
            open,
        })
    }

    /// Whether any stream is open; sources skip building lines when not.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether a stream is narrowed to a cgroup, so the proxy must learn each client
    /// socket's cgroup while it still exists.
    pub fn wants_cgroups(&self) -> bool {
        self.cgroups.load(Ordering::Relaxed)
    }

    /// Hands a line to every open stream, after whatever the programs wrote before
    /// it, so lines keep the order things happened in.
    pub fn emit(&self, event: Event) {
        if !self.active() {
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        self.drain_ring(&mut ring);
        self.send(event);
    }

    /// Hands the programs' events written so far to the open streams.
    pub fn drain(&self) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        self.drain_ring(&mut ring);
    }

    /// With the ring's lock held, so two readers never interleave.
    fn drain_ring(&self, ring: &mut Option<KernelRing>) {
        if let Some(read) = ring {
            let mut lines = Vec::new();
            read(&mut lines);
            for line in lines {
                let _ = self.sender.send(Arc::new(line));
            }
        }
    }

    fn send(&self, event: Event) {
        let time = unix_now();
        let _ = self.sender.send(Arc::new(Line { time, event }));
    }

    /// Connects the programs, once they are loaded; streams already open apply.
    pub fn set_kernel(&self, switch: KernelSwitch, ring: KernelRing) {
        *self.ring.lock().unwrap_or_else(|e| e.into_inner()) = Some(ring);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.kernel = Some(switch);
        streams.apply();
    }

    /// Opens a stream. The programs emit what it wants from the moment this returns.
    pub fn subscribe(self: &Arc<Self>, filter: Filter) -> Stream {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let id = streams.next_id;
        streams.next_id += 1;
        streams.filters.insert(id, filter.clone());
        let receiver = self.sender.subscribe();
        self.active.store(true, Ordering::Relaxed);
        self.cgroups.store(streams.any_cgroup(), Ordering::Relaxed);
        self.open.set(streams.filters.len() as i64);
        streams.apply();
        Stream {
            tracer: Arc::clone(self),
            id,
            filter,
            receiver,
            below: std::collections::HashMap::new(),
        }
    }
}

/// One open `/trace` stream; dropping it closes it, and the last one switches the
/// programs' tracing off.
pub struct Stream {
    tracer: Arc<Tracer>,
    id: u64,
    filter: Filter,
    receiver: broadcast::Receiver<Arc<Line>>,
    /// Cgroups found below (or not below) the filter's, by id: the programs check the
    /// ancestry only when every stream asks for the same cgroup.
    below: std::collections::HashMap<u64, bool>,
}

/// What a stream reads next.
pub enum Next {
    Line(Arc<Line>),
    /// This many lines were lost: the stream fell behind.
    Lost(u64),
    /// The daemon is going away.
    Closed,
}

impl Stream {
    pub async fn next(&mut self) -> Next {
        loop {
            match self.receiver.recv().await {
                Ok(line) if self.filter.admits(&line) && self.cgroup_admits(&line) => {
                    return Next::Line(line);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(lost)) => return Next::Lost(lost),
                Err(broadcast::error::RecvError::Closed) => return Next::Closed,
            }
        }
    }
}

impl Stream {
    /// Lines come from the stream's cgroup or one below it.
    fn cgroup_admits(&mut self, line: &Line) -> bool {
        let Some(cgroup) = &self.filter.cgroup else {
            return true;
        };
        let id = match &line.event {
            Event::Connect(connect) => Some(connect.cgroup_id),
            Event::Proxy(proxy) => proxy.cgroup_id,
            Event::KernelClose(close) => Some(close.cgroup_id),
        };
        let Some(id) = id else {
            return false;
        };
        id == cgroup.id
            || *self
                .below
                .entry(id)
                .or_insert_with(|| cgroup_within(&cgroup.path, id))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut streams = self
            .tracer
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        streams.filters.remove(&self.id);
        if streams.filters.is_empty() {
            self.tracer.active.store(false, Ordering::Relaxed);
        }
        self.tracer
            .cgroups
            .store(streams.any_cgroup(), Ordering::Relaxed);
        self.tracer.open.set(streams.filters.len() as i64);
        streams.apply();
    }
}

#[cfg(test)]
mod tests {
    use interceptor_common::{SocketAddress, ipv4_mapped};

    use super::*;

    fn filter(dest: Option<&str>, port: Option<u16>) -> Filter {
        Filter {
            cgroup: None,
            dest: dest.map(|net| net.parse().unwrap()),
            port,
        }
    }

    fn connect_line(destination: &str) -> Line {
        Line {
            time: 0.0,
            event: Event::Connect(Connect {
                cgroup_id: 7,
                destination: destination.parse().unwrap(),
                verdict: "no_rule",
                intercepted: false,
                to: None,
            }),
        }
    }

    #[test]
    fn no_stream_switches_the_programs_off() {
        assert_eq!(kernel_settings([]), TraceSettings::OFF);
    }

    #[test]
    fn one_stream_narrows_the_programs_to_its_network_and_port() {
        let settings = kernel_settings([&filter(Some("198.18.0.0/15"), Some(7000))]);
        assert_eq!(settings.enabled, 1);
        assert_eq!(settings.port, 7000u16.to_be_bytes());
        assert_eq!(settings.dst, ipv4_mapped([198, 18, 0, 0]));
        assert_eq!(
            settings.dst_mask,
            [
                u32::MAX,
                u32::MAX,
                u32::MAX,
                u32::from_ne_bytes([255, 254, 0, 0])
            ]
        );
        // What the programs compute, word by word.
        let inside = ipv4_mapped([198, 19, 3, 4]);
        let outside = ipv4_mapped([198, 20, 0, 1]);
        let matches =
            |addr: [u32; 4]| (0..4).all(|w| addr[w] & settings.dst_mask[w] == settings.dst[w]);
        assert!(matches(inside));
        assert!(!matches(outside));
        assert!(!matches(address_of("::1".parse().unwrap())));
    }

    #[test]
    fn streams_that_disagree_leave_that_part_open() {
        let cgroup = Cgroup {
            path: "/sys/fs/cgroup/a".into(),
            id: 42,
            level: 1,
        };
        let first = Filter {
            cgroup: Some(cgroup.clone()),
            ..filter(Some("10.0.0.0/8"), Some(80))
        };
        let second = Filter {
            cgroup: Some(cgroup),
            ..filter(None, Some(80))
        };
        let settings = kernel_settings([&first, &second]);
        assert_eq!(settings.enabled, 1);
        assert_eq!((settings.cgroup_id, settings.cgroup_level), (42, 1));
        assert_eq!(settings.port, 80u16.to_be_bytes());
        assert_eq!(settings.dst_mask, [0; 4], "the networks differ");
        let open = kernel_settings([&filter(None, Some(80)), &filter(None, Some(443))]);
        assert_eq!(open.port, [0, 0]);
    }

    #[test]
    fn a_stream_sees_only_its_destinations() {
        let wanted = filter(Some("198.18.0.0/15"), Some(7000));
        assert!(wanted.admits(&connect_line("198.18.1.1:7000")));
        assert!(!wanted.admits(&connect_line("198.18.1.1:7001")));
        assert!(!wanted.admits(&connect_line("10.0.0.1:7000")));
        // A dual-stack socket's IPv4-mapped destination is in an IPv4 network.
        assert!(wanted.admits(&connect_line("[::ffff:198.18.1.1]:7000")));
        let unrouted = Line {
            time: 0.0,
            event: Event::Proxy(Proxied {
                outcome: "no_redirect_record".to_owned(),
                ..Proxied::default()
            }),
        };
        assert!(!wanted.admits(&unrouted));
        assert!(Filter::default().admits(&unrouted));
    }

    #[test]
    fn a_kernel_event_reads_as_a_connect_line() {
        let event = TraceEvent {
            cgroup_id: 9,
            at_ns: 0,
            dst: SocketAddress::of("240.240.0.1:80".parse().unwrap()),
            verdict: Verdict::Proxy as u32,
            to: SocketAddress::of("127.0.0.1:15001".parse().unwrap()),
            _pad: [0; 4],
        };
        let connect = Connect::of(&event).unwrap();
        assert!(connect.intercepted);
        assert_eq!(connect.to, Some("127.0.0.1:15001".parse().unwrap()));
        let line = render(&Line {
            time: 3661.5,
            event: Event::Connect(connect),
        });
        assert_eq!(
            line,
            "01:01:01.500 connect 240.240.0.1:80 cgroup=9: redirected to the proxy at 127.0.0.1:15001"
        );
        let alone = Connect::of(&TraceEvent {
            verdict: Verdict::NoRule as u32,
            to: SocketAddress::NONE,
            ..event
        })
        .unwrap();
        assert!(!alone.intercepted);
        assert_eq!(alone.to, None);
        assert_eq!(
            Connect::of(&TraceEvent {
                verdict: 99,
                ..event
            })
            .map(|c| c.verdict),
            None
        );
    }

    #[test]
    fn the_proxy_line_says_where_the_connection_went_and_how_it_ended() {
        let proxied = Proxied {
            client: Some("10.0.0.1:40000".parse().unwrap()),
            destination: Some("240.240.0.1:80".parse().unwrap()),
            service_entry: Some("ServiceEntry/ns/web".to_owned()),
            endpoint: Some("198.18.0.1:80".to_owned()),
            outcome: "closed".to_owned(),
            close: Some("client_fin".to_owned()),
            bytes_sent: Some(4),
            bytes_received: Some(20),
            ..Proxied::default()
        };
        let line = |proxied: Proxied| {
            render(&Line {
                time: 0.0,
                event: Event::Proxy(proxied),
            })
        };
        assert_eq!(
            line(proxied.clone()),
            "00:00:00.000 proxy   240.240.0.1:80 from 10.0.0.1:40000: ServiceEntry/ns/web -> 198.18.0.1:80, closed (client_fin), 4 bytes sent, 20 received"
        );
        assert!(
            line(Proxied {
                endpoint: None,
                outcome: "no_upstream".to_owned(),
                ..proxied
            })
            .ends_with("ServiceEntry/ns/web, refused: no_upstream")
        );
    }

    #[tokio::test]
    async fn a_cgroup_stream_sees_every_kind_of_line_from_its_cgroup_only() {
        use std::os::unix::fs::MetadataExt as _;
        // Directories stand in for cgroups: a cgroup's id is its directory's inode.
        let root = std::env::temp_dir().join(format!("trace-cgroups-{}", std::process::id()));
        let child = root.join("pod");
        std::fs::create_dir_all(&child).unwrap();
        let id = |path: &std::path::Path| std::fs::metadata(path).unwrap().ino();
        let (inside, below) = (id(&root), id(&child));
        let elsewhere = id(&std::env::temp_dir());

        let tracer = Tracer::new(Default::default());
        let open = tracer.subscribe(Filter::default());
        assert!(!tracer.wants_cgroups());
        let mut stream = tracer.subscribe(Filter {
            cgroup: Some(Cgroup {
                path: root.clone(),
                id: inside,
                level: 1,
            }),
            ..Filter::default()
        });
        assert!(tracer.wants_cgroups(), "the proxy must look clients up");
        let proxied = |cgroup_id| {
            Event::Proxy(Proxied {
                cgroup_id,
                outcome: "closed".to_owned(),
                ..Proxied::default()
            })
        };
        let kernel = |cgroup_id| {
            Event::KernelClose(KernelClose {
                cgroup_id,
                destination: "240.240.0.1:80".parse().unwrap(),
                endpoint: "198.18.0.1:80".parse().unwrap(),
                service_entry: "ServiceEntry/ns/web".to_owned(),
                outcome: "closed",
                bytes_sent: 1,
                bytes_received: 2,
            })
        };
        for event in [
            proxied(Some(elsewhere)),
            proxied(None),
            kernel(elsewhere),
            proxied(Some(below)),
            kernel(inside),
        ] {
            tracer.emit(event);
        }
        let mut seen = Vec::new();
        for _ in 0..2 {
            match stream.next().await {
                Next::Line(line) => seen.push(match &line.event {
                    Event::Proxy(proxy) => ("proxy", proxy.cgroup_id),
                    Event::KernelClose(close) => ("kernel", Some(close.cgroup_id)),
                    Event::Connect(_) => ("connect", None),
                }),
                _ => panic!("a line"),
            }
        }
        assert_eq!(seen, [("proxy", Some(below)), ("kernel", Some(inside))]);
        drop(stream);
        assert!(!tracer.wants_cgroups());
        drop(open);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn the_programs_trace_while_a_stream_is_open_and_stop_with_the_last() {
        let tracer = Tracer::new(Default::default());
        let switched = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&switched);
        tracer.set_kernel(
            Box::new(move |settings: &TraceSettings| {
                seen.lock().unwrap().push(settings.enabled);
                Ok(())
            }),
            Box::new(|_: &mut Vec<Line>| {}),
        );
        assert!(!tracer.active());
        let mut first = tracer.subscribe(filter(None, Some(7000)));
        let second = tracer.subscribe(Filter::default());
        assert!(tracer.active());
        tracer.emit(Event::Connect(
            Connect::of(&TraceEvent {
                cgroup_id: 1,
                at_ns: 0,
                dst: SocketAddress::of("198.18.0.1:7001".parse().unwrap()),
                verdict: Verdict::NoRule as u32,
                to: SocketAddress::NONE,
                _pad: [0; 4],
            })
            .unwrap(),
        ));
        tracer.emit(Event::Connect(
            Connect::of(&TraceEvent {
                cgroup_id: 1,
                at_ns: 0,
                dst: SocketAddress::of("198.18.0.1:7000".parse().unwrap()),
                verdict: Verdict::NoRule as u32,
                to: SocketAddress::NONE,
                _pad: [0; 4],
            })
            .unwrap(),
        ));
        // The first stream skips the line for another port.
        let Next::Line(line) = first.next().await else {
            panic!("a line")
        };
        let Event::Connect(connect) = &line.event else {
            panic!("a connect line")
        };
        assert_eq!(connect.destination.port(), 7000);
        drop(first);
        assert!(tracer.active());
        drop(second);
        assert!(!tracer.active());
        assert_eq!(*switched.lock().unwrap(), [0, 1, 1, 1, 0]);
    }
}
