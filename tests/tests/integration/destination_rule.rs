//! DestinationRule `trafficPolicy.tls` acted on: the proxy originates TLS (SIMPLE,
//! MUTUAL) to real rustls servers with rcgen certificates, verifying what the rule
//! says, and refuses what it cannot honour. The clients speak plaintext.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{
    Sandbox,
    admin::{ADMIN, get_ok, scrape, scrape_until},
    origin::start_origin_server,
    replace_file,
    server::connect,
    tls::TestCa,
};

const ADMIN_ARGS: [&str; 2] = ["--admin-addr", ADMIN];

/// Sends one line in plaintext and returns the whole answer, or the error a reset
/// gives.
fn ask(addr: &str, line: &str) -> std::io::Result<String> {
    let mut stream = connect(addr)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.trim().to_owned())
}

fn assert_reset(addr: &str) {
    match ask(addr, "hello") {
        Err(error) => assert!(
            matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            ),
            "{addr}: {error}"
        ),
        Ok(answer) => assert!(answer.is_empty(), "{addr} answered {answer:?}"),
    }
}

/// A sandbox with the test hosts `hosts`, and a fresh CA whose certificate is
/// `ca.pem` in the returned directory, the sandbox's.
fn tls_sandbox(name: &str, hosts: &[&str]) -> (Sandbox, TestCa, PathBuf) {
    let sandbox = Sandbox::new(name);
    sandbox.add_hosts(hosts);
    let ca = TestCa::new();
    let dir = sandbox.workdir.clone();
    replace_file(&dir.join("ca.pem"), ca.certificate_pem());
    (sandbox, ca, dir)
}

fn upstream_tls_failures() -> f64 {
    scrape()
        .value(
            "interceptor_connections_failed_total",
            &[("reason", "upstream_tls")],
        )
        .unwrap_or(0.0)
}

/// The reference's MongoDB example, shaped the same way: VIPs, STATIC endpoints on
/// VMs, and a DestinationRule that originates mTLS with files.
fn mongo_config(dir: &Path) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-mongocluster
spec:
  hosts:
  - mymongodb.somedomain
  addresses:
  - 240.240.20.0/24
  ports:
  - number: 27018
    name: mongodb
    protocol: MONGO
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 198.18.20.1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: mtls-mongocluster
spec:
  host: mymongodb.somedomain
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: {dir}/myclientcert.pem
      privateKey: {dir}/client_private_key.pem
      caCertificates: {dir}/rootcacerts.pem
"#,
        dir = dir.display()
    )
}

/// The origin of the MongoDB example on 198.18.20.1:27018, requiring a client
/// certificate from `ca`. It knows one issued for each of `clients`, by that label
/// (`client-1` is issued for `client-1.example`). The first is installed, with the CA,
/// where [`mongo_config`] names them; returns each one's (certificate, key) PEM.
fn start_mongo_origin(ca: &TestCa, dir: &Path, clients: &[&str]) -> Vec<(String, String)> {
    let mut known = Vec::new();
    let mut issued = Vec::new();
    for label in clients {
        let (der, pem, key) = ca.issue(&[&format!("{label}.example")]);
        known.push((der, (*label).to_owned()));
        issued.push((pem, key));
    }
    install_client_certificate(dir, &issued[0]);
    replace_file(&dir.join("rootcacerts.pem"), ca.certificate_pem());
    start_origin_server(
        "mongo",
        "198.18.20.1:27018",
        ca.server_config_requiring_clients(&["mymongodb.somedomain"]),
        known,
    );
    issued
}

/// Replaces the client certificate and key that [`mongo_config`] names, in place.
fn install_client_certificate(dir: &Path, (pem, key): &(String, String)) {
    replace_file(&dir.join("myclientcert.pem"), pem);
    replace_file(&dir.join("client_private_key.pem"), key);
}

#[test]
fn mongodb_mutual_tls_presents_the_configured_client_certificate_and_a_rotated_one() {
    let (sandbox, ca, dir) = tls_sandbox("dr-mongo", &["198.18.20.1"]);
    let clients = start_mongo_origin(&ca, &dir, &["client-1", "client-2"]);
    let daemon = sandbox.start_daemon(&mongo_config(&dir), &ADMIN_ARGS);

    assert_eq!(
        ask("240.240.20.7:27018", "hello mongo").unwrap(),
        "mongo sni=mymongodb.somedomain client=client-1 got=hello mongo"
    );

    // Rotated in place, certificate and key: new connections present the new one.
    install_client_certificate(&dir, &clients[1]);
    assert_eq!(
        ask("240.240.20.7:27018", "again").unwrap(),
        "mongo sni=mymongodb.somedomain client=client-2 got=again"
    );
    assert!(daemon.logs().contains("TLS origination material reloaded"));
    let dump = get_ok("/config_dump");
    assert!(
        dump.contains("DestinationRule/default/mtls-mongocluster"),
        "{dump}"
    );
    assert!(dump.contains("MUTUAL"), "{dump}");
}

/// A STATIC ServiceEntry `name` for host `name.example` at `vip`, with one TCP
/// `port`, `endpoints` and `extra` spec lines; a document separator ends it.
fn entry(name: &str, vip: &str, port: u16, endpoints: &[&str], extra: &str) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|address| format!("{{address: {address}}}"))
        .collect();
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.example]
  addresses: [{vip}]
  ports: [{{number: {port}, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{}]
{extra}---
"#,
        endpoints.join(", ")
    )
}

/// A DestinationRule `name` for host `name.example`; `policy` is the lines under
/// `trafficPolicy`.
fn rule(name: &str, policy: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {name}.example
  trafficPolicy:
{policy}"#
    )
}

/// One origin with a certificate for `db.internal` only, and a service per case.
fn verification_config(dir: &Path) -> String {
    let case = |name: &str, vip: &str, se_extra: &str, tls: &str| {
        format!(
            "{}{}---\n",
            entry(name, vip, 443, &["198.18.21.1"], se_extra),
            rule(name, &format!("    tls: {{mode: SIMPLE, {tls}}}\n"))
        )
    };
    let ca = format!("caCertificates: {}/ca.pem", dir.display());
    let other_ca = format!("caCertificates: {}/other-ca.pem", dir.display());
    [
        // The SNI, the ServiceEntry host, is not in the certificate.
        case("nosan", "240.240.21.1", "", &ca),
        case(
            "drsan",
            "240.240.21.2",
            "",
            &format!("{ca}, subjectAltNames: [db.internal]"),
        ),
        case(
            "sesan",
            "240.240.21.3",
            "  subjectAltNames: [db.internal]\n",
            &ca,
        ),
        case(
            "wrongsan",
            "240.240.21.4",
            "",
            &format!("{ca}, subjectAltNames: [other.internal]"),
        ),
        case(
            "wrongca",
            "240.240.21.5",
            "",
            &format!("{other_ca}, sni: db.internal"),
        ),
        case("insecure", "240.240.21.6", "", "insecureSkipVerify: true"),
        case(
            "sni",
            "240.240.21.7",
            "",
            &format!("{ca}, sni: db.internal"),
        ),
    ]
    .concat()
}

#[test]
fn subject_alt_names_roots_and_sni_decide_the_handshake() {
    let (sandbox, ca, dir) = tls_sandbox("dr-verify", &["198.18.21.1"]);
    let other = TestCa::new();
    replace_file(&dir.join("other-ca.pem"), other.certificate_pem());
    start_origin_server(
        "db",
        "198.18.21.1:443",
        ca.server_config(&["db.internal"]),
        Vec::new(),
    );
    let daemon = sandbox.start_daemon(&verification_config(&dir), &ADMIN_ARGS);

    // A rule's SAN, or else the entry's, is verified instead of the SNI.
    assert_eq!(
        ask("240.240.21.2:443", "a").unwrap(),
        "db sni=drsan.example client=- got=a"
    );
    assert_eq!(
        ask("240.240.21.3:443", "b").unwrap(),
        "db sni=sesan.example client=- got=b"
    );
    // insecureSkipVerify passes a certificate no configured root signed.
    assert_eq!(
        ask("240.240.21.6:443", "c").unwrap(),
        "db sni=insecure.example client=- got=c"
    );
    // A set SNI is sent, and verified.
    assert_eq!(
        ask("240.240.21.7:443", "d").unwrap(),
        "db sni=db.internal client=- got=d"
    );
    assert!(daemon.logs().contains("insecureSkipVerify"));

    let before = upstream_tls_failures();
    for failing in ["240.240.21.1:443", "240.240.21.4:443", "240.240.21.5:443"] {
        assert_reset(failing);
    }
    scrape_until(Duration::from_secs(5), |scrape| {
        scrape.value(
            "interceptor_connections_failed_total",
            &[("reason", "upstream_tls")],
        ) >= Some(before + 3.0)
    });
    let logs = daemon.wait_for_log("upstream TLS handshake failed", 3);
    assert!(logs.contains("not valid for name"), "{logs}");
    // Both test CAs carry the same name, so the other CA's certificate is found as
    // the issuer and its signature fails to verify.
    assert!(
        logs.contains("UnknownIssuer") || logs.contains("BadSignature"),
        "{logs}"
    );
}

/// Istio's egress TLS origination task: the app speaks HTTP to port 80, the entry
/// sends it to 443, and the rule's port 80 settings originate TLS. Port 8080 has no
/// port settings, so the top-level policy, whose SNI the origin's certificate does
/// not carry, applies there: port settings replace it wholesale.
fn egress_config(dir: &Path) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: edition-cnn-com
spec:
  hosts:
  - edition.cnn.com
  ports:
  - number: 80
    name: http-port
    protocol: HTTP
    targetPort: 443
  - number: 8080
    name: http-alt
    protocol: HTTP
    targetPort: 443
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: edition-cnn-com
spec:
  host: edition.cnn.com
  trafficPolicy:
    tls:
      mode: SIMPLE
      sni: not-this.example
      caCertificates: {dir}/ca.pem
    portLevelSettings:
    - port:
        number: 80
      tls:
        mode: SIMPLE
        caCertificates: {dir}/ca.pem
"#,
        dir = dir.display()
    )
}

fn curl(url: &str, resolve: &str) -> std::process::Output {
    std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "*",
            "--resolve",
            resolve,
            url,
        ])
        .output()
        .expect("run curl")
}

#[test]
fn the_egress_tls_origination_task_works_with_curl_and_port_settings_take_precedence() {
    let (sandbox, ca, dir) = tls_sandbox("dr-egress", &["198.18.22.1"]);
    start_origin_server(
        "cnn",
        "198.18.22.1:443",
        ca.server_config(&["edition.cnn.com"]),
        Vec::new(),
    );
    let daemon = sandbox.start_daemon(&egress_config(&dir), &ADMIN_ARGS);

    let answer = curl(
        "http://edition.cnn.com/politics",
        "edition.cnn.com:80:198.18.22.1",
    );
    assert!(
        answer.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&answer.stderr),
        daemon.logs()
    );
    // The SNI came from the request's Host.
    assert_eq!(
        String::from_utf8_lossy(&answer.stdout),
        "cnn sni=edition.cnn.com client=-"
    );

    let answer = curl(
        "http://edition.cnn.com:8080/",
        "edition.cnn.com:8080:198.18.22.1",
    );
    assert!(
        !answer.status.success(),
        "port 8080 used the port 80 policy"
    );
    let logs = daemon.wait_for_log("upstream TLS handshake failed", 1);
    assert!(logs.contains("not-this.example"), "{logs}");
}

#[test]
fn mutual_without_a_key_is_refused_by_validate_and_by_reload_and_the_old_config_serves() {
    let (sandbox, ca, dir) = tls_sandbox("dr-invalid", &["198.18.20.1"]);
    start_mongo_origin(&ca, &dir, &["client-1"]);
    let good = mongo_config(&dir);
    let _daemon = sandbox.start_daemon(&good, &ADMIN_ARGS);
    assert!(
        ask("240.240.20.7:27018", "one")
            .unwrap()
            .contains("client=client-1")
    );

    let validate = |yaml: &str| {
        let path = dir.join("candidate.yaml");
        replace_file(&path, yaml);
        integration_tests::daemon::validate(&path)
    };
    // No key at all, a key file that is not there, and a key of another certificate.
    let (_, _, stranger_key) = ca.issue(&["stranger.example"]);
    replace_file(&dir.join("stranger.pem"), &stranger_key);
    let keyless = good.replace(
        &format!(
            "      privateKey: {}/client_private_key.pem\n",
            dir.display()
        ),
        "",
    );
    let missing = good.replace("client_private_key.pem", "gone.pem");
    let mismatched = good.replace("client_private_key.pem", "stranger.pem");
    for (broken, expected) in [
        (&keyless, "private key required for mutual tls"),
        (&missing, "gone.pem"),
        (&mismatched, "does not match"),
    ] {
        let (code, stdout) = validate(broken);
        assert_eq!(code, Some(1), "{stdout}");
        assert!(
            stdout.contains("spec.trafficPolicy.tls.privateKey"),
            "{stdout}"
        );
        assert!(
            stdout.contains("DestinationRule/default/mtls-mongocluster"),
            "{stdout}"
        );
        assert!(stdout.contains(expected), "{stdout}");
    }
    let (code, stdout) = validate(&good.replace("mode: MUTUAL", "mode: ISTIO_MUTUAL"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("spec.trafficPolicy.tls.mode"), "{stdout}");

    sandbox.write_config(&missing);
    scrape_until(Duration::from_secs(10), |scrape| {
        scrape.value("interceptor_config_reloads_total", &[("result", "failed")]) >= Some(1.0)
    });
    assert!(
        ask("240.240.20.7:27018", "two")
            .unwrap()
            .contains("client=client-1")
    );
}

#[test]
fn max_connections_refuses_the_extra_connection_and_counts_it() {
    let sandbox = Sandbox::new("dr-pool");
    sandbox.add_hosts(&["198.18.23.1"]);
    let _server = integration_tests::TestServer::start("pooled", "198.18.23.1:7000");
    let config = format!(
        "{}---\n{}",
        integration_tests::vip_entry("default", "pooled", "240.240.23.1", "198.18.23.1"),
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: pooled
spec:
  host: pooled.default.test
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
        connectTimeout: 2s
        tcpKeepalive: {time: 30s, interval: 5s, probes: 3}
"#
    );
    let daemon = sandbox.start_daemon(&config, &ADMIN_ARGS);
    let mut held = connect("240.240.23.1:7000").unwrap();
    held.write_all(b"ECHO\n").unwrap();
    let mut name = [0u8; 7];
    held.read_exact(&mut name).unwrap();
    assert_eq!(&name, b"pooled\n");

    integration_tests::server::assert_refused_by_proxy("240.240.23.1:7000", b"WHO\n");
    daemon.wait_for_log("maxConnections is reached", 1);
    scrape_until(Duration::from_secs(5), |scrape| {
        scrape.value(
            "interceptor_connections_failed_total",
            &[("reason", "pool_overflow")],
        ) == Some(1.0)
    });

    // The slot frees once the proxy has seen the close, which a slow machine (a VM
    // under emulation) takes longer to get to: retried, within a bound.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    let seen = loop {
        match integration_tests::server::who("240.240.23.1:7000") {
            Ok(seen) => break seen,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(error) => panic!("no room again 5 s after the held connection closed: {error}"),
        }
    };
    assert_eq!(seen.server, "pooled");
}

#[test]
fn outlier_detection_ejects_an_endpoint_that_refuses() {
    let sandbox = Sandbox::new("dr-outlier");
    sandbox.add_hosts(&["198.18.24.1", "198.18.24.2"]);
    // Nothing listens on 198.18.24.1:7000.
    let _server = integration_tests::TestServer::start("healthy", "198.18.24.2:7000");
    let daemon = sandbox.start_daemon(
        &format!(
            "{}{}",
            entry("flaky", "240.240.24.1", 7000, &["198.18.24.1", "198.18.24.2"], ""),
            rule(
                "flaky",
                "    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}\n",
            ),
        ),
        &ADMIN_ARGS,
    );
    // Round robin puts the refusing endpoint first within two connections; each
    // connection still reaches the healthy one.
    for _ in 0..2 {
        let seen = integration_tests::server::who("240.240.24.1:7000").unwrap();
        assert_eq!(seen.server, "healthy");
    }
    daemon.wait_for_log("ejected by the DestinationRule's outlierDetection", 1);
    let tries = |logs: &str| logs.matches("trying the next address").count();
    let before = tries(&daemon.logs());
    assert_eq!(before, 1, "{}", daemon.logs());
    for _ in 0..6 {
        let seen = integration_tests::server::who("240.240.24.1:7000").unwrap();
        assert_eq!(seen.server, "healthy");
    }
    assert_eq!(
        tries(&daemon.logs()),
        before,
        "an ejected endpoint was tried"
    );
}

#[test]
fn least_request_picks_the_idle_endpoint() {
    let sandbox = Sandbox::new("dr-least-request");
    sandbox.add_hosts(&["198.18.25.1", "198.18.25.2"]);
    let _one = integration_tests::TestServer::start("one", "198.18.25.1:7000");
    let _two = integration_tests::TestServer::start("two", "198.18.25.2:7000");
    let _daemon = sandbox.start_daemon(
        &format!(
            "{}{}",
            entry(
                "busy",
                "240.240.25.1",
                7000,
                &["198.18.25.1", "198.18.25.2"],
                ""
            ),
            rule("busy", "    loadBalancer: {simple: LEAST_REQUEST}\n"),
        ),
        &ADMIN_ARGS,
    );
    let mut held = connect("240.240.25.1:7000").unwrap();
    held.write_all(b"ECHO\n").unwrap();
    let mut name = [0u8; 4];
    held.read_exact(&mut name).unwrap();
    let busy = std::str::from_utf8(&name).unwrap().trim().to_owned();
    let idle = if busy == "one" { "two" } else { "one" };
    for _ in 0..6 {
        let seen = integration_tests::server::who("240.240.25.1:7000").unwrap();
        assert_eq!(seen.server, idle, "the busy endpoint {busy} was picked");
        // The proxy counts a connection until both its sides closed, a moment after
        // the answer arrived here.
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);
}

#[test]
fn a_revoked_server_certificate_fails_under_ca_crl() {
    let (sandbox, ca, dir) = tls_sandbox("dr-crl", &["198.18.26.1", "198.18.26.2"]);
    replace_file(&dir.join("crl.pem"), &ca.revocation_list_pem(&[666]));
    start_origin_server(
        "revoked",
        "198.18.26.1:443",
        ca.server_config_with_serial(&["db.internal"], 666),
        Vec::new(),
    );
    start_origin_server(
        "good",
        "198.18.26.2:443",
        ca.server_config_with_serial(&["db.internal"], 7),
        Vec::new(),
    );
    let config = format!(
        "{}{}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: crl}}\nspec:\n  host: \"*.example\"\n  trafficPolicy:\n    tls: {{mode: SIMPLE, sni: db.internal, caCertificates: {dir}/ca.pem, caCrl: {dir}/crl.pem}}\n",
        entry("revoked", "240.240.26.1", 443, &["198.18.26.1"], ""),
        entry("good", "240.240.26.2", 443, &["198.18.26.2"], ""),
        dir = dir.display()
    );
    let daemon = sandbox.start_daemon(&config, &ADMIN_ARGS);
    assert_eq!(
        ask("240.240.26.2:443", "x").unwrap(),
        "good sni=db.internal client=- got=x"
    );
    assert_reset("240.240.26.1:443");
    let logs = daemon.wait_for_log("upstream TLS handshake failed", 1);
    assert!(logs.contains("Revoked"), "{logs}");
}
