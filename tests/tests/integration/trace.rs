//! `interceptor trace` shows what happened to a client's connects, in order: one
//! redirected to the proxy (with the proxy's line for it), one left alone with its
//! reason, and one refused.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use integration_tests::{
    ChildCgroup, Sandbox, TestServer,
    admin::{ADMIN, scrape_until},
    daemon, run_in_cgroup,
    server::{connect, who},
};
use serde_json::Value;

const CONFIG: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: proxied
  namespace: trace
  annotations: {interceptor.dev/datapath: proxy}
spec:
  hosts: [proxied.trace.test]
  addresses: [198.18.27.0/24]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: empty, namespace: trace}
spec:
  hosts: [empty.trace.test]
  addresses: [240.240.27.5]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: STATIC
"#;

/// A running `interceptor trace` and the lines it printed so far.
struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Tracer {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(daemon::binary().unwrap())
            .args(["trace", "--admin-addr", ADMIN])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("run interceptor trace");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tracer = Self {
            child,
            lines,
            seen: Vec::new(),
        };
        // The first line comes once the stream is open, and the programs trace.
        tracer.until(|line| line.contains("tracing"));
        tracer
    }

    /// Reads lines until one satisfies `wanted`, which it returns.
    fn until(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(error) => panic!("no such line ({error}); seen: {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|error| panic!("{line}: {error}"))
}

/// A JSON line from connect4/6 for `destination`.
fn connect_to(destination: &'static str) -> impl Fn(&str) -> bool {
    move |line| {
        let line = json(line);
        line["source"] == "connect" && line["destination"] == destination
    }
}

#[test]
fn trace_shows_redirected_untouched_and_refused_connects_in_order() {
    let sandbox = Sandbox::new("trace");
    sandbox.add_host("198.18.27.1".parse().unwrap());
    let _intercepted = TestServer::start("intercepted", "198.18.27.1:7000");
    let _direct = TestServer::start("direct", "198.18.27.1:7001");
    // Auto: the annotated entry takes the proxy, the empty one the kernel path.
    let _daemon = sandbox.start_daemon(CONFIG, &["--datapath", "auto", "--admin-addr", ADMIN]);
    let cgroup = sandbox.cgroup.display().to_string();
    let mut traced = Tracer::start(&["--cgroup", &cgroup, "--output", "json"]);
    // The same in text, and a stream narrowed to one network and port: each sees
    // what it asked for.
    let mut text = Tracer::start(&["--cgroup", &cgroup]);
    let mut narrow = Tracer::start(&[
        "--dest",
        "198.18.27.0/24",
        "--port",
        "7001",
        "--output",
        "json",
    ]);

    // Redirected to the proxy, which forwards it and says how it ended.
    let seen = who("198.18.27.1:7000").expect("connect through the proxy");
    assert_eq!(seen.server, "intercepted");
    assert!(seen.went_through_proxy(), "{seen:?}");
    let redirected = json(&traced.until(connect_to("198.18.27.1:7000")));
    assert_eq!(redirected["verdict"], "proxy", "{redirected}");
    assert_eq!(redirected["intercepted"], true);
    assert!(
        redirected["to"].as_str().unwrap().starts_with("127."),
        "{redirected}"
    );
    assert!(redirected["cgroup_id"].as_u64().unwrap() > 0);
    let proxied = json(&traced.until(|line| json(line)["source"] == "proxy"));
    assert_eq!(proxied["destination"], "198.18.27.1:7000", "{proxied}");
    assert_eq!(proxied["service_entry"], "ServiceEntry/trace/proxied");
    assert_eq!(proxied["endpoint"], "198.18.27.1:7000");
    assert_eq!(proxied["outcome"], "closed");
    assert_eq!(proxied["bytes_sent"], 4, "WHO\\n: {proxied}");
    assert!(proxied["bytes_received"].as_u64().unwrap() > 0);
    // The proxy's own upstream connect, from the same cgroup, is traced too: left
    // alone for its mark.
    let bypassed = |line: &str| json(line)["verdict"] == "bypass_mark";
    if !traced.seen.iter().any(|line| bypassed(line)) {
        traced.until(bypassed);
    }

    // Left alone, and why.
    let seen = who("198.18.27.1:7001").expect("a direct connect");
    assert!(!seen.went_through_proxy(), "{seen:?}");
    let untouched = json(&traced.until(connect_to("198.18.27.1:7001")));
    assert_eq!(untouched["verdict"], "no_rule", "{untouched}");
    assert_eq!(untouched["intercepted"], false);
    assert!(untouched["to"].is_null());

    // Refused: the kernel-path service has no endpoint.
    let error = connect("240.240.27.5:7000").expect_err("nothing to connect to");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
    let refused = json(&traced.until(connect_to("240.240.27.5:7000")));
    assert_eq!(refused["verdict"], "no_endpoint", "{refused}");
    assert_eq!(refused["intercepted"], true);

    // The text stream saw the same, in words.
    let refused = text.until(|line| line.contains("240.240.27.5:7000"));
    assert!(
        refused.contains("refused: the service has no endpoint (kernel path)"),
        "{refused}"
    );
    assert!(
        text.seen
            .iter()
            .any(|line| line.contains("198.18.27.1:7001 cgroup=")
                && line.contains("left alone: no ServiceEntry intercepts this address and port")),
        "{:#?}",
        text.seen
    );
    assert!(
        text.seen
            .iter()
            .any(|line| line.contains("redirected to the proxy at")),
        "{:#?}",
        text.seen
    );
    assert!(
        text.seen
            .iter()
            .any(|line| line.contains(" proxy   198.18.27.1:7000 from ")
                && line.contains("ServiceEntry/trace/proxied -> 198.18.27.1:7000, closed")),
        "{:#?}",
        text.seen
    );
    // The narrow stream saw the one connect to its network and port, and nothing
    // before it.
    narrow.until(connect_to("198.18.27.1:7001"));
    assert_eq!(narrow.seen.len(), 2, "{:#?}", narrow.seen);
    // The worked example in docs/operations.md comes from here.
    eprintln!("{}", text.seen.join("\n"));

    // Three streams open; once their clients are gone (noticed at the next
    // heartbeat), none is, and the programs stop emitting.
    let streams = |count: f64| {
        move |scrape: &integration_tests::admin::Scrape| {
            scrape.value("interceptor_trace_streams", &[]) == Some(count)
        }
    };
    scrape_until(Duration::from_secs(1), streams(3.0));
    drop(traced);
    drop(text);
    drop(narrow);
    scrape_until(Duration::from_secs(10), streams(0.0));

    // A cgroup that does not exist is named in the error, and nothing is traced.
    let output = Command::new(daemon::binary().unwrap())
        .args(["trace", "--admin-addr", ADMIN, "--cgroup", "no-such-cgroup"])
        .output()
        .expect("run interceptor trace");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr.contains("answered 400: cgroup no-such-cgroup:"),
        "{stderr}"
    );
}

/// A cgroup below the sandbox's, removed when dropped (its processes have exited).
#[test]
fn a_cgroup_stream_shows_only_the_connections_of_that_cgroup() {
    let sandbox = Sandbox::new("trace-cgroup");
    sandbox.add_host("198.18.27.1".parse().unwrap());
    let _server = TestServer::start("server", "198.18.27.1:7000");
    let config = format!(
        "{CONFIG}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: kernel, namespace: trace}}
spec:
  hosts: [kernel.trace.test]
  addresses: [240.240.27.6]
  ports: [{{number: 7000, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: 198.18.27.1}}]
"
    );
    let _daemon = sandbox.start_daemon(&config, &["--datapath", "auto", "--admin-addr", ADMIN]);
    let child = ChildCgroup::create(sandbox.cgroup.join("client"));
    let child_id = child.id();
    let mut traced = Tracer::start(&["--cgroup", child.0.to_str().unwrap(), "--output", "json"]);

    // The harness, in the sandbox's cgroup above: through the proxy, and on the kernel path.
    for destination in ["198.18.27.1:7000", "240.240.27.6:7000"] {
        assert_eq!(who(destination).expect(destination).server, "server");
    }
    // The same from a process of the child cgroup.
    let answers = run_in_cgroup(
        &child.0,
        "for destination in 198.18.27.1 240.240.27.6; do
           exec 3<>/dev/tcp/$destination/7000; echo WHO >&3; head -n 1 <&3; exec 3<&-
         done",
    );
    assert_eq!(answers.matches("server").count(), 2, "{answers}");

    // The two lines come as the two connections end, in either order.
    let from = |source: &'static str| move |line: &str| json(line)["source"] == source;
    for source in ["proxy", "kernel_close"] {
        if !traced.seen.iter().any(|line| from(source)(line)) {
            traced.until(from(source));
        }
    }
    let find = |source| {
        let line = traced.seen.iter().find(|line| from(source)(line)).unwrap();
        json(line)
    };
    let proxied = find("proxy");
    assert_eq!(proxied["cgroup_id"], child_id, "{proxied}");
    let closed = find("kernel_close");
    assert_eq!(closed["cgroup_id"], child_id, "{closed}");
    assert_eq!(closed["destination"], "240.240.27.6:7000", "{closed}");
    // Every line came from the child: its two connects and the proxy's bypassed
    // upstream connect are the harness's cgroup's only if the filter leaked.
    for line in &traced.seen[1..] {
        let line = json(line);
        assert_eq!(line["cgroup_id"], child_id, "{line}");
    }
    let connects = traced
        .seen
        .iter()
        .filter(|line| json(line)["source"] == "connect")
        .count();
    assert!(connects >= 1, "{:#?}", traced.seen);
    drop(traced);
}
