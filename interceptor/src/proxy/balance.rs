//! A DestinationRule's `loadBalancer.simple` and `outlierDetection`, for TCP as
//! Envoy does it: the order in which a connection tries a service port's endpoints,
//! and which endpoints sit out for a while after failing to accept.
//!
//! The state lives with the policy (one per service port and snapshot) and is plain
//! data behind a lock, so the kernel path can read [`Balancer::ejected`] too.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rand::seq::SliceRandom as _;
use serde::Serialize;

use std::net::SocketAddr;

use crate::{
    config::{Opaque, Resolution, SimpleLoadBalancer},
    outlier::Ejection,
    registry::Route,
    resolve::{self, Target},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Strategy {
    RoundRobin,
    LeastRequest,
    Random,
    /// The connection's original destination, whatever the endpoints.
    Passthrough,
}

/// `outlierDetection`, TCP part: `consecutive5xxErrors` counts connect failures
/// (Envoy's locally originated errors), and an endpoint that reaches it is ejected
/// for `baseEjectionTime` times the number of its ejections so far.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outlier {
    pub consecutive_errors: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// How often ejections are reconsidered: an ejection ends at the first tick of
    /// this interval after its time is up.
    pub interval: Duration,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Balancer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    #[serde(skip)]
    next: AtomicUsize,
    #[serde(skip)]
    state: Mutex<HashMap<Target, Health>>,
}

#[derive(Debug, Default)]
struct Health {
    open: u32,
    outlier: Ejection,
}

/// A connection counted against its endpoint for LEAST_REQUEST until it drops.
pub struct Active<'a> {
    balancer: &'a Balancer,
    target: Target,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Some(health) = self.balancer.lock().get_mut(&self.target) {
            health.open = health.open.saturating_sub(1);
        }
    }
}

impl Balancer {
    /// From a policy's `loadBalancer` and `outlierDetection`; `None` when neither
    /// asks for anything. Errors name the field below the policy.
    pub fn parse(
        load_balancer: Option<SimpleLoadBalancer>,
        outlier: Option<&Opaque>,
    ) -> Result<Option<Self>, (String, String)> {
        let strategy = match load_balancer {
            None | Some(SimpleLoadBalancer::Unspecified) => None,
            Some(SimpleLoadBalancer::RoundRobin) => Some(Strategy::RoundRobin),
            // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
            Some(SimpleLoadBalancer::LeastRequest | SimpleLoadBalancer::LeastConn) => {
                Some(Strategy::LeastRequest)
            }
            Some(SimpleLoadBalancer::Random) => Some(Strategy::Random),
            Some(SimpleLoadBalancer::Passthrough) => Some(Strategy::Passthrough),
        };
        let outlier = outlier.map(parse_outlier).transpose()?;
        if strategy.is_none() && outlier.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            strategy,
            outlier,
            next: AtomicUsize::new(0),
            state: Mutex::new(HashMap::new()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Health>> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The targets of a routed connection, in the order to try them: `resolved` as
    /// the route's resolution gave them, every endpoint of a STATIC service, or the
    /// original destination for PASSTHROUGH.
    pub fn targets(
        &self,
        route: &Route,
        original: SocketAddr,
        resolved: Vec<Target>,
    ) -> Vec<Target> {
        let targets = match (self.strategy, route.service.resolution) {
            (Some(Strategy::Passthrough), _) => return vec![Target::Tcp(original)],
            (_, Resolution::Static) => resolve::every_static_target(route),
            _ => resolved,
        };
        self.order(targets, Instant::now())
    }

    /// The order to try `targets` in: the strategy's, with ejected endpoints left
    /// out (all of them kept if every one is ejected: a guess beats a certain
    /// refusal, as Envoy's panic threshold does).
    pub fn order(&self, mut targets: Vec<Target>, now: Instant) -> Vec<Target> {
        {
            let mut state = self.lock();
            let ejected = |target: &Target| {
                state
                    .get(target)
                    .is_some_and(|health| health.outlier.is_ejected(now))
            };
            if targets.iter().any(|target| !ejected(target)) {
                targets.retain(|target| !ejected(target));
            }
            match self.strategy {
                Some(Strategy::LeastRequest) => {
                    // Random first, so ties are spread rather than always the first.
                    targets.shuffle(&mut rand::rng());
                    targets.sort_by_key(|target| state.entry(target.clone()).or_default().open);
                }
                Some(Strategy::Random) => targets.shuffle(&mut rand::rng()),
                Some(Strategy::RoundRobin) if !targets.is_empty() => {
                    let turn = self.next.fetch_add(1, Ordering::Relaxed) % targets.len();
                    targets.rotate_left(turn);
                }
                _ => {}
            }
        }
        targets
    }

    /// Counts an open connection to `target`.
    pub fn opened(&self, target: &Target) -> Active<'_> {
        let mut state = self.lock();
        let health = state.entry(target.clone()).or_default();
        health.open += 1;
        health.outlier.succeeded();
        Active {
            balancer: self,
            target: target.clone(),
        }
    }

    /// Counts a failed connect to `target`, and ejects it when that is one too many.
    /// True when this failure ejected it.
    pub fn failed(&self, target: &Target, endpoints: usize, now: Instant) -> bool {
        let Some(outlier) = self.outlier else {
            return false;
        };
        let mut state = self.lock();
        let currently_ejected = state
            .values()
            .filter(|health| health.outlier.is_ejected(now))
            .count();
        let health = state.entry(target.clone()).or_default();
        if !health.outlier.failed(outlier.consecutive_errors, now) {
            return false;
        }
        let allowed = endpoints * outlier.max_ejection_percent as usize / 100;
        if currently_ejected >= allowed.max(usize::from(outlier.max_ejection_percent > 0)) {
            return false;
        }
        // Lifted on the interval's tick, as Envoy's sweep does.
        health
            .outlier
            .eject(now, outlier.base_ejection_time, outlier.interval);
        true
    }

    /// The endpoints ejected at `now`.
    pub fn ejected(&self, now: Instant) -> Vec<Target> {
        self.lock()
            .iter()
            .filter(|(_, health)| health.outlier.is_ejected(now))
            .map(|(target, _)| target.clone())
            .collect()
    }
}

fn parse_outlier(value: &Opaque) -> Result<Outlier, (String, String)> {
    let count = |field: &str, default: u32| -> Result<u32, (String, String)> {
        match value.get(field) {
            None => Ok(default),
            Some(number) => number
                .as_u64()
                .and_then(|number| u32::try_from(number).ok())
                .ok_or_else(|| {
                    (
                        field.to_owned(),
                        format!("must be a non-negative integer, not {number}"),
                    )
                }),
        }
    };
    let time = |field: &str, default: Duration| match value.get(field) {
        None => Ok(default),
        Some(text) => text
            .as_str()
            .and_then(super::pool::parse_duration)
            .ok_or_else(|| {
                (
                    field.to_owned(),
                    format!("{text} is not a duration such as 10s or 250ms"),
                )
            }),
    };
    // Envoy's defaults, as Istio documents them.
    let consecutive_errors = match value.get("consecutive5xxErrors") {
        Some(_) => count("consecutive5xxErrors", 5)?,
        None => count("consecutiveErrors", 5)?,
    };
    let max_ejection_percent = count("maxEjectionPercent", 10)?;
    if max_ejection_percent > 100 {
        return Err((
            "maxEjectionPercent".into(),
            "must be between 0 and 100".into(),
        ));
    }
    Ok(Outlier {
        consecutive_errors,
        base_ejection_time: time("baseEjectionTime", Duration::from_secs(30))?,
        max_ejection_percent,
        interval: time("interval", Duration::from_secs(10))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Target {
        Target::Tcp(text.parse().unwrap())
    }

    fn balancer(strategy: SimpleLoadBalancer, outlier: Option<serde_json::Value>) -> Balancer {
        Balancer::parse(Some(strategy), outlier.as_ref())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn least_request_picks_the_idle_endpoint() {
        let balancer = balancer(SimpleLoadBalancer::LeastRequest, None);
        let (a, b) = (target("198.18.0.1:80"), target("198.18.0.2:80"));
        let _busy = balancer.opened(&a);
        for _ in 0..20 {
            assert_eq!(
                balancer.order(vec![a.clone(), b.clone()], Instant::now())[0],
                b
            );
        }
    }

    #[test]
    fn round_robin_takes_turns() {
        let balancer = balancer(SimpleLoadBalancer::RoundRobin, None);
        let targets = vec![target("198.18.0.1:80"), target("198.18.0.2:80")];
        let firsts: Vec<_> = (0..4)
            .map(|_| balancer.order(targets.clone(), Instant::now())[0].clone())
            .collect();
        assert_eq!(firsts[0], firsts[2]);
        assert_ne!(firsts[0], firsts[1]);
    }

    #[test]
    fn consecutive_connect_failures_eject_for_the_base_time_within_the_cap() {
        let balancer = balancer(
            SimpleLoadBalancer::RoundRobin,
            Some(serde_json::json!({
                "consecutive5xxErrors": 2, "baseEjectionTime": "10s",
                "interval": "1s", "maxEjectionPercent": 50
            })),
        );
        let (a, b) = (target("198.18.0.1:80"), target("198.18.0.2:80"));
        let now = Instant::now();
        assert!(!balancer.failed(&a, 2, now));
        assert!(balancer.failed(&a, 2, now));
        assert_eq!(balancer.ejected(now), std::slice::from_ref(&a));
        assert_eq!(
            balancer.order(vec![a.clone(), b.clone()], now),
            std::slice::from_ref(&b)
        );
        // 50% of two endpoints: the second may not be ejected while the first is.
        assert!(!balancer.failed(&b, 2, now));
        assert!(!balancer.failed(&b, 2, now));
        let later = now + Duration::from_secs(11);
        assert!(balancer.ejected(later).is_empty());
        assert_eq!(balancer.order(vec![a.clone(), b.clone()], later).len(), 2);
    }
}
