//! `run --kubernetes`: the real kube-rs client in the daemon against the in-process
//! API server stand-in ([`ApiServer`]), with real programs and real traffic.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    time::{Duration, Instant},
};

use integration_tests::{
    ChildCgroup, Daemon, Sandbox, TestServer,
    admin::{scrape, scrape_until},
    apiserver::ApiServer,
    run_in_cgroup,
    server::{assert_refused_by_proxy, connect, who},
    vip_entry,
};

/// How soon an applied change must carry traffic.
const CHANGE_DEADLINE: Duration = Duration::from_secs(1);

/// Starts the daemon on the stand-in only (its --config file is empty).
fn start_daemon(sandbox: &Sandbox, api: &ApiServer, extra: &[&str]) -> Daemon {
    let kubeconfig = sandbox.workdir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let kubeconfig = kubeconfig.to_str().expect("UTF-8 path").to_owned();
    let mut args = vec!["--kubernetes", "--kubeconfig", &kubeconfig];
    args.extend_from_slice(extra);
    sandbox.start_daemon("", &args)
}

/// Waits until a `WHO` to `addr` is answered by `server`, and returns how long that
/// took; panics past [`CHANGE_DEADLINE`].
fn until_served_by(addr: &str, server: &str, since: Instant) -> Duration {
    loop {
        if let Ok(seen) = who(addr)
            && seen.server == server
            && seen.went_through_proxy()
        {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < CHANGE_DEADLINE,
            "{addr} was not served by {server} within {CHANGE_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A ServiceEntry at `vip` whose endpoints are the workloads labelled `app: web`.
fn selecting_entry(vip: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: web
  namespace: shop
spec:
  hosts: [web.shop.test]
  addresses: [{vip}]
  ports:
  - number: 7000
    name: tcp
    protocol: TCP
  resolution: STATIC
  workloadSelector:
    labels:
      app: web
"#
    )
}

fn workload_entry(address: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: web-vm
  namespace: shop
spec:
  address: {address}
  labels:
    app: web
"#
    )
}

fn pod(address: &str, ready: bool) -> String {
    let ready = if ready { "True" } else { "False" };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels:
    app: web
spec:
  containers:
  - name: web
    image: web
status:
  phase: Running
  podIP: {address}
  conditions:
  - type: Ready
    status: "{ready}"
"#
    )
}

#[test]
fn service_entries_workload_entries_and_pods_follow_the_api_within_a_second() {
    let sandbox = Sandbox::new("kube-apply");
    for host in ["198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.13"] {
        sandbox.add_host(host.parse().unwrap());
    }
    let _first = TestServer::start("first", "198.18.0.10:7000");
    let _second = TestServer::start("second", "198.18.0.11:7000");
    let _vm = TestServer::start("vm", "198.18.0.12:7000");
    let _pod = TestServer::start("pod", "198.18.0.13:7000");
    let api = ApiServer::start();
    api.apply(&vip_entry("shop", "db", "240.240.9.1", "198.18.0.10"));
    let daemon = start_daemon(&sandbox, &api, &[]);
    assert_eq!(who("240.240.9.1:7000").unwrap().server, "first");

    // Modified: the endpoint moves.
    let since = Instant::now();
    api.apply(&vip_entry("shop", "db", "240.240.9.1", "198.18.0.11"));
    until_served_by("240.240.9.1:7000", "second", since);

    // Added: a ServiceEntry that selects its endpoints, and a WorkloadEntry.
    let since = Instant::now();
    api.apply(&selecting_entry("240.240.9.2"));
    api.apply(&workload_entry("198.18.0.12"));
    until_served_by("240.240.9.2:7000", "vm", since);

    // The WorkloadEntry gives way to a Running and Ready pod with the same labels;
    // a pod that is not Ready is no endpoint.
    let since = Instant::now();
    api.delete("WorkloadEntry", "shop", "web-vm");
    api.apply(&pod("198.18.0.13", true));
    until_served_by("240.240.9.2:7000", "pod", since);
    let since = Instant::now();
    api.apply(&pod("198.18.0.13", false));
    loop {
        if assert_no_endpoint("240.240.9.2:7000") {
            break;
        }
        assert!(
            since.elapsed() < CHANGE_DEADLINE,
            "the unready pod still serves"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Deleted: the VIP is no longer intercepted.
    let since = Instant::now();
    api.delete("ServiceEntry", "shop", "db");
    loop {
        let direct = connect("240.240.9.1:7000").is_err();
        if direct {
            break;
        }
        assert!(
            since.elapsed() < CHANGE_DEADLINE,
            "a deleted ServiceEntry still intercepts"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = daemon.logs();
    assert!(
        logs.contains("version=\"networking.istio.io/v1\""),
        "{logs}"
    );
}

/// Whether the proxy refuses `addr` for want of an endpoint (rather than serving it).
fn assert_no_endpoint(addr: &str) -> bool {
    match who(addr) {
        Ok(_) => false,
        Err(_) => {
            assert_refused_by_proxy(addr, b"WHO\n");
            true
        }
    }
}

#[test]
fn an_invalid_object_is_rejected_with_an_event_and_its_valid_version_stays() {
    let sandbox = Sandbox::new("kube-invalid");
    sandbox.add_host("198.18.0.10".parse().unwrap());
    sandbox.add_host("198.18.0.11".parse().unwrap());
    let _first = TestServer::start("first", "198.18.0.10:7000");
    let _second = TestServer::start("second", "198.18.0.11:7000");
    let api = ApiServer::start();
    api.apply(&vip_entry("shop", "good", "240.240.9.1", "198.18.0.10"));
    api.apply(&vip_entry("shop", "bad", "240.240.9.999", "198.18.0.11"));
    let daemon = start_daemon(&sandbox, &api, &[]);

    // The valid one in the same namespace applies.
    assert_eq!(who("240.240.9.1:7000").unwrap().server, "first");
    let rejected = |scrape: &integration_tests::admin::Scrape| {
        scrape.must(
            "interceptor_config_objects_rejected_total",
            &[("kind", "ServiceEntry")],
        )
    };
    assert_eq!(rejected(&scrape()), 1.0);
    assert_eq!(
        scrape().must("interceptor_config_source_up", &[("source", "kubernetes")]),
        1.0
    );
    let logs = daemon.wait_for_log("object rejected", 1);
    assert!(logs.contains("ServiceEntry/shop/bad"), "{logs}");
    assert!(logs.contains("spec.addresses"), "{logs}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let event = loop {
        if let Some(event) = api.events().into_iter().find(|event| {
            event["regarding"]["name"] == "bad" && event["regarding"]["kind"] == "ServiceEntry"
        }) {
            break event;
        }
        assert!(
            Instant::now() < deadline,
            "no Event posted on the rejected object"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["namespace"], "shop");
    assert!(
        event["note"].as_str().unwrap().contains("spec.addresses"),
        "{event}"
    );

    // The valid one turned invalid: its previous version stays in force, and the
    // rejection is counted once.
    api.apply(&vip_entry("shop", "good", "240.240.9.1", "not-an-ip"));
    scrape_until(Duration::from_secs(1), |scrape| rejected(scrape) == 2.0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(who("240.240.9.1:7000").unwrap().server, "first");
    assert_eq!(rejected(&scrape()), 2.0);
}

#[test]
fn a_cut_watch_and_410_gone_drop_no_connection_and_flap_no_map() {
    let sandbox = Sandbox::new("kube-watch-breaks");
    sandbox.add_host("198.18.0.10".parse().unwrap());
    sandbox.add_host("198.18.0.11".parse().unwrap());
    let _first = TestServer::start("first", "198.18.0.10:7000");
    let _second = TestServer::start("second", "198.18.0.11:7000");
    let api = ApiServer::start();
    api.apply(&vip_entry("shop", "db", "240.240.9.1", "198.18.0.10"));
    let daemon = start_daemon(&sandbox, &api, &[]);

    // A long-lived connection through the proxy.
    let mut open = connect("240.240.9.1:7000").unwrap();
    open.write_all(b"ECHO\n").unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "first");
    let echo = |reader: &mut BufReader<std::net::TcpStream>,
                open: &mut std::net::TcpStream,
                text: &str| {
        open.write_all(format!("{text}\n").as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), text, "the open connection broke");
    };

    // Let the start-up settle, then count reloads: nothing the watches re-list
    // unchanged may reload the maps.
    std::thread::sleep(Duration::from_millis(500));
    let reloads = |scrape: &integration_tests::admin::Scrape| {
        scrape.must("interceptor_config_reloads_total", &[])
    };
    let before = reloads(&scrape());
    api.bookmark();
    api.cut_watches();
    echo(&mut reader, &mut open, "after the cut");
    api.expire_history();
    let lists_before = list_requests(&api);
    // The watch resumes, is told 410 Gone, and re-lists.
    let deadline = Instant::now() + Duration::from_secs(10);
    while list_requests(&api) <= lists_before {
        assert!(
            Instant::now() < deadline,
            "no re-list after 410 Gone: {:#?}",
            api.requests()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    echo(&mut reader, &mut open, "after 410");
    assert_eq!(who("240.240.9.1:7000").unwrap().server, "first");
    assert_eq!(
        reloads(&scrape()),
        before,
        "a re-list of unchanged objects reloaded the maps"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while scrape().value("interceptor_config_source_up", &[("source", "kubernetes")]) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the source never came back up: {}",
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // And changes after the re-list still arrive within a second.
    let since = Instant::now();
    api.apply(&vip_entry("shop", "db", "240.240.9.1", "198.18.0.11"));
    until_served_by("240.240.9.1:7000", "second", since);
    echo(&mut reader, &mut open, "after the change");
}

fn list_requests(api: &ApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|request| request.contains("/serviceentries?") && !request.contains("watch=true"))
        .count()
}

#[test]
fn a_missing_rbac_rule_keeps_the_daemon_unready_and_says_which() {
    let sandbox = Sandbox::new("kube-rbac");
    let api = ApiServer::start();
    api.forbid("pods");
    let kubeconfig = sandbox.workdir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let config = sandbox.workdir.join("config.yaml");
    std::fs::write(&config, "").unwrap();
    let daemon = integration_tests::daemon::spawn(
        &config,
        &sandbox.cgroup,
        &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
        &[],
    )
    .expect("spawn the daemon");
    let logs = daemon.wait_for_log("pods is forbidden", 1);
    assert!(logs.contains("kind=\"Pod\""), "{logs}");
    let (status, _) = integration_tests::admin::get("/healthz/ready").unwrap();
    assert_eq!(status, 503, "ready without the pods listed");
    assert_eq!(
        scrape().must("interceptor_config_source_up", &[("source", "kubernetes")]),
        0.0
    );
}

/// Start-up that cannot discover the served versions ends the daemon, non-zero and
/// with one line naming the API server, both when nothing listens there and when
/// something accepts connections and never answers: the kubelet then restarts it
/// with back-off, where a daemon waiting unready would say nothing.
#[test]
fn an_api_server_unreachable_at_start_ends_the_daemon_with_one_line() {
    let sandbox = Sandbox::new("kube-unreachable");
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    // Never accepted: the kernel completes the handshake into the backlog, and the
    // request waits there for an answer that never comes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = sandbox.workdir.join("config.yaml");
    std::fs::write(&config, "").unwrap();
    for (server, cause) in [
        (refused, "Connection refused"),
        (
            silent.local_addr().unwrap(),
            "did not answer discovery within",
        ),
    ] {
        let kubeconfig = sandbox.workdir.join("kubeconfig");
        integration_tests::apiserver::write_kubeconfig(server, &kubeconfig);
        let started = Instant::now();
        let mut daemon = integration_tests::daemon::spawn(
            &config,
            &sandbox.cgroup,
            &["--kubernetes", "--kubeconfig", kubeconfig.to_str().unwrap()],
            &[],
        )
        .expect("spawn the daemon");
        let code = daemon.wait();
        let logs = daemon.logs();
        assert_eq!(code, Some(1), "{logs}");
        assert!(started.elapsed() < Duration::from_secs(15), "{logs}");
        let errors: Vec<&str> = logs
            .lines()
            .filter(|line| line.starts_with("interceptor: "))
            .collect();
        assert_eq!(errors.len(), 1, "{logs}");
        assert!(errors[0].contains(&format!("http://{server}/")), "{logs}");
        assert!(errors[0].contains(cause), "{logs}");
        assert!(!logs.contains("panicked"), "{logs}");
    }
}

/// A port-only TLS ServiceEntry `name` for `host`, with one STATIC endpoint.
fn tls_entry(name: &str, host: &str, endpoint: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: shop
spec:
  hosts: [{host}]
  ports:
  - number: 443
    name: tls
    protocol: TLS
  resolution: STATIC
  endpoints:
  - address: {endpoint}
"#
    )
}

const TLS_ROUTE: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: via-firewall
  namespace: shop
spec:
  hosts: [shop.test]
  tls:
  - match:
    - sniHosts: [shop.test]
    route:
    - destination:
        host: firewall.shop.test
"#;

const DESTINATION_RULE: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: shop
  namespace: shop
spec:
  host: shop.test
  trafficPolicy:
    tls:
      mode: DISABLE
"#;

#[test]
fn virtual_services_and_destination_rules_follow_the_api_within_a_second() {
    use integration_tests::tls::{HelloDelivery, TestCa, start_tls_server, tls_who};

    let sandbox = Sandbox::new("kube-routes");
    sandbox.add_host("198.18.0.10".parse().unwrap());
    sandbox.add_host("198.18.0.11".parse().unwrap());
    let ca = TestCa::new();
    start_tls_server(
        "origin",
        "198.18.0.10:443",
        ca.server_config(&["shop.test"]),
    );
    start_tls_server(
        "firewall",
        "198.18.0.11:443",
        ca.server_config(&["shop.test"]),
    );
    let client = ca.client_config();
    let api = ApiServer::start();
    api.apply(&tls_entry("shop", "shop.test", "198.18.0.10"));
    api.apply(&tls_entry("firewall", "firewall.shop.test", "198.18.0.11"));
    let _daemon = start_daemon(&sandbox, &api, &[]);
    // No host listens there: only a redirect reaches anything.
    let served = || tls_who("198.18.9.1:443", "shop.test", &client, HelloDelivery::Whole).ok();
    assert_eq!(served().as_deref(), Some("origin shop.test"));

    let until = |expected: &str| {
        let since = Instant::now();
        while served().as_deref() != Some(expected) {
            assert!(
                since.elapsed() < CHANGE_DEADLINE,
                "not {expected:?} within {CHANGE_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    api.apply(TLS_ROUTE);
    until("firewall shop.test");
    api.apply(DESTINATION_RULE);
    api.delete("VirtualService", "shop", "via-firewall");
    until("origin shop.test");
    api.delete("DestinationRule", "shop", "shop");
    let scrape = scrape();
    for kind in ["VirtualService", "DestinationRule"] {
        assert_eq!(
            scrape.must(
                "interceptor_config_objects_rejected_total",
                &[("kind", kind)]
            ),
            0.0
        );
    }
}

#[test]
fn only_the_namespaces_given_are_read() {
    let sandbox = Sandbox::new("kube-namespaces");
    sandbox.add_host("198.18.0.10".parse().unwrap());
    let _first = TestServer::start("first", "198.18.0.10:7000");
    let api = ApiServer::start();
    api.apply(&vip_entry("shop", "db", "240.240.9.1", "198.18.0.10"));
    api.apply(&vip_entry("other", "db", "240.240.9.2", "198.18.0.10"));
    let _daemon = start_daemon(&sandbox, &api, &["--namespace", "shop"]);
    assert_eq!(who("240.240.9.1:7000").unwrap().server, "first");
    // Not intercepted: the VIP leads nowhere.
    assert!(connect("240.240.9.2:7000").is_err());
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .all(|request| !request.contains("/serviceentries?")
                || request.contains("/namespaces/shop/")),
        "a watch outside the namespace: {requests:#?}"
    );
}

/// A pod `namespace/name` that is no endpoint: only its uid matters, which names its
/// cgroup.
fn client_pod(namespace: &str, name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
spec:
  containers:
  - name: client
    image: client
status:
  phase: Running
"#
    )
}

/// `shop/scoped` at 198.18.0.31, to the endpoint 198.18.0.30, exported `export_to`.
fn scoped_entry(export_to: &str) -> String {
    format!(
        "{}  exportTo: {export_to}\n",
        vip_entry("shop", "scoped", "198.18.0.31", "198.18.0.30")
    )
}

/// The server that answers a `WHO` to `addr` from a process of `cgroup`.
fn who_from(cgroup: &ChildCgroup, addr: &str) -> String {
    let (host, port) = addr.split_once(':').unwrap();
    let answer = run_in_cgroup(
        &cgroup.0,
        &format!("exec 3<>/dev/tcp/{host}/{port}; echo WHO >&3; head -n 1 <&3"),
    );
    answer
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn export_to_dot_intercepts_the_pods_of_its_namespace_and_no_one_else() {
    let sandbox = Sandbox::new("kube-export");
    for host in ["198.18.0.30", "198.18.0.31", "198.18.0.32"] {
        sandbox.add_host(host.parse().unwrap());
    }
    // Intercepted connects go to the endpoint; the others reach the address itself.
    let _endpoint = TestServer::start("endpoint", "198.18.0.30:7000");
    let _scoped_address = TestServer::start("direct", "198.18.0.31:7000");
    let _public_address = TestServer::start("direct", "198.18.0.32:7000");
    let api = ApiServer::start();
    api.apply(&scoped_entry("[.]"));
    api.apply(&vip_entry("shop", "public", "198.18.0.32", "198.18.0.30"));
    api.apply(&client_pod("shop", "shop-client"));
    api.apply(&client_pod("blog", "blog-client"));
    let kubepods = ChildCgroup::create(sandbox.cgroup.join("kubepods"));
    let pod_cgroup = |namespace: &str, name: &str| {
        ChildCgroup::create(
            kubepods
                .0
                .join(format!("pod{}", api.uid("Pod", namespace, name))),
        )
    };
    let shop_pod = pod_cgroup("shop", "shop-client");
    let blog_pod = pod_cgroup("blog", "blog-client");
    let _daemon = start_daemon(&sandbox, &api, &[]);
    // A container started after the daemon: found by the next walk of the tree.
    let shop = ChildCgroup::create(shop_pod.0.join("client"));
    let blog = ChildCgroup::create(blog_pod.0.join("client"));
    let since = Instant::now();
    while who_from(&shop, "198.18.0.31:7000") != "endpoint" {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "a pod in shop is not intercepted by shop's entry exported to `.`"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        who_from(&blog, "198.18.0.31:7000"),
        "direct",
        "a pod in blog"
    );
    // The harness is a host process: namespace `default` (--host-namespace).
    assert_eq!(who("198.18.0.31:7000").unwrap().server, "direct");
    // An entry without exportTo is everyone's.
    for cgroup in [&shop, &blog] {
        assert_eq!(who_from(cgroup, "198.18.0.32:7000"), "endpoint");
    }
    assert_eq!(who("198.18.0.32:7000").unwrap().server, "endpoint");

    // Exported to blog as well: its pods follow within a second, the harness still not.
    let since = Instant::now();
    api.apply(&scoped_entry("[., blog]"));
    while who_from(&blog, "198.18.0.31:7000") != "endpoint" {
        assert!(
            since.elapsed() < CHANGE_DEADLINE,
            "exporting to blog did not reach blog's pod"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(who("198.18.0.31:7000").unwrap().server, "direct");
    drop((shop, blog));
}

#[test]
fn host_processes_are_in_the_host_namespace_given() {
    let sandbox = Sandbox::new("kube-host-ns");
    for host in ["198.18.0.30", "198.18.0.31"] {
        sandbox.add_host(host.parse().unwrap());
    }
    let _endpoint = TestServer::start("endpoint", "198.18.0.30:7000");
    let _address = TestServer::start("direct", "198.18.0.31:7000");
    let api = ApiServer::start();
    api.apply(&scoped_entry("[.]"));
    let _daemon = start_daemon(&sandbox, &api, &["--host-namespace", "shop"]);
    assert_eq!(who("198.18.0.31:7000").unwrap().server, "endpoint");
}
