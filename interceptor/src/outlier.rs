//! Outlier ejection, the idea both paths share: an endpoint that fails to accept
//! `threshold` connects in a row sits out for a base time multiplied by the number
//! of times it has been ejected, as Envoy's outlier detection does for locally
//! originated errors. The proxy applies it when a DestinationRule asks
//! (`proxy::balance`); the kernel path always applies it, with fixed settings
//! ([`KernelOutliers`]), to the endpoints it picks at connect() time.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

/// One endpoint's record of failures and ejections.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ejection {
    consecutive_failures: u32,
    ejections: u32,
    until: Option<Instant>,
}

impl Ejection {
    /// A connect that succeeded ends the run of failures.
    pub fn succeeded(&mut self) {
        self.consecutive_failures = 0;
    }

    /// Counts a failed connect; true when the run has reached `threshold` and the
    /// endpoint, not ejected now, is due for ejection (which the caller may still
    /// refuse, to keep enough endpoints).
    pub fn failed(&mut self, threshold: u32, now: Instant) -> bool {
        self.consecutive_failures += 1;
        self.consecutive_failures >= threshold && !self.is_ejected(now)
    }

    /// Ejects the endpoint for `base` times its number of ejections, this one
    /// included, rounded up to a whole number of `interval`s (the sweep that lifts
    /// ejections); returns when it ends.
    pub fn eject(&mut self, now: Instant, base: Duration, interval: Duration) -> Instant {
        self.ejections += 1;
        self.consecutive_failures = 0;
        let ejection = base * self.ejections;
        let interval = interval.max(Duration::from_millis(1));
        let ticks = ejection.as_nanos().div_ceil(interval.as_nanos());
        let until = now + interval * u32::try_from(ticks).unwrap_or(u32::MAX);
        self.until = Some(until);
        until
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| until > now)
    }
}

/// Consecutive failed connects that eject a kernel-path endpoint.
pub const KERNEL_CONSECUTIVE_FAILURES: u32 = 5;
/// A kernel-path endpoint's first ejection; each repeat adds as much again.
pub const KERNEL_BASE_EJECTION: Duration = Duration::from_secs(30);

/// A kernel-path endpoint: the backend set it belongs to and its address.
pub type KernelEndpoint = (u32, SocketAddr);

/// The health of the kernel path's endpoints, fed by the close events sockops
/// reports; what it ejects the daemon leaves out of the backend sets it writes.
#[derive(Debug, Default)]
pub struct KernelOutliers {
    endpoints: HashMap<KernelEndpoint, Ejection>,
}

impl KernelOutliers {
    /// Counts a connect to `endpoint` that established (`ok`) or not. `set` lists
    /// every endpoint of its backend set, so the last one not ejected never is.
    /// True when this ejected the endpoint.
    pub fn connected(
        &mut self,
        endpoint: KernelEndpoint,
        ok: bool,
        set: &[SocketAddr],
        now: Instant,
    ) -> bool {
        if ok {
            if let Some(health) = self.endpoints.get_mut(&endpoint) {
                health.succeeded();
            }
            return false;
        }
        let others_healthy = set.iter().any(|addr| {
            *addr != endpoint.1
                && !self
                    .endpoints
                    .get(&(endpoint.0, *addr))
                    .is_some_and(|health| health.is_ejected(now))
        });
        let health = self.endpoints.entry(endpoint).or_default();
        if !health.failed(KERNEL_CONSECUTIVE_FAILURES, now) || !others_healthy {
            return false;
        }
        // The ring of close events has no sweep of its own: the daemon looks at
        // [`Self::ejected`] every second, which is the interval.
        health.eject(now, KERNEL_BASE_EJECTION, Duration::from_secs(1));
        true
    }

    /// The endpoints ejected at `now`.
    pub fn ejected(&self, now: Instant) -> BTreeSet<KernelEndpoint> {
        self.endpoints
            .iter()
            .filter(|(_, health)| health.is_ejected(now))
            .map(|(endpoint, _)| *endpoint)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn five_failures_in_a_row_eject_for_thirty_seconds_times_the_repeats() {
        let (dead, live) = (addr("198.18.0.1:80"), addr("198.18.0.2:80"));
        let set = [dead, live];
        let mut outliers = KernelOutliers::default();
        let now = Instant::now();
        for _ in 0..4 {
            assert!(!outliers.connected((7, dead), false, &set, now));
        }
        assert!(outliers.connected((7, dead), false, &set, now));
        assert_eq!(outliers.ejected(now), BTreeSet::from([(7, dead)]));
        // Another set holding the same address is not affected.
        assert!(!outliers.ejected(now).contains(&(8, dead)));
        let first_end = now + KERNEL_BASE_EJECTION;
        assert!(outliers.ejected(first_end - Duration::from_millis(1)).len() == 1);
        assert!(outliers.ejected(first_end).is_empty());
        // The second ejection lasts twice as long.
        for _ in 0..4 {
            assert!(!outliers.connected((7, dead), false, &set, first_end));
        }
        assert!(outliers.connected((7, dead), false, &set, first_end));
        let second_end = first_end + 2 * KERNEL_BASE_EJECTION;
        assert_eq!(
            outliers.ejected(second_end - Duration::from_secs(1)).len(),
            1
        );
        assert!(outliers.ejected(second_end).is_empty());
    }

    #[test]
    fn a_success_resets_the_count() {
        let dead = addr("198.18.0.1:80");
        let set = [dead, addr("198.18.0.2:80")];
        let mut outliers = KernelOutliers::default();
        let now = Instant::now();
        for _ in 0..4 {
            outliers.connected((1, dead), false, &set, now);
        }
        outliers.connected((1, dead), true, &set, now);
        for _ in 0..4 {
            assert!(!outliers.connected((1, dead), false, &set, now));
        }
        assert!(outliers.ejected(now).is_empty());
    }

    #[test]
    fn the_last_healthy_endpoint_is_never_ejected() {
        let (a, b) = (addr("198.18.0.1:80"), addr("198.18.0.2:80"));
        let mut outliers = KernelOutliers::default();
        let now = Instant::now();
        for _ in 0..5 {
            outliers.connected((1, a), false, &[a], now);
        }
        assert!(outliers.ejected(now).is_empty(), "the only endpoint");
        for _ in 0..5 {
            outliers.connected((2, a), false, &[a, b], now);
        }
        for _ in 0..10 {
            outliers.connected((2, b), false, &[a, b], now);
        }
        assert_eq!(outliers.ejected(now), BTreeSet::from([(2, a)]));
    }
}
