//! What a soak found: per-class tallies, the faults injected, resource samples, the
//! daemons' exits and log lines, leftovers; printed as one table, and judged.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use super::{
    daemons::Exited,
    model::{Class, FailKind, Fault, GRACE, Window, explain, grows, slope_per_minute},
    traffic::{ClassTally, Sizes},
};

pub struct Sample {
    pub at: f64,
    pub generation: u32,
    pub rss: Option<f64>,
    pub fds: Option<f64>,
    /// Connections the proxy serves (`interceptor_connections_open`).
    pub connections: Option<f64>,
    pub map_entries: Option<f64>,
    pub idle_connections: u64,
}

/// Warning and error lines the soak's own faults cause, and the fault that must be in
/// force when one is written. Anything else at WARN or ERROR is a finding.
const EXPECTED_LOG_LINES: &[(&str, Fault)] = &[
    ("error=Connection refused", Fault::BackendRefuse),
    ("request timed out", Fault::DnsDown),
    ("Too many open files", Fault::LowFdLimit),
    // hickory's word for a UDP socket it could not open.
    ("no connections available", Fault::LowFdLimit),
    (
        "reload failed: the new configuration is invalid",
        Fault::InvalidReload,
    ),
    (
        "address is in use (a previous interceptor?)",
        Fault::Handover,
    ),
];

/// Whether `line`, written `at` seconds into the soak, is one a fault in force caused.
fn expected_line(line: &str, at: Option<f64>, windows: &[Window]) -> bool {
    let Some(at) = at else {
        return false;
    };
    let grace = GRACE.as_secs_f64();
    EXPECTED_LOG_LINES.iter().any(|(needle, fault)| {
        line.contains(needle)
            && windows.iter().any(|window| {
                window.fault == *fault && window.start - grace <= at && at <= window.end + grace
            })
    })
}

/// The daemon's log as events: a line that opens with a timestamp, with the lines
/// after it that do not (an error that lists several findings, one per line).
fn events(logs: &str) -> Vec<String> {
    let mut events: Vec<String> = Vec::new();
    for line in logs.lines() {
        match events.last_mut() {
            Some(event) if line_time(line).is_none() => {
                event.push('\n');
                event.push_str(line);
            }
            _ => events.push(line.to_owned()),
        }
    }
    events
}

/// Seconds since the Unix epoch of a log line's leading `2026-12-04T17:46:08.541333Z`.
fn line_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut time = time.split(':');
    let hours: f64 = time.next()?.parse().ok()?;
    let minutes: f64 = time.next()?.parse().ok()?;
    let seconds: f64 = time.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days as f64 * 86_400.0 + hours * 3_600.0 + minutes * 60.0 + seconds)
}

/// One sampled resource of the longest-serving daemon, after warm-up.
struct Trend {
    name: &'static str,
    first: f64,
    last: Option<f64>,
    slope: Option<f64>,
    grows: bool,
}

pub struct Report {
    quick: bool,
    sizes: Sizes,
    duration: Duration,
    pub windows: Vec<Window>,
    pub samples: Vec<Sample>,
    pub tallies: BTreeMap<Class, ClassTally>,
    pub handover_started: Vec<f64>,
    injected: BTreeMap<Fault, u64>,
    exits: Vec<String>,
    bad_exits: Vec<String>,
    logs: Vec<(u32, String)>,
    /// The soak's start, in seconds since the Unix epoch, to place log lines.
    pub origin_unix: f64,
    pub attached: Vec<String>,
    pub leftovers: Vec<String>,
    other: Vec<String>,
}

impl Report {
    pub fn new(quick: bool, sizes: &Sizes, duration: Duration) -> Self {
        Self {
            quick,
            sizes: sizes.clone(),
            duration,
            windows: Vec::new(),
            samples: Vec::new(),
            tallies: BTreeMap::new(),
            handover_started: Vec::new(),
            injected: BTreeMap::new(),
            exits: Vec::new(),
            bad_exits: Vec::new(),
            logs: Vec::new(),
            origin_unix: 0.0,
            attached: Vec::new(),
            leftovers: Vec::new(),
            other: Vec::new(),
        }
    }

    pub fn injected(&mut self, fault: Fault) {
        *self.injected.entry(fault).or_default() += 1;
    }

    pub fn violation(&mut self, message: String) {
        self.other.push(message);
    }

    /// Checks how a daemon ended and reads its log.
    pub fn exited(&mut self, exited: Exited) {
        let how = match (exited.stopped_with, exited.code, exited.in_time) {
            (_, _, false) => Err("did not exit in time and was killed".to_owned()),
            (Some(libc::SIGKILL), None, true) => Ok("killed (SIGKILL)".to_owned()),
            (Some(libc::SIGTERM), Some(0), true) => Ok("exit 0 on SIGTERM".to_owned()),
            (signal, code, true) => {
                Err(format!("ended with code {code:?} after signal {signal:?}"))
            }
        };
        match how {
            Ok(how) => self
                .exits
                .push(format!("daemon {}: {how}", exited.generation)),
            Err(how) => self
                .bad_exits
                .push(format!("daemon {}: {how}", exited.generation)),
        }
        self.logs.push((exited.generation, exited.logs));
    }

    /// Panics, lines a fault explains (a count), and lines none does.
    fn log_findings(&self) -> (Vec<String>, u64, Vec<String>) {
        let (mut panics, mut expected, mut unexpected) = (Vec::new(), 0, Vec::new());
        for (generation, logs) in &self.logs {
            for line in events(logs) {
                let line = line.as_str();
                if line.contains("panicked") {
                    panics.push(format!("daemon {generation}: {line}"));
                    continue;
                }
                let level = line
                    .split_whitespace()
                    .take(3)
                    .any(|word| matches!(word, "WARN" | "ERROR"));
                if !level {
                    continue;
                }
                let at = line_time(line).map(|unix| unix - self.origin_unix);
                if expected_line(line, at, &self.windows) {
                    expected += 1;
                } else {
                    unexpected.push(format!("daemon {generation}: {line}"));
                }
            }
        }
        (panics, expected, unexpected)
    }

    fn failures(&self) -> (u64, Vec<String>) {
        let mut explained = 0;
        let mut unexplained = Vec::new();
        for tally in self.tallies.values() {
            for failure in &tally.failures {
                match explain(failure, &self.windows) {
                    Some(_) => explained += 1,
                    None => unexplained.push(format!(
                        "{} {:?} between {:.1} s and {:.1} s: {}",
                        failure.class.name(),
                        failure.kind,
                        failure.start,
                        failure.end,
                        failure.detail
                    )),
                }
            }
        }
        (explained, unexplained)
    }

    /// Per resource: the samples of the daemon that served longest, after warm-up
    /// (its first third, and at least one idle-connection lifetime).
    fn trends(&self) -> Vec<Trend> {
        let mut by_generation: BTreeMap<u32, Vec<&Sample>> = BTreeMap::new();
        for sample in &self.samples {
            by_generation
                .entry(sample.generation)
                .or_default()
                .push(sample);
        }
        let Some(longest) = by_generation.values().max_by(|a, b| {
            let span = |s: &Vec<&Sample>| s.last().map_or(0.0, |l| l.at) - s[0].at;
            span(a).total_cmp(&span(b))
        }) else {
            return Vec::new();
        };
        let first = longest[0].at;
        let span = longest.last().map_or(0.0, |last| last.at) - first;
        let skip = (span / 3.0).max(self.sizes.idle_lifetime.as_secs_f64());
        let steady: Vec<&&Sample> = longest
            .iter()
            .filter(|sample| sample.at >= first + skip)
            .collect();
        type Pick = fn(&Sample) -> Option<f64>;
        // Descriptors follow the load (two per connection); what they leave over is
        // the daemon's own, and that must stay flat.
        let resources: [(&str, Pick, f64); 3] = [
            ("daemon RSS (MiB)", |s| s.rss.map(|b| b / 1048576.0), 16.0),
            (
                "daemon descriptors beyond 2 per open connection",
                |s| Some(s.fds? - 2.0 * s.connections?),
                64.0,
            ),
            ("BPF map entries", |s| s.map_entries, 64.0),
        ];
        resources
            .into_iter()
            .map(|(name, pick, floor)| {
                let points: Vec<(f64, f64)> = steady
                    .iter()
                    .filter_map(|sample| Some((sample.at, pick(sample)?)))
                    .collect();
                let last = points.last().map(|p| p.1);
                let first = points.first().map_or(0.0, |p| p.1);
                let slope = slope_per_minute(&points);
                Trend {
                    name,
                    first,
                    last,
                    slope,
                    grows: grows(&points, floor),
                }
            })
            .collect()
    }

    /// Kernel-path connections opened before a SIGKILL that completed, verified, after
    /// it; and how many kills there were.
    fn survived_kills(&self) -> (usize, usize) {
        let kills: Vec<f64> = self
            .windows
            .iter()
            .filter(|window| window.fault == Fault::Kill)
            .map(|window| window.start)
            .collect();
        let survived = self.tallies.get(&Class::Kernel).map_or(0, |tally| {
            tally
                .spans
                .iter()
                .filter(|(opened, closed)| kills.iter().any(|&k| *opened < k && k < *closed))
                .count()
        });
        (survived, kills.len())
    }

    pub fn violations(&self) -> Vec<String> {
        let mut violations = self.other.clone();
        let (survived, kills) = self.survived_kills();
        if kills > 0 && survived == 0 {
            // Without one, nothing shows that the kernel path has no proxy hop.
            violations.push(format!(
                "{}: no connection was open across any of {kills} SIGKILL(s)",
                Class::Kernel.name()
            ));
        }
        let corrupt: u64 = self
            .tallies
            .values()
            .flat_map(|tally| &tally.failures)
            .filter(|failure| failure.kind == FailKind::Corrupt)
            .count() as u64;
        if corrupt > 0 {
            violations.push(format!(
                "{corrupt} transfer(s) with lost or corrupted bytes"
            ));
        }
        let (_, unexplained) = self.failures();
        violations.extend(
            unexplained
                .into_iter()
                .map(|f| format!("unexplained failure: {f}")),
        );
        violations.extend(self.bad_exits.iter().cloned());
        let (panics, _, unexpected_lines) = self.log_findings();
        violations.extend(panics.iter().map(|p| format!("panic: {p}")));
        violations.extend(
            unexpected_lines
                .iter()
                .map(|line| format!("log line no fault explains: {line}")),
        );
        for trend in self.trends() {
            if trend.grows {
                violations.push(format!(
                    "{} grows after warm-up: {:+.2}/min",
                    trend.name,
                    trend.slope.unwrap_or_default()
                ));
            }
        }
        for class in Class::ALL {
            if self
                .tallies
                .get(&class)
                .is_none_or(|tally| tally.completed == 0)
            {
                violations.push(format!("{}: no exchange completed", class.name()));
            }
        }
        violations.extend(
            self.attached
                .iter()
                .map(|program| format!("still attached after the run: {program}")),
        );
        violations.extend(
            self.leftovers
                .iter()
                .map(|left| format!("left behind: {left}")),
        );
        violations
    }

    /// Every resource sample, for a closer look at a trend.
    pub fn samples_csv(&self) -> String {
        let mut csv = String::from(
            "seconds,daemon,rss_bytes,fds,connections_open,map_entries,idle_connections\n",
        );
        let show = |value: Option<f64>| value.map_or(String::new(), |v| format!("{v}"));
        for sample in &self.samples {
            let _ = writeln!(
                csv,
                "{:.1},{},{},{},{},{},{}",
                sample.at,
                sample.generation,
                show(sample.rss),
                show(sample.fds),
                show(sample.connections),
                show(sample.map_entries),
                sample.idle_connections
            );
        }
        csv
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let mode = if self.quick { "quick" } else { "full" };
        let peak_idle = self
            .samples
            .iter()
            .map(|sample| sample.idle_connections)
            .max()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "interceptor soak ({mode}, {} s of traffic, up to {} concurrent idle connections (peak sampled {peak_idle}), {} MiB bulk streams)",
            self.duration.as_secs(),
            self.sizes.idle_connections,
            self.sizes.bulk_bytes >> 20
        );
        let _ = writeln!(
            out,
            "\n| class | completed | bytes verified | failed, explained | failed, unexplained | hung | corrupt |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for class in Class::ALL {
            let tally = self.tallies.get(&class).cloned().unwrap_or_default();
            let (mut explained, mut unexplained, mut hung, mut corrupt) = (0, 0, 0, 0);
            for failure in &tally.failures {
                match failure.kind {
                    FailKind::Hung => hung += 1,
                    FailKind::Corrupt => corrupt += 1,
                    _ => {}
                }
                if explain(failure, &self.windows).is_some() {
                    explained += 1;
                } else {
                    unexplained += 1;
                }
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} | {explained} | {unexplained} | {hung} | {corrupt} |",
                class.name(),
                tally.completed,
                tally.bytes_verified
            );
        }
        let mut caused: BTreeMap<Fault, BTreeMap<(Class, FailKind), u64>> = BTreeMap::new();
        for failure in self.tallies.values().flat_map(|tally| &tally.failures) {
            if let Some(fault) = explain(failure, &self.windows) {
                *caused
                    .entry(fault)
                    .or_default()
                    .entry((failure.class, failure.kind))
                    .or_default() += 1;
            }
        }
        let _ = writeln!(
            out,
            "\n| fault | injected | failures it explains (class: kind × count) |\n|---|---:|---|"
        );
        for (fault, count) in &self.injected {
            let explained = caused.get(fault).map_or("-".to_owned(), |failures| {
                failures
                    .iter()
                    .map(|((class, kind), count)| format!("{}: {kind:?} × {count}", class.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            let _ = writeln!(out, "| {} | {count} | {explained} |", fault.name());
        }
        let _ = writeln!(
            out,
            "\n| resource (longest-serving daemon, after warm-up) | first | last | slope per minute | grows |\n|---|---:|---:|---:|---|"
        );
        for trend in self.trends() {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {} | {} |",
                trend.name,
                trend.first,
                trend.last.map_or("-".into(), |v| format!("{v:.1}")),
                trend.slope.map_or("-".into(), |v| format!("{v:+.2}")),
                if trend.grows { "YES" } else { "no" }
            );
        }
        let (explained, unexplained) = self.failures();
        let corrupt_transfers = self
            .tallies
            .values()
            .flat_map(|tally| &tally.failures)
            .filter(|failure| failure.kind == FailKind::Corrupt)
            .count();
        let hung = self
            .tallies
            .values()
            .flat_map(|tally| &tally.failures)
            .filter(|failure| failure.kind == FailKind::Hung)
            .count();
        let _ = writeln!(
            out,
            "\n| fault window (s since start; the start was {:.3} s after the Unix epoch) | from | to |\n|---|---:|---:|",
            self.origin_unix
        );
        for window in self
            .windows
            .iter()
            .filter(|window| !matches!(window.fault, Fault::Reload | Fault::InvalidReload))
        {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} |",
                window.fault.name(),
                window.start,
                window.end
            );
        }
        let (panics, expected_lines, unexpected_lines) = self.log_findings();
        let _ = writeln!(out, "\n| check | result |\n|---|---|");
        let rows = [
            (
                "transfers with lost or corrupted bytes",
                corrupt_transfers.to_string(),
            ),
            ("failures explained by a fault", explained.to_string()),
            ("failures no fault explains", unexplained.len().to_string()),
            ("connections hung past their deadline", hung.to_string()),
            ("kernel-path connections that outlived a SIGKILL / kills", {
                let (survived, kills) = self.survived_kills();
                format!("{survived} / {kills}")
            }),
            ("panics", panics.len().to_string()),
            (
                "WARN/ERROR lines: caused by the soak / not",
                format!("{expected_lines} / {}", unexpected_lines.len()),
            ),
            (
                "daemons that exited as expected",
                format!(
                    "{} of {}",
                    self.exits.len(),
                    self.exits.len() + self.bad_exits.len()
                ),
            ),
            (
                "programs attached after the run",
                self.attached.len().to_string(),
            ),
            (
                "cgroups, namespaces, pins left",
                self.leftovers.len().to_string(),
            ),
        ];
        for (check, result) in rows {
            let _ = writeln!(out, "| {check} | {result} |");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_placed_in_time_and_matched_to_their_fault() {
        let unix = line_time("2026-12-04T17:46:08.500000Z  WARN x: y").unwrap();
        // date -u -d 2026-12-04T17:46:08Z +%s
        assert!((unix - 1_796_406_368.5).abs() < 1e-3, "{unix}");
        let windows = [Window {
            fault: Fault::BackendRefuse,
            start: 10.0,
            end: 12.0,
        }];
        let refused = "WARN upstream connect failed error=Connection refused (os error 111)";
        assert!(expected_line(refused, Some(11.0), &windows));
        assert!(!expected_line(refused, Some(30.0), &windows));
        assert!(!expected_line(refused, None, &windows));
        assert!(!expected_line("WARN something else", Some(11.0), &windows));
    }

    #[test]
    fn an_error_over_several_lines_is_one_event_judged_by_all_of_them() {
        let logs = "2026-12-04T17:46:08.500000Z  WARN reload failed: the configuration could not be read: configuration cannot be served:\n  \
            rules.yaml: document 2: DestinationRule/default/tls: spec.trafficPolicy.tls.caCertificates: cannot read /x/ca.pem: Too many open files (os error 24)\n\
            2026-12-04T17:46:09.000000Z  INFO configuration reloaded\n";
        let events = events(logs);
        assert_eq!(events.len(), 2, "{events:?}");
        let windows = [Window {
            fault: Fault::LowFdLimit,
            start: 10.0,
            end: 12.0,
        }];
        assert!(expected_line(&events[0], Some(11.0), &windows));
        assert!(events[1].ends_with("configuration reloaded"));
    }
}
