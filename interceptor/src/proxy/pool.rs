//! A DestinationRule's `connectionPool.tcp`: the connect timeout, a cap on open
//! connections per destination, and TCP keepalive on the upstream socket.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde::Serialize;
use socket2::{SockRef, TcpKeepalive};

use crate::config::Opaque;

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<Keepalive>,
    /// Connections open now under this policy (one per service port and snapshot).
    #[serde(skip)]
    open: AtomicU32,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Keepalive {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub probes: Option<u32>,
}

/// A connection's place in the pool, given back when it drops.
pub struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TcpPool {
    /// Parses `connectionPool` (only its `tcp` part: HTTP settings have no meaning
    /// to a TCP proxy). Errors name the field below `connectionPool`.
    pub fn parse(value: &Opaque) -> Result<Option<Self>, (String, String)> {
        let Some(tcp) = value.get("tcp") else {
            return Ok(None);
        };
        let mut pool = Self::default();
        if let Some(timeout) = tcp.get("connectTimeout") {
            pool.connect_timeout = Some(duration(timeout, "tcp.connectTimeout")?);
        }
        if let Some(max) = tcp.get("maxConnections") {
            pool.max_connections = Some(
                max.as_u64()
                    .and_then(|max| u32::try_from(max).ok())
                    .filter(|max| *max > 0)
                    .ok_or_else(|| {
                        (
                            "tcp.maxConnections".to_owned(),
                            format!("must be a positive integer, not {max}"),
                        )
                    })?,
            );
        }
        if let Some(keepalive) = tcp.get("tcpKeepalive") {
            let mut settings = Keepalive::default();
            if let Some(time) = keepalive.get("time") {
                settings.time = Some(duration(time, "tcp.tcpKeepalive.time")?);
            }
            if let Some(interval) = keepalive.get("interval") {
                settings.interval = Some(duration(interval, "tcp.tcpKeepalive.interval")?);
            }
            if let Some(probes) = keepalive.get("probes") {
                settings.probes = Some(
                    probes
                        .as_u64()
                        .and_then(|probes| u32::try_from(probes).ok())
                        .filter(|probes| *probes > 0)
                        .ok_or_else(|| {
                            (
                                "tcp.tcpKeepalive.probes".to_owned(),
                                format!("must be a positive integer, not {probes}"),
                            )
                        })?,
                );
            }
            pool.keepalive = Some(settings);
        }
        Ok(Some(pool))
    }

    /// A place for one more connection, or `None` at `maxConnections`.
    pub fn admit(&self) -> Option<Slot<'_>> {
        let max = self.max_connections.unwrap_or(u32::MAX);
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot(&self.open))
    }

    /// Sets keepalive on an upstream socket, if the policy asks for it.
    pub fn apply(&self, socket: SockRef<'_>) -> std::io::Result<()> {
        let Some(keepalive) = self.keepalive else {
            return Ok(());
        };
        // Unset fields keep the system's defaults, as Envoy leaves them.
        let mut settings = TcpKeepalive::new();
        if let Some(time) = keepalive.time {
            settings = settings.with_time(time);
        }
        if let Some(interval) = keepalive.interval {
            settings = settings.with_interval(interval);
        }
        if let Some(probes) = keepalive.probes {
            settings = settings.with_retries(probes);
        }
        socket.set_tcp_keepalive(&settings)
    }
}

/// A duration as Istio accepts it: `1h`, `30m`, `10s`, `250ms`, or compounds such
/// as `1m30s`.
fn duration(value: &Opaque, field: &str) -> Result<Duration, (String, String)> {
    let invalid = || {
        (
            field.to_owned(),
            format!("{value} is not a duration such as 10s or 250ms"),
        )
    };
    let text = value.as_str().ok_or_else(invalid)?;
    parse_duration(text).ok_or_else(invalid)
}

pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += Duration::try_from_secs_f64(number * seconds).ok()?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_istio_writes_them() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn max_connections_admits_that_many_at_once() {
        let pool = TcpPool::parse(&serde_json::json!({"tcp": {"maxConnections": 2}}))
            .unwrap()
            .unwrap();
        let first = pool.admit().unwrap();
        let _second = pool.admit().unwrap();
        assert!(pool.admit().is_none());
        drop(first);
        assert!(pool.admit().is_some());
    }

    #[test]
    fn bad_values_name_their_field() {
        let error =
            TcpPool::parse(&serde_json::json!({"tcp": {"connectTimeout": "soon"}})).unwrap_err();
        assert_eq!(error.0, "tcp.connectTimeout");
        let error =
            TcpPool::parse(&serde_json::json!({"tcp": {"maxConnections": -1}})).unwrap_err();
        assert_eq!(error.0, "tcp.maxConnections");
        assert!(
            TcpPool::parse(&serde_json::json!({"http": {}}))
                .unwrap()
                .is_none()
        );
    }
}
