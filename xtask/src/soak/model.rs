//! The soak's plain values: traffic classes, how a connection failed, the faults and
//! their windows, and the two judgements made from them (is a failure explained by a
//! fault; does a sampled resource grow). Unit-tested without root.

use std::time::Duration;

/// One kind of traffic. A new data path or feature is one more entry here and in
/// [`Class::ALL`], in `traffic::one_shot` (how its client talks), in `config::yaml`
/// (its ServiceEntry) and, where a fault treats it differently, in
/// [`Fault::expected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Long streams of checksummed bytes to a sink, STATIC VIP.
    Bulk,
    /// Request/response on a persistent connection, STATIC VIP.
    RequestResponse,
    /// Connect, one small exchange, close, as fast as allowed.
    Churn,
    /// Many concurrent mostly idle connections, each pinged once before it closes.
    Idle,
    /// A port-only TLS port routed by the ClientHello's SNI.
    TlsSni,
    /// A port-only HTTP port routed by `Host`.
    HttpHost,
    /// `resolution: DNS`, answered by the soak's DNS server.
    Dns,
    /// `resolution: NONE`: the original destination.
    None,
    /// A STATIC backend that the faults make refuse, reset and stall.
    Flaky,
    /// A plain TCP STATIC entry on the kernel path: connect4 rewrites the connect
    /// straight to the endpoint, so its connections outlive the daemon.
    Kernel,
    /// A query for a host without addresses through the captured port 53, then a
    /// connection to the VIP the daemon allocated (which must never move).
    DnsCapture,
    /// Plaintext to a VIP whose DestinationRule says SIMPLE: the proxy originates
    /// TLS to an origin that speaks nothing else.
    TlsOrigination,
}

impl Class {
    pub const ALL: [Self; 12] = [
        Self::Bulk,
        Self::RequestResponse,
        Self::Churn,
        Self::Idle,
        Self::TlsSni,
        Self::HttpHost,
        Self::Dns,
        Self::None,
        Self::Flaky,
        Self::Kernel,
        Self::DnsCapture,
        Self::TlsOrigination,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Bulk => "bulk (STATIC)",
            Self::RequestResponse => "request/response",
            Self::Churn => "connection churn",
            Self::Idle => "concurrent idle",
            Self::TlsSni => "TLS SNI",
            Self::HttpHost => "HTTP Host",
            Self::Dns => "DNS",
            Self::None => "NONE",
            Self::Flaky => "flaky backend",
            Self::Kernel => "kernel path (STATIC)",
            Self::DnsCapture => "DNS capture",
            Self::TlsOrigination => "TLS origination",
        }
    }

    /// Whether its connections bypass the proxy: the kernel path, which the DNS
    /// capture entry (plain TCP STATIC) takes too. No proxy fault reaches them.
    pub fn kernel_path(self) -> bool {
        matches!(self, Self::Kernel | Self::DnsCapture)
    }
}

/// How a client saw its connection fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailKind {
    /// ECONNREFUSED.
    Refused,
    /// ECONNRESET or EPIPE.
    Reset,
    /// ENETUNREACH / EHOSTUNREACH: a VIP reached directly, with no daemon to redirect it.
    Unreachable,
    /// A clean close before the whole answer came.
    EarlyEof,
    /// A DNS answer without the host's VIP (NXDOMAIN): the query was not captured.
    NoAnswer,
    /// getpeername answered the backend, not the VIP a kernel-path client dialled.
    WrongPeer,
    /// No progress until the deadline: never explained.
    Hung,
    /// Bytes that differ from what was sent: never explained.
    Corrupt,
    /// Anything else (another errno): never explained.
    Other,
}

impl FailKind {
    pub fn of(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::ConnectionRefused => Self::Refused,
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                Self::Reset
            }
            ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => Self::Unreachable,
            ErrorKind::UnexpectedEof => Self::EarlyEof,
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Self::Hung,
            ErrorKind::InvalidData => Self::Corrupt,
            _ => Self::Other,
        }
    }
}

/// What the soak does to the daemon and its surroundings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// A valid config rewrite; nothing may fail.
    Reload,
    /// A config rewrite that validation rejects; nothing may fail.
    InvalidReload,
    /// The DNS answer moves to the other backend address; nothing may fail.
    DnsChange,
    /// The upstream DNS server answers nothing; nothing may fail.
    DnsDown,
    /// The flaky backend's listener is closed.
    BackendRefuse,
    /// The flaky backend resets its connections mid-stream.
    BackendReset,
    /// The flaky backend neither reads nor writes for a while; nothing may fail.
    BackendStall,
    /// The daemon's open-files limit is cut to just above what it holds.
    LowFdLimit,
    /// A second daemon starts, then the first gets SIGTERM; nothing may fail.
    Handover,
    /// SIGKILL, then a new daemon.
    Kill,
}

impl Fault {
    /// The failures this fault may cause: on which classes, seen how. Empty for the
    /// faults that must be invisible to clients.
    pub fn expected(self, class: Class, kind: FailKind) -> bool {
        use FailKind::*;
        match self {
            // A host resolved before the DNS server went silent keeps its last good
            // answer, on the proxy and the kernel path alike.
            Self::Reload
            | Self::InvalidReload
            | Self::DnsChange
            | Self::DnsDown
            | Self::BackendStall
            | Self::Handover => false,
            // Upstream refused or reset after the proxy accepted: the proxy passes on a
            // reset (or closes, when the backend's reset came after its last bytes).
            Self::BackendRefuse | Self::BackendReset => {
                class == Class::Flaky && matches!(kind, Reset | EarlyEof)
            }
            // Without descriptors the proxy can neither accept nor dial upstream; the
            // kernel path and a DNS answer from an open socket need none, and a DNS
            // entry on the kernel path keeps its addresses when lookups fail.
            Self::LowFdLimit => !class.kernel_path() && matches!(kind, Reset | EarlyEof),
            // Every proxied connection dies with the daemon; while none runs, a VIP is
            // unreachable and a port-only or NONE destination is dialled directly.
            // A kernel-path connection has no proxy hop and survives: only a connect
            // made while no daemon runs fails, and a port-53 query reaches the real
            // upstream, which knows no allocated VIP. Its getpeername is translated by
            // the daemon's program and storage, which go with a killed daemon, so a
            // connect just before the kill may see the backend.
            Self::Kill if class.kernel_path() => {
                matches!(kind, Unreachable | Refused | NoAnswer | WrongPeer)
            }
            Self::Kill => matches!(kind, Reset | EarlyEof | Unreachable | Refused),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Reload => "config reload",
            Self::InvalidReload => "invalid config reload",
            Self::DnsChange => "DNS record change",
            Self::DnsDown => "DNS server down",
            Self::BackendRefuse => "backend refuses",
            Self::BackendReset => "backend resets mid-stream",
            Self::BackendStall => "backend stalls",
            Self::LowFdLimit => "low descriptor limit",
            Self::Handover => "SIGTERM restart with handover",
            Self::Kill => "SIGKILL and restart",
        }
    }
}

/// When a fault was in force, in seconds since the soak began. `end` includes the
/// time its effects take to clear (cached DNS failures, a restarted daemon's start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub fault: Fault,
    pub start: f64,
    pub end: f64,
}

/// A failed connection or exchange, in seconds since the soak began.
#[derive(Debug, Clone)]
pub struct Failure {
    pub class: Class,
    pub kind: FailKind,
    pub start: f64,
    pub end: f64,
    pub detail: String,
}

/// How long after a client saw a fault's last effect it may still report it: a reset
/// read out of the socket a little later, a reconnect that was already under way.
pub const GRACE: Duration = Duration::from_secs(1);

/// The fault that explains `failure`: one whose window overlaps the failed exchange
/// and that causes this kind of failure on this class.
pub fn explain(failure: &Failure, windows: &[Window]) -> Option<Fault> {
    let grace = GRACE.as_secs_f64();
    windows
        .iter()
        .find(|window| {
            window.start <= failure.end
                && failure.start <= window.end + grace
                && window.fault.expected(failure.class, failure.kind)
        })
        .map(|window| window.fault)
}

/// Least-squares slope of `(seconds, value)` points, per minute; None under 3 points.
pub fn slope_per_minute(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    (variance > 0.0).then(|| covariance / variance * 60.0)
}

/// Whether a resource sampled after warm-up grows: its fitted growth over the window
/// exceeds both `floor` and a tenth of its median. Noise from live connections and
/// allocator caches stays under that; a leak proportional to traffic does not.
pub fn grows(points: &[(f64, f64)], floor: f64) -> bool {
    let Some(slope) = slope_per_minute(points) else {
        return false;
    };
    let span_minutes = (points[points.len() - 1].0 - points[0].0) / 60.0;
    let mut values: Vec<f64> = points.iter().map(|p| p.1).collect();
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    slope * span_minutes > floor.max(median / 10.0)
}

/// FNV-1a, 64 bit: the checksum both ends of a bulk stream compute.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The bytes a client sends at `offset` of connection `seed`: differing per connection,
/// so bytes from another connection cannot pass as this one's.
pub fn payload(seed: u64, offset: u64, buffer: &mut [u8]) {
    for (index, byte) in buffer.iter_mut().enumerate() {
        let position = offset + index as u64;
        *byte = (position.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(class: Class, kind: FailKind, start: f64, end: f64) -> Failure {
        Failure {
            class,
            kind,
            start,
            end,
            detail: String::new(),
        }
    }

    #[test]
    fn a_failure_is_explained_only_by_an_overlapping_fault_that_causes_it() {
        let windows = [
            Window {
                fault: Fault::BackendReset,
                start: 10.0,
                end: 13.0,
            },
            Window {
                fault: Fault::Handover,
                start: 20.0,
                end: 25.0,
            },
        ];
        let reset = failure(Class::Flaky, FailKind::Reset, 12.0, 12.5);
        assert_eq!(explain(&reset, &windows), Some(Fault::BackendReset));
        // Within the grace after the window, but not long after it.
        let late = failure(Class::Flaky, FailKind::Reset, 13.5, 13.6);
        assert_eq!(explain(&late, &windows), Some(Fault::BackendReset));
        let later = failure(Class::Flaky, FailKind::Reset, 15.0, 15.1);
        assert_eq!(explain(&later, &windows), None);
        // The right time, the wrong class: the other backends never reset.
        let bulk = failure(Class::Bulk, FailKind::Reset, 12.0, 12.5);
        assert_eq!(explain(&bulk, &windows), None);
        // A handover must be invisible to clients, getpeername included: the next
        // daemon shares the kernel path's storage.
        let handover = failure(Class::Bulk, FailKind::Reset, 21.0, 22.0);
        assert_eq!(explain(&handover, &windows), None);
        let peer = failure(Class::Kernel, FailKind::WrongPeer, 21.0, 21.0);
        assert_eq!(explain(&peer, &windows), None);
        // A hang or corruption is never explained.
        let hung = failure(Class::Flaky, FailKind::Hung, 11.0, 12.0);
        assert_eq!(explain(&hung, &windows), None);
        let corrupt = failure(Class::Flaky, FailKind::Corrupt, 11.0, 12.0);
        assert_eq!(explain(&corrupt, &windows), None);
    }

    #[test]
    fn a_kill_explains_unreachable_vips_until_the_next_daemon_serves() {
        let windows = [Window {
            fault: Fault::Kill,
            start: 30.0,
            end: 33.0,
        }];
        let direct = failure(Class::Bulk, FailKind::Unreachable, 31.0, 31.0);
        assert_eq!(explain(&direct, &windows), Some(Fault::Kill));
        let dns_down = failure(Class::Dns, FailKind::Reset, 31.0, 31.0);
        assert_eq!(explain(&dns_down, &windows), Some(Fault::Kill));
    }

    #[test]
    fn a_kill_cuts_no_kernel_path_connection() {
        let windows = [
            Window {
                fault: Fault::Kill,
                start: 30.0,
                end: 33.0,
            },
            Window {
                fault: Fault::LowFdLimit,
                start: 40.0,
                end: 43.0,
            },
        ];
        // A connect while no daemon runs is not redirected.
        let direct = failure(Class::Kernel, FailKind::Unreachable, 31.0, 31.0);
        assert_eq!(explain(&direct, &windows), Some(Fault::Kill));
        let uncaptured = failure(Class::DnsCapture, FailKind::NoAnswer, 31.0, 31.0);
        assert_eq!(explain(&uncaptured, &windows), Some(Fault::Kill));
        // Nor is getpeername translated: the storage went with the killed daemon.
        let peer = failure(Class::Kernel, FailKind::WrongPeer, 31.0, 31.0);
        assert_eq!(explain(&peer, &windows), Some(Fault::Kill));
        // An established kernel-path connection has no proxy to die with.
        let cut = failure(Class::Kernel, FailKind::Reset, 28.0, 31.0);
        assert_eq!(explain(&cut, &windows), None);
        let closed = failure(Class::DnsCapture, FailKind::EarlyEof, 31.0, 31.5);
        assert_eq!(explain(&closed, &windows), None);
        // The proxy's descriptors are not the kernel path's.
        let starved = failure(Class::Kernel, FailKind::Reset, 41.0, 41.0);
        assert_eq!(explain(&starved, &windows), None);
        // A DNS entry on the kernel path keeps its addresses when lookups fail.
        let unresolved = failure(Class::Dns, FailKind::Refused, 41.0, 41.0);
        assert_eq!(explain(&unresolved, &windows), None);
        let proxied = failure(Class::Churn, FailKind::Reset, 41.0, 41.0);
        assert_eq!(explain(&proxied, &windows), Some(Fault::LowFdLimit));
    }

    #[test]
    fn a_silent_dns_server_explains_no_failure() {
        let windows = [Window {
            fault: Fault::DnsDown,
            start: 10.0,
            end: 15.0,
        }];
        for kind in [FailKind::Refused, FailKind::Reset, FailKind::EarlyEof] {
            let failed = failure(Class::Dns, kind, 12.0, 12.0);
            assert_eq!(explain(&failed, &windows), None, "{kind:?}");
        }
    }

    #[test]
    fn slope_is_per_minute_and_growth_needs_more_than_noise() {
        let flat: Vec<(f64, f64)> = (0..60)
            .map(|s| (f64::from(s), 100.0 + f64::from(s % 3)))
            .collect();
        assert!(slope_per_minute(&flat).unwrap().abs() < 1.0);
        assert!(!grows(&flat, 5.0));
        let leaking: Vec<(f64, f64)> = (0..60)
            .map(|s| (f64::from(s), 100.0 + f64::from(s)))
            .collect();
        assert!((slope_per_minute(&leaking).unwrap() - 60.0).abs() < 1e-6);
        assert!(grows(&leaking, 5.0));
        assert_eq!(slope_per_minute(&leaking[..2]), None);
    }

    #[test]
    fn payload_differs_per_connection_and_checksums_see_it() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        payload(1, 0, &mut a);
        payload(2, 0, &mut b);
        assert_ne!(a, b);
        let (mut x, mut y) = (Fnv::default(), Fnv::default());
        x.update(&a);
        y.update(&b);
        assert_ne!(x.0, y.0);
        // Split anywhere, the pattern continues.
        let mut whole = [0u8; 64];
        payload(7, 0, &mut whole);
        let mut tail = [0u8; 32];
        payload(7, 32, &mut tail);
        assert_eq!(whole[32..], tail);
    }
}
