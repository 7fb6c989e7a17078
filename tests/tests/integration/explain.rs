//! `interceptor explain` agrees with what real connects in the test cgroup do: the
//! service and server they reach, and whether the proxy was in between.

use std::process::Command;

use integration_tests::{
    Sandbox, TestServer,
    admin::{ADMIN, get_from},
    daemon,
    server::{http_get, who},
};
use serde_json::Value;

const CONFIG: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide, namespace: explain}
spec:
  hosts: [wide.explain.test]
  addresses: [198.18.25.0/24]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: narrow, namespace: explain}
spec:
  hosts: [narrow.explain.test]
  addresses: [240.240.25.0/28]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 198.18.25.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: explain}
spec:
  hosts: [web.explain.test, "*.web.explain.test"]
  ports: [{number: 7080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.18.25.3}]
"#;

fn explain(query: &str) -> Value {
    match get_from(ADMIN, &format!("/explain?{query}&output=json")) {
        Ok((200, body)) => serde_json::from_str(&body).expect("JSON explanation"),
        other => panic!("/explain?{query}: {other:?}"),
    }
}

fn route(explanation: &Value) -> (&str, &str) {
    let route = &explanation["routes"][0];
    (
        route["service"].as_str().expect("a route"),
        explanation["datapath"]["path"]
            .as_str()
            .expect("a datapath"),
    )
}

#[test]
fn explain_agrees_with_real_connects_for_each_rule_kind() {
    let sandbox = Sandbox::new("explain-agrees");
    sandbox.add_hosts(&["198.18.25.1", "198.18.25.2", "198.18.25.3", "198.18.26.1"]);
    let _kept = TestServer::start("kept", "198.18.25.1:7000");
    let _narrow = TestServer::start("narrow", "198.18.25.2:7000");
    let _web = TestServer::start("web", "198.18.25.3:7080");
    let _direct = TestServer::start("direct", "198.18.26.1:7000");
    let _daemon = sandbox.start_daemon(CONFIG, &["--datapath", "auto"]);

    // Longest prefix, STATIC: the kernel path to the endpoint.
    let narrow = explain("dest=240.240.25.1:7000");
    assert_eq!(narrow["intercepted"], true, "{narrow:#}");
    assert!(
        narrow["reason"]
            .as_str()
            .unwrap()
            .contains("240.240.25.0/28")
    );
    assert_eq!(route(&narrow), ("ServiceEntry/explain/narrow", "kernel"));
    assert_eq!(
        narrow["routes"][0]["endpoints"][0]["address"],
        "198.18.25.2"
    );
    let seen = who("240.240.25.1:7000").expect("connect");
    assert_eq!(seen.server, "narrow");
    assert!(!seen.went_through_proxy(), "{seen:?}");

    // NONE: the address asked for, on the kernel path.
    let kept = explain("dest=198.18.25.1:7000");
    assert_eq!(route(&kept), ("ServiceEntry/explain/wide", "kernel"));
    assert_eq!(kept["routes"][0]["endpoints"][0]["address"], "198.18.25.1");
    let seen = who("198.18.25.1:7000").expect("connect");
    assert_eq!(seen.server, "kept");
    assert!(!seen.went_through_proxy(), "{seen:?}");

    // Port-only HTTP, routed by a wildcard Host: the proxy.
    let web = explain("dest=198.18.26.1:7080&host=img.web.explain.test");
    assert_eq!(route(&web), ("ServiceEntry/explain/web", "proxy"));
    assert!(
        web["routes"][0]["why"]
            .as_str()
            .unwrap()
            .contains("wildcard host *.web.explain.test"),
        "{web:#}"
    );
    let (server, through_proxy) =
        http_get("198.18.26.1:7080", "img.web.explain.test").expect("request");
    assert_eq!((server.as_str(), through_proxy), ("web", true));

    // No rule: left alone.
    let direct = explain("dest=198.18.26.1:7000");
    assert_eq!(direct["intercepted"], false, "{direct:#}");
    assert!(direct["datapath"].is_null());
    let seen = who("198.18.26.1:7000").expect("connect");
    assert_eq!(seen.server, "direct");
    assert!(!seen.went_through_proxy(), "{seen:?}");

    // The command line prints the same on one screen.
    let output = Command::new(daemon::binary().unwrap())
        .args(["explain", "240.240.25.1:7000", "--admin-addr", ADMIN])
        .output()
        .expect("run interceptor explain");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(text.contains("intercepted: yes"), "{text}");
    assert!(text.contains("datapath:    kernel"), "{text}");
    assert!(text.contains("ServiceEntry/explain/narrow"), "{text}");
}
