//! What the harness and its `bench-client` child exchange, the bulk data pattern, and
//! the fixed addresses of the benchmark network namespace.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::OnceLock,
};

use serde::{Deserialize, Serialize};

/// The address family every path of a run uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

static FAMILY: OnceLock<Family> = OnceLock::new();

/// Chooses the family for this process; the harness does it once, before any path runs.
pub fn set_family(family: Family) {
    let _ = FAMILY.set(family);
}

pub fn family() -> Family {
    FAMILY.get().copied().unwrap_or_default()
}

/// The backend host, on `lo` inside the namespace; both ranges are for benchmarks.
pub const BACKEND_IPV4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BACKEND_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);

pub fn backend_ip() -> IpAddr {
    match family() {
        Family::Ipv4 => BACKEND_IPV4.into(),
        Family::Ipv6 => BACKEND_IPV6.into(),
    }
}

pub fn loopback() -> IpAddr {
    match family() {
        Family::Ipv4 => Ipv4Addr::LOCALHOST.into(),
        Family::Ipv6 => Ipv6Addr::LOCALHOST.into(),
    }
}
/// Sink: reads and verifies the bulk pattern, then answers `OK <bytes>`.
pub const BULK_PORT: u16 = 5001;
/// Echo, one blocking thread per connection: the cleanest request/response baseline.
pub const ECHO_PORT: u16 = 5002;
/// Echo on tokio: many short or idle connections.
pub const CONN_PORT: u16 = 5003;
/// Where the interceptor's IPv4 proxy listens; the IPv6 one is on [::1] at the same
/// port (the daemon's default).
pub const PROXY: &str = "127.0.0.1:15001";
/// HAProxy listens on 15100 + (backend port - 5000).
pub const HAPROXY_PORT_BASE: u16 = 15100;
/// nginx listens on 15200 + (backend port - 5000).
pub const NGINX_PORT_BASE: u16 = 15200;
/// Ephemeral ports stay clear of every listener above.
pub const EPHEMERAL_PORTS: &str = "16000 65000";

/// The `index`-th ServiceEntry VIP of this run's family.
pub fn vip(index: u32) -> IpAddr {
    vip_in(family(), index)
}

/// In 240.240.0.0/16, skipping .0 and .255, or in 2001:2::/64 (where Istio
/// auto-allocates, and in the IPv6 benchmarking range).
fn vip_in(family: Family, index: u32) -> IpAddr {
    assert!(index < 250 * 256, "VIP index out of range");
    match family {
        Family::Ipv4 => {
            Ipv4Addr::new(240, 240, (index / 250) as u8, (index % 250 + 1) as u8).into()
        }
        Family::Ipv6 => Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, index as u16 + 1).into(),
    }
}

/// Where a client connects, and where its socket must say it is connected, which tells
/// whether the connection really was (or was not) redirected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub addr: SocketAddr,
    /// With `vips > 1`, connection `i` goes to `vip(i % vips)` on `addr`'s port.
    #[serde(default)]
    pub vips: u32,
}

impl Target {
    pub fn addr_for(&self, index: u64) -> SocketAddr {
        if self.vips > 1 {
            // The client process does not know the run's family; the address does.
            let family = if self.addr.is_ipv6() {
                Family::Ipv6
            } else {
                Family::Ipv4
            };
            let vip = vip_in(family, (index % u64::from(self.vips)) as u32);
            SocketAddr::new(vip, self.addr.port())
        } else {
            self.addr
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// `streams` connections at once, each sending `bytes` of the pattern to the sink.
    Bulk {
        target: Target,
        streams: usize,
        bytes: u64,
    },
    /// One persistent connection, `size` bytes each way per round trip.
    Latency {
        target: Target,
        warmup: u64,
        round_trips: u64,
        size: usize,
    },
    /// `concurrency` workers: connect, one request, one response, close; for `millis`.
    ConnRate {
        target: Target,
        concurrency: usize,
        millis: u64,
        size: usize,
    },
    /// Sequential connect + one round trip + close, timed each, up to `connections` or
    /// `millis`.
    ConnectLatency {
        target: Target,
        connections: u64,
        millis: u64,
        size: usize,
    },
    /// Opens `connections`, one round trip each, reports, then holds them until stdin
    /// says `close` (or closes).
    Hold { target: Target, connections: u64 },
}

/// One job's spec for the child: the job and the cgroup it must find itself in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The cgroup path as /proc/self/cgroup shows it (`/interceptor-bench-<pid>`).
    pub cgroup: String,
    pub job: Job,
}

/// What a client reports; every figure is optional so one type serves every job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Set when the job failed; the harness treats it as a failed path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Operations that completed correctly (round trips, connections, streams).
    pub ok: u64,
    /// Operations that failed (connection errors, wrong answers).
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Payload bytes the client sent and had confirmed.
    pub bytes: u64,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Percentiles>,
    /// CPU the proxy on the path used during the job; filled in by the harness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_cpu: Option<CpuTime>,
    /// CPU seconds every process and interrupt on the machine used during the job
    /// (client, proxy, backend and the kernel's network work); filled in by the
    /// harness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_cpu: Option<f64>,
}

/// Busy CPU seconds of the whole machine since boot, from /proc/stat: everything but
/// idle and I/O wait.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(index, _)| *index != 3 && *index != 4)
        .map(|(_, ticks)| ticks)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(busy / ticks)
}

/// CPU time of a process, in seconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    /// From /proc/<pid>/stat (all threads), at the kernel's clock-tick resolution.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces; the fields after it may not.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some(Self {
            user: fields.get(11)?.parse::<f64>().ok()? / ticks,
            system: fields.get(12)?.parse::<f64>().ok()? / ticks,
        })
    }

    /// A process and its children (nginx's master and its workers), read together.
    pub fn of_tree(pid: u32) -> Option<Self> {
        let mut total = Self::of(pid)?;
        for child in children(pid) {
            if let Some(cpu) = Self::of(child) {
                total.user += cpu.user;
                total.system += cpu.system;
            }
        }
        Some(total)
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }

    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

/// The pids whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    // After the name: state, then the parent's pid.
                    let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                    parent.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn from_nanos(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let count = samples.len();
        let at = |quantile: f64| {
            let rank = (quantile * count as f64).ceil() as usize;
            samples[rank.clamp(1, count) - 1] as f64 / 1_000.0
        };
        let sum: u128 = samples.iter().map(|&sample| u128::from(sample)).sum();
        Some(Self {
            count: count as u64,
            min: samples[0] as f64 / 1_000.0,
            mean: sum as f64 / count as f64 / 1_000.0,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[count - 1] as f64 / 1_000.0,
        })
    }
}

/// The bulk pattern repeats every `PERIOD` bytes; bytes within a period do not repeat
/// in any short cycle, so a dropped, duplicated or reordered chunk smaller than a
/// period changes what the sink sees, and the byte count catches the rest.
pub const PERIOD: usize = 256 * 1024;

/// Two periods of the pattern: any window of up to `PERIOD` bytes starting at stream
/// offset `o` equals `reference()[o % PERIOD..][..len]`, so checking is one memcmp.
pub fn reference() -> &'static [u8] {
    static REFERENCE: OnceLock<Vec<u8>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        (0..2 * PERIOD)
            .map(|index| {
                let offset = (index % PERIOD) as u64;
                (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (offset >> 8) as u8
            })
            .collect()
    })
}

/// Checks a stream against the pattern as it arrives.
#[derive(Debug, Default)]
pub struct Verifier {
    pub bytes: u64,
    /// Offset of the first chunk that did not match.
    pub mismatch_at: Option<u64>,
}

impl Verifier {
    /// `chunk` must be at most `PERIOD` long.
    pub fn update(&mut self, chunk: &[u8]) {
        let start = (self.bytes % PERIOD as u64) as usize;
        if self.mismatch_at.is_none() && chunk != &reference()[start..start + chunk.len()] {
            self.mismatch_at = Some(self.bytes);
        }
        self.bytes += chunk.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_accepts_the_pattern_in_any_chunking() {
        let stream: Vec<u8> = reference()[..PERIOD]
            .iter()
            .chain(&reference()[..PERIOD])
            .copied()
            .collect();
        let mut verifier = Verifier::default();
        for chunk in stream.chunks(7_919) {
            verifier.update(chunk);
        }
        assert_eq!(verifier.bytes, 2 * PERIOD as u64);
        assert_eq!(verifier.mismatch_at, None);
    }

    #[test]
    fn the_verifier_catches_a_changed_or_dropped_byte() {
        let mut changed = reference()[..PERIOD].to_vec();
        changed[100_000] ^= 1;
        let mut verifier = Verifier::default();
        verifier.update(&changed);
        assert_eq!(verifier.mismatch_at, Some(0));

        let mut dropped = reference()[..4096].to_vec();
        dropped.remove(10);
        let mut verifier = Verifier::default();
        verifier.update(&dropped[..2048]);
        verifier.update(&dropped[2048..]);
        assert_eq!(verifier.mismatch_at, Some(0));
    }

    #[test]
    fn percentiles_pick_ranks() {
        let latency = Percentiles::from_nanos((1..=1000).map(|us| us * 1000).collect()).unwrap();
        assert_eq!(
            (latency.p50, latency.p99, latency.p999, latency.max),
            (500.0, 990.0, 999.0, 1000.0)
        );
        assert!(Percentiles::from_nanos(Vec::new()).is_none());
    }

    #[test]
    fn vips_are_distinct_host_addresses() {
        let vips: std::collections::HashSet<IpAddr> = (0..10_000)
            .map(|index| vip_in(Family::Ipv4, index))
            .collect();
        assert_eq!(vips.len(), 10_000);
        assert!(vips.iter().all(|vip| match vip {
            IpAddr::V4(vip) =>
                vip.octets()[..2] == [240, 240] && !matches!(vip.octets()[3], 0 | 255),
            IpAddr::V6(_) => false,
        }));
        assert_eq!(vip_in(Family::Ipv4, 0), Ipv4Addr::new(240, 240, 0, 1));
        let vips: std::collections::HashSet<IpAddr> = (0..10_000)
            .map(|index| vip_in(Family::Ipv6, index))
            .collect();
        assert_eq!(vips.len(), 10_000);
        assert_eq!(
            vip_in(Family::Ipv6, 0),
            "2001:2::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_target_spreads_over_vips_of_its_own_family() {
        let target = Target {
            addr: "[2001:2::1]:5003".parse().unwrap(),
            vips: 3,
        };
        assert_eq!(target.addr_for(4), "[2001:2::2]:5003".parse().unwrap());
        let target = Target {
            addr: "240.240.0.1:5003".parse().unwrap(),
            vips: 3,
        };
        assert_eq!(target.addr_for(5), "240.240.0.3:5003".parse().unwrap());
    }
}
