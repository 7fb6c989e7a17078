//! The table, the JSON file, and BENCHMARKS.md.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::paths::{self, PAIRS, Pair, PathSpec};

/// A target from the issue, evaluated on the measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub target: String,
    /// `None` when a figure it needs is missing.
    pub pass: Option<bool>,
    /// The figure the target is about, when it is not a plain ratio (e.g. "+9.3 µs").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Check {
    /// No target, just a remark for the table.
    pub fn note(detail: String) -> Self {
        Self {
            target: String::new(),
            pass: None,
            detail: Some(detail),
        }
    }

    pub fn new(target: &str, pass: Option<bool>, detail: Option<String>) -> Self {
        Self {
            target: target.to_owned(),
            pass,
            detail,
        }
    }
}

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    /// The better of two figures.
    fn pick(self, a: f64, b: f64) -> f64 {
        match self {
            Self::Higher => a.max(b),
            Self::Lower => a.min(b),
        }
    }

    fn at_least_as_good(self, figure: f64, bar: f64) -> bool {
        match self {
            Self::Higher => figure >= bar,
            Self::Lower => figure <= bar,
        }
    }
}

/// One like-for-like pair on one figure.
#[derive(Debug, Clone, Serialize)]
pub struct PairFigure {
    pub pair: &'static str,
    pub interceptor: &'static str,
    /// The pair's better peer on this figure.
    pub peer: Option<&'static str>,
    /// interceptor / that peer
    pub ratio: Option<f64>,
    /// Whether the interceptor path is at least as good as that peer.
    pub holds: Option<bool>,
}

impl PairFigure {
    fn new(pair: Pair, better: Better, paths: &[PathSpec], values: &[Option<f64>]) -> Self {
        let value = |name: &str| paths::index(paths, name).and_then(|index| values[index]);
        let peer = pair
            .peers
            .iter()
            .filter_map(|&name| Some((name, value(name)?)))
            .reduce(|best, next| {
                if better.pick(best.1, next.1) == next.1 && next.1 != best.1 {
                    next
                } else {
                    best
                }
            });
        let interceptor = value(pair.interceptor);
        Self {
            pair: pair.label,
            interceptor: pair.interceptor,
            peer: peer.map(|(name, _)| name),
            ratio: ratio(interceptor, peer.map(|(_, value)| value)),
            holds: interceptor
                .zip(peer)
                .map(|(icpt, (_, bar))| better.at_least_as_good(icpt, bar)),
        }
    }
}

/// One figure measured on every path.
#[derive(Debug, Clone, Serialize)]
pub struct PathRow {
    pub figure: String,
    pub unit: &'static str,
    pub better: Better,
    /// Per path name.
    pub values: serde_json::Map<String, serde_json::Value>,
    /// In the table's column order.
    #[serde(skip)]
    cells: Vec<Option<f64>>,
    pub pairs: Vec<PairFigure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

impl PathRow {
    /// `values` per path, in `paths` order.
    pub fn new(
        figure: impl Into<String>,
        unit: &'static str,
        better: Better,
        paths: &[PathSpec],
        values: Vec<Option<f64>>,
    ) -> Self {
        let pairs = PAIRS
            .iter()
            .map(|&pair| PairFigure::new(pair, better, paths, &values))
            .collect();
        Self {
            figure: figure.into(),
            unit,
            better,
            values: paths
                .iter()
                .zip(&values)
                .map(|(path, value)| (path.name.to_owned(), serde_json::json!(value)))
                .collect(),
            cells: values,
            pairs,
            check: None,
        }
    }

    pub fn check(mut self, check: Check) -> Self {
        self.check = Some(check);
        self
    }

    /// The issue's target: in each pair, the interceptor path is at least as good as
    /// the pair's better peer.
    pub fn race_target(self) -> Self {
        let holds: Option<Vec<bool>> = self.pairs.iter().map(|pair| pair.holds).collect();
        let target = match self.better {
            Better::Higher => "≥ better peer in each pair",
            Better::Lower => "≤ better peer in each pair",
        };
        let pass = holds.map(|holds| holds.iter().all(|&holds| holds));
        self.check(Check::new(target, pass, None))
    }
}

/// One figure measured with a small and a large configuration.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    pub figure: String,
    pub unit: &'static str,
    pub small: Option<f64>,
    pub large: Option<f64>,
    /// large / small
    pub ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

impl ScaleRow {
    pub fn new(
        figure: impl Into<String>,
        unit: &'static str,
        small: Option<f64>,
        large: Option<f64>,
    ) -> Self {
        Self {
            figure: figure.into(),
            unit,
            small,
            large,
            ratio: ratio(large, small),
            check: None,
        }
    }

    pub fn check(mut self, check: Check) -> Self {
        self.check = Some(check);
        self
    }
}

pub fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(numerator), Some(denominator)) if denominator > 0.0 => Some(numerator / denominator),
        _ => None,
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The path names, the table's columns.
    pub paths: Vec<&'static str>,
    pub rows: Vec<PathRow>,
    pub scale_entries: (u32, u32),
    pub scale_rows: Vec<ScaleRow>,
    /// connect4's run time with no tracer (`small`) and tracing (`large`).
    pub bpf_rows: Vec<ScaleRow>,
    /// Every client's raw outcome and other measurements, by name.
    pub details: serde_json::Map<String, serde_json::Value>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn fail(&mut self, failure: String) {
        eprintln!("xtask bench: FAILED: {failure}");
        self.failures.push(failure);
    }

    pub fn detail(&mut self, name: impl Into<String>, value: impl Serialize) {
        self.details.insert(
            name.into(),
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
        );
    }

    pub fn table(&self, title: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{title}");
        let width = 44 + 13 * (self.paths.len() + PAIRS.len()) + 40;
        let rule = "-".repeat(width);
        let _ = writeln!(out, "{rule}");
        let mut header = format!("{:<34} {:<8}", "figure", "unit");
        for name in &self.paths {
            let _ = write!(header, " {name:>12}");
        }
        for pair in PAIRS {
            let _ = write!(header, " {:>11}", format!("{}:ratio", pair.label));
        }
        let _ = writeln!(out, "{header}   target");
        for row in &self.rows {
            let mut line = format!("{:<34} {:<8}", row.figure, row.unit);
            for value in &row.cells {
                let _ = write!(line, " {:>12}", number(*value, row.unit));
            }
            for pair in &row.pairs {
                let _ = write!(line, " {:>11}", times(pair.ratio));
            }
            let _ = writeln!(out, "{line}   {}", verdict(row.check.as_ref()));
        }
        let _ = writeln!(out, "{rule}");
        let _ = writeln!(
            out,
            "pairs (each ratio is the interceptor path over the pair's better peer on that figure):"
        );
        for pair in PAIRS {
            let _ = writeln!(
                out,
                "  {}: {} against {}",
                pair.label,
                pair.interceptor,
                pair.peers.join(", ")
            );
        }
        if !self.scale_rows.is_empty() {
            let (small, large) = self.scale_entries;
            let _ = writeln!(out, "{rule}");
            let _ = writeln!(
                out,
                "{:<34} {:<8} {:>11} {:>11} {:>11}   target",
                "config scale (ServiceEntries)",
                "unit",
                format!("{small}"),
                format!("{large}"),
                format!("{large}/{small}"),
            );
            for row in &self.scale_rows {
                let _ = writeln!(
                    out,
                    "{:<34} {:<8} {:>11} {:>11} {:>11}   {}",
                    row.figure,
                    row.unit,
                    number(row.small, row.unit),
                    number(row.large, row.unit),
                    times(row.ratio),
                    verdict(row.check.as_ref()),
                );
            }
        }
        if !self.bpf_rows.is_empty() {
            let _ = writeln!(out, "{rule}");
            let _ = writeln!(
                out,
                "{:<34} {:<8} {:>11} {:>11} {:>11}",
                "BPF run time (bpf_stats)", "unit", "no tracer", "tracing", "ratio",
            );
            for row in &self.bpf_rows {
                let _ = writeln!(
                    out,
                    "{:<34} {:<8} {:>11} {:>11} {:>11}",
                    row.figure,
                    row.unit,
                    number(row.small, row.unit),
                    number(row.large, row.unit),
                    times(row.ratio),
                );
            }
        }
        let _ = writeln!(out, "{rule}");
        if self.failures.is_empty() {
            let _ = writeln!(out, "every path worked");
        } else {
            let _ = writeln!(out, "{} FAILURES:", self.failures.len());
            for failure in &self.failures {
                let _ = writeln!(out, "  - {failure}");
            }
        }
        out
    }
}

/// Where a reference run's table goes, relative to the workspace root.
pub const BENCHMARKS_FILE: &str = "BENCHMARKS.md";

/// The command whose run [`BENCHMARKS_FILE`] shows. Other runs (`--quick`, some
/// scenarios, IPv6, extra daemon flags) leave it alone, so it holds one comparable
/// table rather than whatever ran last.
pub const REFERENCE_COMMAND: &str = "cargo xtask bench";

/// How the figures are made; the file's fixed part, above the table.
const METHOD: &str = "\
## Method

`cargo xtask bench` creates a network namespace and a cgroup of its own and, in one
run, measures each path from a client in that cgroup to a backend in that namespace:

- **direct**: to the backend's own address, which no ServiceEntry matches;
- **icpt-poll**: to a ServiceEntry VIP, which connect4 redirects to the daemon's
  proxy, with adaptive busy polling (`--busy-poll-us 50`, the default);
- **icpt**: the same with `--busy-poll-us 0`: the proxy never spins;
- **haproxy**: HAProxy in TCP mode as its documentation recommends for a relay:
  `option splice-auto`, and a `maxpipes` that fits the descriptor limit;
- **haproxy-poll**: the same with `busy-polling`;
- **nginx**: nginx's stream proxy (Debian's `libnginx-mod-stream`), a worker per CPU
  with `reuseport` listeners and `proxy_buffer_size 64k`. nginx has no busy-polling
  option, so it has no latency-tuned variant.

Only the path being measured has a proxy running: each path's proxy is started for
its measurement and stopped, and waited for, before the next path starts, so a
spinning or idle proxy never warms or starves the CPUs for another path's figure.
Each proxy runs one thread (or worker) per CPU.

Figures are compared like for like, in two pairs, never across them: **poll**
(icpt-poll against haproxy-poll: both spin) and **no-poll** (icpt against the better
of haproxy and nginx on that figure: nobody spins). The ratio columns are the
interceptor path's figure over the pair's better peer; the target column says
whether the interceptor path is at least as good as that peer in both pairs.

Scenarios: bulk throughput (1 and 8 streams), 1 KiB request/response latency on a
persistent connection, new connections per second at concurrency 64 and one by one,
RSS per idle connection, config scale (a small against a large number of
ServiceEntries, interceptor only), and connect4's own run time per run from the
kernel's BPF statistics (`kernel.bpf_stats_enabled`), for connects no entry
intercepts and for connects to a VIP (sent to the proxy, and on the kernel path to a
backend), with no tracer and with a `/trace` stream of every decision open. Each path figure is the median of several rounds;
the paths' order rotates each round. \"proxy CPU\" rows count the proxy's processes
(nginx's workers included), spinning included, per unit of work; \"machine CPU\" rows
count every process and interrupt on the machine, which with one path alive at a time
is that path's whole cost. The bench never fails on a figure, only when a path does
not work.

Client, proxy and backend share the machine's CPUs, so figures move between runs,
request/response and new connections most. Compare paths within one table, not
tables from different machines.

Other runs print their table and write JSON to `target/bench/` only:
`--quick` (a smoke run, part of `cargo xtask test`), `--scenario NAME` (repeatable),
`--family ipv6` (every path over IPv6), and `--daemon-arg=FLAG` (an extra flag for
every interceptor path, for example `--daemon-arg=--copy-mode=userspace`).
`--bin-dir` and `--peers-dir` run prebuilt binaries and carried peers on a machine
without cargo (`xtask/device-bench.sh`).
";

/// The whole of [`BENCHMARKS_FILE`]: the method, the peers' configurations, then one
/// run's table, which `command` produced.
pub fn benchmarks_markdown(command: &str, table: &str, peer_configs: &str) -> String {
    format!(
        "# Benchmarks\n\n\
         Written by `{REFERENCE_COMMAND}` (or `--short`), which replaces this file after \
         each run of every scenario in which every path worked.\n\n\
         {METHOD}\n\
         ## Peer configurations\n\n\
         As the run below wrote them (connection limits follow its descriptor limit):\n\n\
         ```\n{}\n```\n\n\
         ## Current table\n\n\
         Produced by `{command}`:\n\n\
         ```\n{}\n```\n",
        peer_configs.trim_end(),
        table.trim_end()
    )
}

/// Replaces [`BENCHMARKS_FILE`] under `root`.
pub fn write_benchmarks(
    root: &Path,
    command: &str,
    table: &str,
    peer_configs: &str,
) -> std::io::Result<std::path::PathBuf> {
    let path = root.join(BENCHMARKS_FILE);
    std::fs::write(&path, benchmarks_markdown(command, table, peer_configs))?;
    Ok(path)
}

fn number(value: Option<f64>, unit: &str) -> String {
    let Some(value) = value else {
        return "—".into();
    };
    match unit {
        "conn/s" => format!("{value:.0}"),
        "Gbit/s" | "KiB/conn" => format!("{value:.2}"),
        _ if value >= 1000.0 => format!("{value:.0}"),
        _ => format!("{value:.1}"),
    }
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |value| format!("{value:.2}×"))
}

fn verdict(check: Option<&Check>) -> String {
    let Some(check) = check else {
        return String::new();
    };
    let mark = match check.pass {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "n/a ",
    };
    match &check.detail {
        Some(detail) if check.target.is_empty() => detail.clone(),
        Some(detail) => format!("{mark} {} ({detail})", check.target),
        None => format!("{mark} {}", check.target),
    }
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time, without a date crate.
pub fn utc_stamp(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let seconds_of_day = unix_seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        seconds_of_day / 3600,
        seconds_of_day / 60 % 60,
        seconds_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmarks_file_holds_the_method_and_the_table() {
        let markdown = benchmarks_markdown("cargo xtask bench", "title\nrow\n", "global\n");
        assert!(markdown.starts_with("# Benchmarks\n"));
        assert!(markdown.contains("## Method\n"));
        assert!(markdown.contains("```\nglobal\n```"));
        assert!(markdown.ends_with("```\ntitle\nrow\n```\n"));
    }

    fn row(better: Better, values: &[(&str, f64)]) -> PathRow {
        let paths = paths::all();
        let cells = paths
            .iter()
            .map(|path| {
                values
                    .iter()
                    .find(|(name, _)| *name == path.name)
                    .map(|&(_, value)| value)
            })
            .collect();
        PathRow::new("figure", "µs", better, &paths, cells)
    }

    #[test]
    fn each_pair_is_judged_against_its_own_better_peer() {
        // The spinning peer is far better, but it is only in the poll pair.
        let latency = row(
            Better::Lower,
            &[
                ("icpt-poll", 30.0),
                ("haproxy-poll", 20.0),
                ("icpt", 50.0),
                ("haproxy", 60.0),
                ("nginx", 55.0),
            ],
        )
        .race_target();
        let [poll, no_poll] = [&latency.pairs[0], &latency.pairs[1]];
        assert_eq!(
            (poll.pair, poll.peer, poll.holds),
            ("poll", Some("haproxy-poll"), Some(false))
        );
        assert_eq!(poll.ratio, Some(1.5));
        // The better of haproxy and nginx is the lower latency.
        assert_eq!((no_poll.peer, no_poll.holds), (Some("nginx"), Some(true)));
        assert_eq!(latency.check.unwrap().pass, Some(false));

        let throughput = row(
            Better::Higher,
            &[
                ("icpt-poll", 10.0),
                ("haproxy-poll", 10.0),
                ("icpt", 9.0),
                ("haproxy", 8.0),
                ("nginx", 9.5),
            ],
        )
        .race_target();
        assert_eq!(throughput.pairs[0].holds, Some(true), "a tie holds");
        assert_eq!(throughput.pairs[1].peer, Some("nginx"));
        assert_eq!(throughput.pairs[1].holds, Some(false));
    }

    #[test]
    fn a_missing_figure_leaves_the_target_open() {
        let row = row(
            Better::Higher,
            &[("icpt-poll", 10.0), ("icpt", 9.0), ("nginx", 1.0)],
        )
        .race_target();
        assert_eq!(row.pairs[0].holds, None);
        assert_eq!(row.pairs[1].peer, Some("nginx"));
        assert_eq!(row.check.unwrap().pass, None);
    }

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_767_225_599), "20251231T235959Z");
    }
}
