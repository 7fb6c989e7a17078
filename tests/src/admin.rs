//! A client for the daemon's admin server: plain HTTP/1.1 GETs, and a parser for
//! the Prometheus/OpenMetrics text format strict enough to catch a malformed page.

use std::{
    collections::{BTreeMap, HashSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// The admin address the ops tests pass with `--admin-addr`.
pub const ADMIN: &str = "127.0.0.1:15000";

/// GETs `path` from the admin server at `addr`: (status, body).
pub fn get_from(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = addr.parse().expect("admin address");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status"))?;
    let chunked = head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

pub fn get(path: &str) -> std::io::Result<(u16, String)> {
    get_from(ADMIN, path)
}

/// GETs `path` and insists on a 200.
pub fn get_ok(path: &str) -> String {
    match get(path) {
        Ok((200, body)) => body,
        Ok((status, body)) => panic!("GET {path}: {status}\n{body}"),
        Err(error) => panic!("GET {path}: {error}"),
    }
}

fn dechunk(mut body: &str) -> std::io::Result<String> {
    let invalid = |what| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| invalid("chunk size"))?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|_| invalid("chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or_else(|| invalid("short chunk"))?);
        body = rest
            .get(size + 2..)
            .ok_or_else(|| invalid("chunk terminator"))?;
    }
}

/// The scraped `/metrics`, parsed.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name → type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`; the sum when
    /// several match (e.g. a counter over all its label values).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|sample| sample.name == name)
            .filter(|sample| {
                labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(value))
            })
            .map(|sample| sample.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`Scrape::value`], panicking with the page when absent.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {:#?}", self.samples))
    }
}

/// Parses the OpenMetrics text format (what prometheus-client writes), checking
/// what a scraper would reject: bad names, bad label syntax, bad values, samples
/// outside a declared family, a missing `# EOF`, anything after it.
pub fn parse_metrics(text: &str) -> Result<Scrape> {
    let mut scrape = Scrape::default();
    let mut seen_eof = false;
    let mut seen_series = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let context = || format!("line {}: {line:?}", number + 1);
        ensure!(!seen_eof, "content after # EOF at {}", context());
        if line == "# EOF" {
            seen_eof = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut fields = comment.splitn(3, ' ');
            let (keyword, family) = (fields.next(), fields.next());
            let family = family.with_context(context)?;
            ensure!(valid_name(family), "bad family name at {}", context());
            match keyword {
                Some("TYPE") => {
                    let kind = fields.next().with_context(context)?;
                    ensure!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "gaugehistogram",
                            "unknown"
                        ]
                        .contains(&kind),
                        "bad type at {}",
                        context()
                    );
                    ensure!(
                        scrape
                            .types
                            .insert(family.to_owned(), kind.to_owned())
                            .is_none(),
                        "family declared twice at {}",
                        context()
                    );
                }
                Some("HELP") | Some("UNIT") => {}
                _ => bail!("unknown comment at {}", context()),
            }
            continue;
        }
        let sample = parse_sample(line).with_context(context)?;
        let family = family_of(&sample.name, &scrape.types)
            .with_context(|| format!("sample outside any declared family at {}", context()))?;
        let kind = &scrape.types[&family];
        if kind == "counter" {
            ensure!(
                sample.name.ends_with("_total") || sample.name.ends_with("_created"),
                "counter sample without _total at {}",
                context()
            );
            ensure!(sample.value >= 0.0, "negative counter at {}", context());
        }
        ensure!(
            seen_series.insert(format!("{}{:?}", sample.name, sample.labels)),
            "duplicate series at {}",
            context()
        );
        scrape.samples.push(sample);
    }
    ensure!(seen_eof, "no # EOF at the end");
    Ok(scrape)
}

fn family_of(name: &str, types: &BTreeMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_owned());
    }
    ["_total", "_created", "_bucket", "_sum", "_count", "_info"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|family| types.contains_key(*family))
        .map(str::to_owned)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).context("a sample needs a value")?;
    let name = &line[..name_end];
    ensure!(valid_name(name), "bad metric name {name:?}");
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = inside.split_once('=').context("label without =")?;
            ensure!(valid_name(key), "bad label name {key:?}");
            let quoted = after_key
                .strip_prefix('"')
                .context("unquoted label value")?;
            let (value, after_value) = unquote(quoted)?;
            ensure!(
                labels.insert(key.to_owned(), value).is_none(),
                "label {key} twice"
            );
            inside = match after_value.strip_prefix(',') {
                Some(next) => next,
                None => {
                    ensure!(
                        after_value.starts_with('}'),
                        "expected , or }} after a label"
                    );
                    after_value
                }
            };
        }
    }
    let mut fields = rest.trim_start().split(' ');
    let value = fields.next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number
            .parse()
            .with_context(|| format!("bad value {number:?}"))?,
    };
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<f64>()
            .with_context(|| format!("bad timestamp {timestamp:?}"))?;
    }
    ensure!(fields.next().is_none(), "trailing fields");
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads an escaped label value up to its closing quote: (value, the rest after it).
fn unquote(quoted: &str) -> Result<(String, &str)> {
    let mut value = String::new();
    let mut escaped = false;
    for (offset, c) in quoted.char_indices() {
        match (escaped, c) {
            (true, 'n') => value.push('\n'),
            (true, '"' | '\\') => value.push(c),
            (true, _) => bail!("bad escape in a label value"),
            (false, '\\') => {
                escaped = true;
                continue;
            }
            (false, '"') => return Ok((value, &quoted[offset + 1..])),
            (false, _) => value.push(c),
        }
        escaped = false;
    }
    bail!("unterminated label value")
}

/// Scrapes and parses `/metrics`.
pub fn scrape() -> Scrape {
    let text = get_ok("/metrics");
    parse_metrics(&text)
        .unwrap_or_else(|error| panic!("/metrics does not parse: {error:#}\n{text}"))
}

/// Scrapes until `done` holds, or panics with the last page after `timeout`.
pub fn scrape_until(timeout: Duration, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let scrape = scrape();
        if done(&scrape) {
            return scrape;
        }
        if Instant::now() > deadline {
            panic!(
                "metrics never reached the expected state: {:#?}",
                scrape.samples
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_prometheus_client_writes() {
        let text = "# HELP a_total Things.\n# TYPE a counter\na_total{reason=\"x\\\"y\",k=\"v\"} 3\n# TYPE h histogram\n# UNIT h seconds\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n# EOF\n";
        let scrape = parse_metrics(text).unwrap();
        assert_eq!(scrape.value("a_total", &[("reason", "x\"y")]), Some(3.0));
        assert_eq!(scrape.value("h_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(scrape.value("h_count", &[]), Some(2.0));
    }

    #[test]
    fn rejects_malformed_pages() {
        for bad in [
            "a_total 1\n# EOF\n",
            "# TYPE a counter\na_total 1\n",
            "# TYPE a counter\na 1\n# EOF\n",
            "# TYPE a counter\na_total{x=1} 1\n# EOF\n",
            "# TYPE a gauge\na one\n# EOF\n",
            "# TYPE a gauge\na 1\n# EOF\na 2\n",
        ] {
            assert!(parse_metrics(bad).is_err(), "accepted {bad:?}");
        }
    }
}
