//! The table, the JSON file, and BENCHMARKS.md.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

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

/// One figure measured on the three paths.
#[derive(Debug, Clone, Serialize)]
pub struct PathRow {
    pub figure: String,
    pub unit: &'static str,
    pub direct: Option<f64>,
    pub interceptor: Option<f64>,
    pub haproxy: Option<f64>,
    /// interceptor / direct
    pub vs_direct: Option<f64>,
    /// interceptor / haproxy
    pub vs_haproxy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

impl PathRow {
    pub fn new(figure: impl Into<String>, unit: &'static str, values: [Option<f64>; 3]) -> Self {
        let [direct, interceptor, haproxy] = values;
        Self {
            figure: figure.into(),
            unit,
            direct,
            interceptor,
            haproxy,
            vs_direct: ratio(interceptor, direct),
            vs_haproxy: ratio(interceptor, haproxy),
            check: None,
        }
    }

    pub fn check(mut self, check: Check) -> Self {
        self.check = Some(check);
        self
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
    pub rows: Vec<PathRow>,
    pub scale_entries: (u32, u32),
    pub scale_rows: Vec<ScaleRow>,
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
        let rule = "-".repeat(150);
        let _ = writeln!(out, "{rule}");
        let _ = writeln!(
            out,
            "{:<34} {:<8} {:>11} {:>11} {:>11} {:>11} {:>12}   target",
            "figure", "unit", "direct", "interceptor", "haproxy", "icpt/direct", "icpt/haproxy"
        );
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:<34} {:<8} {:>11} {:>11} {:>11} {:>11} {:>12}   {}",
                row.figure,
                row.unit,
                number(row.direct, row.unit),
                number(row.interceptor, row.unit),
                number(row.haproxy, row.unit),
                times(row.vs_direct),
                times(row.vs_haproxy),
                verdict(row.check.as_ref()),
            );
        }
        if !self.scale_rows.is_empty() {
            let (small, large) = self.scale_entries;
            let _ = writeln!(out, "{rule}");
            let _ = writeln!(
                out,
                "{:<34} {:<8} {:>11} {:>11} {:>11} {:>11} {:>12}   target",
                "config scale (ServiceEntries)",
                "unit",
                format!("{small}"),
                format!("{large}"),
                "",
                format!("{large}/{small}"),
                ""
            );
            for row in &self.scale_rows {
                let _ = writeln!(
                    out,
                    "{:<34} {:<8} {:>11} {:>11} {:>11} {:>11} {:>12}   {}",
                    row.figure,
                    row.unit,
                    number(row.small, row.unit),
                    number(row.large, row.unit),
                    "",
                    times(row.ratio),
                    "",
                    verdict(row.check.as_ref()),
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
run, measures three paths from a client in that cgroup to a backend in that
namespace, side by side:

- **direct**: to the backend's own address, which no ServiceEntry matches;
- **interceptor**: to a ServiceEntry VIP, which connect4 redirects to the daemon's
  proxy, which connects to the backend;
- **haproxy**: to HAProxy in TCP mode, configured explicitly (xtask installs it).

The daemon, the backends and the load generator are release builds; both proxies run
with one thread per CPU and their default flags (adaptive busy polling is on).
Scenarios: bulk throughput (1 and 8 streams), 1 KiB request/response latency on a
persistent connection, new connections per second at concurrency 64 and one by one,
daemon RSS per idle intercepted connection, and config scale (a small against a large
number of ServiceEntries). Each path figure is the median of several rounds; the
paths' order rotates each round and both proxies are restarted between rounds, so
where a process's threads land becomes round-to-round spread that the median absorbs.
\"proxy CPU\" rows count the proxy process; \"machine CPU\" rows count every process
and interrupt on the machine, and say how fast the interceptor path could go with
every CPU busy. The target column holds the goals the project set itself; the bench
never fails on a figure, only when a path does not work.

Client, proxy and backend share the machine's CPUs, so figures move between runs,
request/response and new connections most. Compare paths within one table, not
tables from different machines.

Other runs print their table and write JSON to `target/bench/` only:
`--quick` (a smoke run, part of `cargo xtask test`), `--scenario NAME` (repeatable),
`--family ipv6` (every path over IPv6), and `--daemon-arg=FLAG` (for example
`--daemon-arg=--copy-mode=userspace` or `--daemon-arg=--busy-poll-us=0`, to compare
the daemon's options).
";

/// The whole of [`BENCHMARKS_FILE`]: the method, then one run's table.
pub fn benchmarks_markdown(table: &str) -> String {
    format!(
        "# Benchmarks\n\n\
         Written by `{REFERENCE_COMMAND}`, which replaces this file after each full run \
         in which every path worked.\n\n\
         {METHOD}\n\
         ## Current table\n\n\
         Produced by `{REFERENCE_COMMAND}`:\n\n\
         ```\n{}\n```\n",
        table.trim_end()
    )
}

/// Replaces [`BENCHMARKS_FILE`] under `root` with `table`.
pub fn write_benchmarks(root: &Path, table: &str) -> std::io::Result<std::path::PathBuf> {
    let path = root.join(BENCHMARKS_FILE);
    std::fs::write(&path, benchmarks_markdown(table))?;
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
        let markdown = benchmarks_markdown("title\nrow\n");
        assert!(markdown.starts_with("# Benchmarks\n"));
        assert!(markdown.contains("## Method\n"));
        assert!(markdown.ends_with("```\ntitle\nrow\n```\n"));
    }

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_767_225_599), "20251231T235959Z");
    }
}
