//! One case per rule of the semantics doc (shared/spec/serviceentry-semantics.md),
//! written from the rules: a document that passes the rule and one that breaks it,
//! with the exact severity, field path and message expected.

use std::path::Path;

use crate::config::{Finding, LoadError, Severity, load_str};

use Severity::{Error as E, Warning as W};

fn indent(body: &str) -> String {
    body.lines().map(|line| format!("  {line}\n")).collect()
}

fn document(kind: &str, metadata: &str, body: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata:\n  name: x\n  namespace: ns\n{}spec:\n{}",
        indent(metadata),
        indent(body)
    )
}

fn se(body: &str) -> String {
    document("ServiceEntry", "", body)
}

fn se_labelled(labels: &str, body: &str) -> String {
    document("ServiceEntry", &format!("labels: {labels}"), body)
}

fn we(body: &str) -> String {
    document("WorkloadEntry", "", body)
}

fn vs(body: &str) -> String {
    document("VirtualService", "", body)
}

fn dr(body: &str) -> String {
    document("DestinationRule", "", body)
}

/// Every finding (errors and warnings) for one YAML text, through the real loader.
pub(crate) fn findings(yaml: &str) -> Vec<Finding> {
    match load_str(Path::new("case.yaml"), yaml) {
        Ok(loaded) => loaded.warnings,
        Err(LoadError::Invalid { findings }) => findings,
        Err(other) => panic!("unexpected load error: {other}"),
    }
}

fn summary(findings: &[Finding]) -> Vec<(Severity, String, String)> {
    findings
        .iter()
        .map(|f| (f.severity, f.field.clone(), f.message.clone()))
        .collect()
}

struct Case {
    rule: &'static str,
    valid: String,
    invalid: String,
    severity: Severity,
    field: &'static str,
    message: &'static str,
}

fn case(
    rule: &'static str,
    valid: String,
    invalid: String,
    expected: (Severity, &'static str, &'static str),
) -> Case {
    Case {
        rule,
        valid,
        invalid,
        severity: expected.0,
        field: expected.1,
        message: expected.2,
    }
}

const TLS_443: &str = "ports: [{number: 443, name: tls, protocol: TLS}]";
const HTTP_80: &str = "ports: [{number: 80, name: http, protocol: HTTP}]";

fn cases() -> Vec<Case> {
    let long_key = "a".repeat(63);
    let ok_key = "a".repeat(62);
    let many_hosts: String = (0..257).map(|i| format!("h{i}.example.com,")).collect();
    vec![
        // §2.2 rule 1: workload selector.
        case(
            "selector empty key",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: x}}}}")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{'': x}}}}")),
            (E, "spec.workloadSelector.labels[\"\"]", "empty key is not supported in selector: \"=x\""),
        ),
        case(
            "selector wildcard",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: x}}}}")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: 'x*'}}}}")),
            (E, "spec.workloadSelector.labels.app", "wildcard is not supported in selector: \"app=x*\""),
        ),
        case(
            "selector without labels warns",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: x}}}}")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{}}")),
            (W, "spec.workloadSelector", "service entry: workload selector specified without labels, will be applied to all services in namespace"),
        ),
        // Rule 2 (and the CRD oneof for an explicit empty list).
        case(
            "selector and endpoints",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1}}]\nworkloadSelector: {{labels: {{app: x}}}}")),
            (E, "spec.workloadSelector", "only one of WorkloadSelector or Endpoints is allowed in Service Entry"),
        ),
        case(
            "selector and explicit empty endpoints",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: x}}}}")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: []\nworkloadSelector: {{labels: {{app: x}}}}")),
            (E, "spec.workloadSelector", "only one of WorkloadSelector or Endpoints is allowed in Service Entry"),
        ),
        // Rule 3.
        case(
            "at least one host",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS")),
            se(&format!("hosts: []\n{TLS_443}\nresolution: DNS")),
            (E, "spec.hosts", "service entry must have at least one host"),
        ),
        // Rule 4.
        case(
            "bare wildcard host",
            se(&format!("hosts: ['*.example.com']\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: ['*']\n{TLS_443}\nresolution: NONE")),
            (E, "spec.hosts[0]", "invalid host *"),
        ),
        case(
            "host syntax",
            se(&format!("hosts: [short]\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: ['foo*.com']\n{TLS_443}\nresolution: NONE")),
            (E, "spec.hosts[0]", "domain name \"foo*.com\" invalid (label \"foo*\" invalid)"),
        ),
        case(
            "IP literal is not a host",
            se(&format!("hosts: [a.example.com]\naddresses: [1.2.3.4]\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: [1.2.3.4]\n{TLS_443}\nresolution: NONE")),
            (E, "spec.hosts[0]", "domain name \"2.3.4\" invalid (top level domain \"4\" cannot be all-numeric)"),
        ),
        case(
            "partial wildcard warns (not for DYNAMIC_DNS)",
            se(&format!("hosts: ['*foo.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            se(&format!("hosts: ['*foo.com']\n{HTTP_80}\nresolution: NONE")),
            (W, "spec.hosts[0]", "partial wildcard \"*foo.com\" not allowed"),
        ),
        // Rule 5.
        case(
            "CIDR syntax (host bits may be set)",
            se(&format!("hosts: [a.example.com]\naddresses: [172.1.2.16/16]\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: [a.example.com]\naddresses: [1.2.3.4/99]\n{TLS_443}\nresolution: NONE")),
            (E, "spec.addresses[0]", "1.2.3.4/99 is not a valid CIDR block"),
        ),
        case(
            "IP syntax",
            se(&format!("hosts: [a.example.com]\naddresses: ['2001:db8::1']\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: [a.example.com]\naddresses: [01.2.3.4]\n{TLS_443}\nresolution: NONE")),
            (E, "spec.addresses[0]", "01.2.3.4 is not a valid IP"),
        ),
        case(
            "CIDR only with NONE/STATIC (textual, /32 counts)",
            se(&format!("hosts: [a.example.com]\naddresses: [1.1.1.1/32]\n{TLS_443}\nresolution: STATIC")),
            se(&format!("hosts: [a.example.com]\naddresses: [1.1.1.1/32]\n{TLS_443}\nresolution: DNS")),
            (E, "spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types"),
        ),
        // Rule 6.
        case(
            "duplicate port name",
            se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: http2, protocol: HTTP}]\nresolution: DNS"),
            se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: http, protocol: HTTP}]\nresolution: DNS"),
            (E, "spec.ports[1].name", "service entry port name \"http\" already defined"),
        ),
        case(
            "duplicate port number",
            se("hosts: [a.example.com]\nports: [{number: 80, name: a, protocol: HTTP}, {number: 81, name: b, protocol: HTTP}]\nresolution: DNS"),
            se("hosts: [a.example.com]\nports: [{number: 80, name: a, protocol: HTTP}, {number: 80, name: b, protocol: HTTP}]\nresolution: DNS"),
            (E, "spec.ports[1].number", "service entry port 80 already defined"),
        ),
        case(
            "targetPort range",
            se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]\nresolution: DNS"),
            se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP, targetPort: 70000}]\nresolution: DNS"),
            (E, "spec.ports[0].targetPort", "port number 70000 must be in the range 1..65535"),
        ),
        case(
            "TCP without addresses warns (raw \"TCP\" only)",
            se("hosts: [a.example.com]\nports: [{number: 5432, name: pg, protocol: tcp}]\nresolution: NONE"),
            se("hosts: [a.example.com]\nports: [{number: 5432, name: pg, protocol: TCP}]\nresolution: NONE"),
            (W, "spec.ports[0]", "addresses are required for ports serving TCP (or unset) protocol when IP Autoallocation is not enabled"),
        ),
        case(
            "unset protocol without addresses warns unless auto-allocated",
            se("hosts: [a.example.com]\nports: [{number: 5432, name: pg}]\nresolution: DNS"),
            se_labelled("{networking.istio.io/enable-autoallocate-ip: 'False'}", "hosts: [a.example.com]\nports: [{number: 5432, name: pg}]\nresolution: DNS"),
            (W, "spec.ports[0]", "addresses are required for ports serving TCP (or unset) protocol when IP Autoallocation is not enabled"),
        ),
        case(
            "port name syntax",
            se("hosts: [a.example.com]\nports: [{number: 80, name: http-1, protocol: HTTP}]\nresolution: DNS"),
            se("hosts: [a.example.com]\nports: [{number: 80, name: http_1, protocol: HTTP}]\nresolution: DNS"),
            (E, "spec.ports[0].name", "invalid port name: http_1"),
        ),
        case(
            "protocol name",
            se("hosts: [a.example.com]\nports: [{number: 80, name: web, protocol: grpc-web}]\nresolution: DNS"),
            se("hosts: [a.example.com]\nports: [{number: 80, name: web, protocol: FOO}]\nresolution: DNS"),
            (E, "spec.ports[0].protocol", "unsupported protocol: FOO"),
        ),
        case(
            "port number range",
            se("hosts: [a.example.com]\nports: [{number: 65535, name: web, protocol: HTTP}]\nresolution: DNS"),
            se("hosts: [a.example.com]\nports: [{number: 0, name: web, protocol: HTTP}]\nresolution: DNS"),
            (E, "spec.ports[0].number", "port number 0 must be in the range 1..65535"),
        ),
        // Rule 7, NONE.
        case(
            "NONE rejects endpoints",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: NONE\nendpoints: [{{address: 1.1.1.1}}]")),
            (E, "spec.endpoints", "no endpoints should be provided for resolution type none"),
        ),
        case(
            "NONE with selector warns",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: x}}}}")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: NONE\nworkloadSelector: {{labels: {{app: x}}}}")),
            (W, "spec.workloadSelector", "workloadSelector should not be set when resolution mode is NONE"),
        ),
        // Rule 7, STATIC.
        case(
            "STATIC needs neither endpoints nor selector; address required",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: STATIC")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: STATIC\nendpoints: [{{labels: {{app: x}}}}]")),
            (E, "spec.endpoints[0].address", "address is required"),
        ),
        case(
            "STATIC network-only endpoint warns",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, network: net1}}]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: STATIC\nendpoints: [{{network: net1}}]")),
            (W, "spec.endpoints[0].address", "address is unset with network \"net1\""),
        ),
        case(
            "unix address must not be empty",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix://@abstract'}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix://'}}]")),
            (E, "spec.endpoints[0].address", "unix address must not be empty"),
        ),
        case(
            "unix path must be absolute and not a directory",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix:///var/run/sock'}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix:///var/run/'}}]")),
            (E, "spec.endpoints[0].address", "/var/run/ is not an absolute path to a file"),
        ),
        case(
            "unix endpoint without ports",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix:///a/b'}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix:///a/b', ports: {{http: 80}}}}]")),
            (E, "spec.endpoints[0].ports", "unix endpoint unix:///a/b must not include ports"),
        ),
        case(
            "unix endpoint needs exactly one service port",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix:///a/b'}}]")),
            se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: b, protocol: HTTP}]\nresolution: STATIC\nendpoints: [{address: 'unix:///a/b'}]"),
            (E, "spec.endpoints[0].address", "exactly 1 service port required for unix endpoints"),
        ),
        case(
            "STATIC endpoint must be an IP",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: '2001:db8::2'}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: foo.com}}]")),
            (E, "spec.endpoints[0].address", "endpoint address \"foo.com\" is not a valid IP address"),
        ),
        case(
            "endpoint ports are keyed by port name; the message prints the value",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, ports: {{http: 8080}}}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, ports: {{'80': 8080}}}}]")),
            (E, "spec.endpoints[0].ports.80", "endpoint port 8080 is not defined by the service entry"),
        ),
        case(
            "endpoint port value range",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, ports: {{http: 1}}}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, ports: {{http: 0}}}}]")),
            (E, "spec.endpoints[0].ports.http", "port number 0 must be in the range 1..65535"),
        ),
        case(
            "endpoint label key",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, labels: {{security.istio.io/tlsMode: istio}}}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, labels: {{-bad: x}}}}]")),
            (E, "spec.endpoints[0].labels.-bad", "invalid tag key: \"-bad\""),
        ),
        case(
            "endpoint label value",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, labels: {{app: ''}}}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, labels: {{app: 'a b'}}}}]")),
            (E, "spec.endpoints[0].labels.app", "invalid tag value: \"a b\""),
        ),
        // Rule 7, DNS / DNS_ROUND_ROBIN.
        case(
            "DNS without endpoints rejects wildcard hosts",
            se(&format!("hosts: ['*.example.com']\n{TLS_443}\nresolution: DNS\nendpoints: [{{address: lb.example.com}}]")),
            se(&format!("hosts: ['*.example.com']\n{TLS_443}\nresolution: DNS")),
            (E, "spec.hosts[0]", "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode DNS, domain name \"*.example.com\" invalid (label \"*\" invalid)"),
        ),
        case(
            "DNS_ROUND_ROBIN has at most one endpoint",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS_ROUND_ROBIN\nendpoints: [{{address: a.example.net}}]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS_ROUND_ROBIN\nendpoints: [{{address: a.example.net}}, {{address: b.example.net}}]")),
            (E, "spec.endpoints", "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN"),
        ),
        case(
            "DNS endpoint is an IP or FQDN",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nendpoints: [{{address: 1.2.3.4}}]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nendpoints: [{{address: '*.example.net'}}]")),
            (E, "spec.endpoints[0].address", "endpoint address \"*.example.net\" is not a valid FQDN or an IP address"),
        ),
        case(
            "DNS network-only endpoint warns",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nendpoints: [{{address: a.example.net, network: n}}]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nendpoints: [{{network: n}}]")),
            (W, "spec.endpoints[0].address", "address is unset with network \"n\""),
        ),
        case(
            "DNS endpoint without address or network is an error",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS_ROUND_ROBIN\nendpoints: [{{address: a.example.net}}]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS_ROUND_ROBIN\nendpoints: [{{labels: {{app: x}}}}]")),
            (E, "spec.endpoints[0].address", "endpoint address \"\" is not a valid FQDN or an IP address"),
        ),
        case(
            "DNS unix endpoint is an error",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 'unix:///a'}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: DNS\nendpoints: [{{address: 'unix:///a'}}]")),
            (E, "spec.endpoints[0].address", "endpoint address \"unix:///a\" is not a valid FQDN or an IP address"),
        ),
        case(
            "DNS endpoint port map",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: DNS\nendpoints: [{{address: a.example.net, ports: {{http: 8080}}}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: DNS\nendpoints: [{{address: a.example.net, ports: {{web: 8080}}}}]")),
            (E, "spec.endpoints[0].ports.web", "endpoint port 8080 is not defined by the service entry"),
        ),
        case(
            "multiple hosts with address and TCP port warns",
            se("hosts: [a.example.com]\naddresses: [10.0.0.1]\nports: [{number: 5432, name: pg, protocol: TCP}]\nresolution: DNS"),
            se("hosts: [a.example.com, b.example.com]\naddresses: [10.0.0.1]\nports: [{number: 5432, name: pg, protocol: TCP}]\nresolution: DNS"),
            (W, "spec.ports[0]", "service entry can not have more than one host specified simultaneously with address and tcp port"),
        ),
        // Rule 7, DYNAMIC_DNS.
        case(
            "DYNAMIC_DNS needs a host",
            se(&format!("hosts: ['*.example.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            se(&format!("hosts: []\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            (E, "spec.hosts", "at least one wildcard host must be provided for resolution type DYNAMIC_DNS"),
        ),
        case(
            "DYNAMIC_DNS hosts are wildcards",
            se(&format!("hosts: ['*.example.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            (E, "spec.hosts[0]", "host must be wildcarded for resolution mode DYNAMIC_DNS"),
        ),
        case(
            "DYNAMIC_DNS forbids addresses",
            se(&format!("hosts: ['*.example.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            se(&format!("hosts: ['*.example.com']\naddresses: [10.0.0.1]\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            (E, "spec.addresses", "addresses cannot be set for resolution type DYNAMIC_DNS. HTTP route domains will only be generatedfrom the hosts field values"),
        ),
        case(
            "DYNAMIC_DNS forbids endpoints",
            se(&format!("hosts: ['*.example.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS")),
            se(&format!("hosts: ['*.example.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS\nendpoints: [{{address: 1.1.1.1}}]")),
            (E, "spec.endpoints", "endpoints cannot be set for resolution type DYNAMIC_DNS. Destination IP address determined from hostsfield values"),
        ),
        case(
            "DYNAMIC_DNS protocols (HTTPS is not one)",
            se(&format!("hosts: ['*.example.com']\n{TLS_443}\nresolution: DYNAMIC_DNS")),
            se("hosts: ['*.example.com']\nports: [{number: 443, name: https, protocol: HTTPS}]\nresolution: DYNAMIC_DNS"),
            (E, "spec.ports[0].protocol", "only HTTP, TLS, GRPC, and HTTP2 protocols are supported for resolution type DYNAMIC_DNS"),
        ),
        case(
            "DYNAMIC_DNS MESH_INTERNAL with a waypoint",
            se_labelled("{istio.io/use-waypoint: none}", &format!("hosts: ['*.example.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS\nlocation: MESH_INTERNAL")),
            se_labelled("{istio.io/use-waypoint: egress}", &format!("hosts: ['*.example.com']\n{HTTP_80}\nresolution: DYNAMIC_DNS\nlocation: MESH_INTERNAL")),
            (E, "spec.location", "location MESH_INTERNAL with resolution type DYNAMIC_DNS is not supported when using waypoints"),
        ),
        // Rule 8.
        case(
            "multiple hosts need HTTP or TLS ports (NONE exempt, unset fails)",
            se("hosts: [a.example.com, b.example.com]\nports: [{number: 443, name: tls, protocol: TLS}, {number: 80, name: http, protocol: HTTP}]\nresolution: DNS"),
            se("hosts: [a.example.com, b.example.com]\nports: [{number: 443, name: tls, protocol: TLS}, {number: 8080, name: web}]\nresolution: DNS"),
            (E, "spec.ports[1]", "multiple hosts provided with non-HTTP, non-TLS ports"),
        ),
        // Rule 9.
        case(
            "exportTo duplicate",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: [a, b]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: [a, a]")),
            (E, "spec.exportTo[1]", "duplicate entries in exportTo for entry a"),
        ),
        case(
            "exportTo . and own namespace",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: [., other]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: [ns, .]")),
            (E, "spec.exportTo[1]", "duplicate entries in exportTo: . and current namespace ns"),
        ),
        case(
            "exportTo syntax",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: [team-a]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: [team_a]")),
            (E, "spec.exportTo[0]", "only .,*, or a valid DNS 1123 label is allowed as exportTo entry"),
        ),
        case(
            "exportTo * alone",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: ['*']")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: ['*', a]")),
            (E, "spec.exportTo", "cannot have both public (*) and non-public exportTo values for a resource"),
        ),
        case(
            "exportTo ~ alone (ServiceEntry only)",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: ['~']")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS\nexportTo: ['~', a]")),
            (E, "spec.exportTo", "cannot export service entry to no one (~) and someone"),
        ),
        // §2.1 CRD-only rules.
        case(
            "CRD: spec required",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS")),
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x, namespace: ns}\n".into(),
            (E, "spec", "Required value"),
        ),
        case(
            "CRD: hosts maxItems",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: [{many_hosts}]\n{TLS_443}\nresolution: NONE")),
            (E, "spec.hosts", "Too many: 257: must have at most 256 items"),
        ),
        case(
            "CRD: address maxLength",
            se(&format!("hosts: [a.example.com]\naddresses: ['2001:db8::1/128']\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: [a.example.com]\naddresses: ['{}']\n{TLS_443}\nresolution: NONE", "1".repeat(65))),
            (E, "spec.addresses[0]", "Too long: may not be more than 64 bytes"),
        ),
        case(
            "CRD: explicit targetPort 0",
            se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP}]\nresolution: DNS"),
            se("hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP, targetPort: 0}]\nresolution: DNS"),
            (E, "spec.ports[0].targetPort", "port must be between 1-65535"),
        ),
        case(
            "CRD: NONE with explicit empty endpoints",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: NONE")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nendpoints: []")),
            (E, "spec.endpoints", "NONE mode cannot set endpoints"),
        ),
        case(
            "CRD: endpoint port key shorter than 63",
            se(&format!("hosts: [a.example.com]\nports: [{{number: 80, name: {ok_key}, protocol: HTTP}}]\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, ports: {{{ok_key}: 8080}}}}]")),
            se(&format!("hosts: [a.example.com]\nports: [{{number: 80, name: {long_key}, protocol: HTTP}}]\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, ports: {{{long_key}: 8080}}}}]")),
            (E, "spec.endpoints[0].ports.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "port name must be valid"),
        ),
        case(
            "CRD: selector value maxLength",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: {ok_key}}}}}")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: {}}}}}", "a".repeat(64))),
            (E, "spec.workloadSelector.labels.app", "Too long: may not be more than 63 bytes"),
        ),
        case(
            "CRD: serviceAccount maxLength",
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, serviceAccount: sa}}]")),
            se(&format!("hosts: [a.example.com]\n{HTTP_80}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1, serviceAccount: {}}}]", "s".repeat(254))),
            (E, "spec.endpoints[0].serviceAccount", "Too long: may not be more than 253 bytes"),
        ),
        case(
            "null port",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS")),
            se("hosts: [a.example.com]\nports: [null]\nresolution: DNS"),
            (E, "spec.ports[0]", "service entry port may not be null"),
        ),
        case(
            "null endpoint",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: STATIC\nendpoints: [{{address: 1.1.1.1}}]")),
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: STATIC\nendpoints: [null]")),
            (E, "spec.endpoints[0]", "endpoint cannot be nil"),
        ),
        case(
            "metadata.name required",
            se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS")),
            format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{namespace: ns}}\nspec:\n  hosts: [a.example.com]\n  {TLS_443}\n  resolution: DNS\n"),
            (E, "metadata.name", "Required value"),
        ),
        // Standalone WorkloadEntry.
        case(
            "WorkloadEntry FQDN address",
            we("address: vm.example.com\nports: {anything: 8080}"),
            we("address: '*.example.com'"),
            (E, "spec.address", "endpoint address \"*.example.com\" is not a valid FQDN or an IP address"),
        ),
        case(
            "WorkloadEntry address required",
            we("address: 10.0.0.1"),
            we("labels: {app: x}"),
            (E, "spec.address", "address is required"),
        ),
        case(
            "WorkloadEntry unix without ports",
            we("address: 'unix:///run/app.sock'"),
            we("address: 'unix:///run/app.sock'\nports: {http: 80}"),
            (E, "spec.ports", "unix endpoint unix:///run/app.sock must not include ports"),
        ),
        // §6 VirtualService.
        case(
            "VS needs http, tcp or tls (http is opaque)",
            vs("hosts: [a.example.com]\nhttp: [{route: [{destination: {host: a.example.com}}]}]"),
            vs("hosts: [a.example.com]"),
            (E, "spec", "http, tcp or tls must be provided in virtual service"),
        ),
        case(
            "VS * host not for the mesh",
            vs("hosts: ['*']\ngateways: [ns/gw]\ntcp: [{route: [{destination: {host: a.example.com}}]}]"),
            vs("hosts: ['*']\ntcp: [{route: [{destination: {host: a.example.com}}]}]"),
            (E, "spec.hosts[0]", "wildcard host * is not allowed for virtual services bound to the mesh gateway"),
        ),
        case(
            "VS hosts must not overlap",
            vs("hosts: ['*.foo.bar', a.bar]\ntcp: [{route: [{destination: {host: a.example.com}}]}]"),
            vs("hosts: ['*.foo.bar', '*.bar']\ntcp: [{route: [{destination: {host: a.example.com}}]}]"),
            (E, "spec.hosts[1]", "duplicate hosts in virtual service: *.foo.bar & *.bar"),
        ),
        case(
            "VS host syntax (IPs allowed)",
            vs("hosts: [10.0.0.1]\ntcp: [{route: [{destination: {host: a.example.com}}]}]"),
            vs("hosts: ['foo*']\ntcp: [{route: [{destination: {host: a.example.com}}]}]"),
            (E, "spec.hosts[0]", "domain name \"foo*\" invalid (label \"foo*\" invalid)"),
        ),
        case(
            "VS delegate has no tls",
            vs("http: [{route: [{destination: {host: a.example.com}}]}]"),
            vs("tls: [{match: [{sniHosts: [a.example.com]}], route: [{destination: {host: a.example.com}}]}]"),
            (E, "spec.tls", "delegate virtual service must have no tls route specified"),
        ),
        case(
            "TLS route needs a match",
            vs("hosts: [a.example.com]\ntls: [{match: [{sniHosts: [a.example.com]}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntls: [{route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.tls[0].match", "TLS route must have at least one match condition"),
        ),
        case(
            "TLS route needs a route",
            vs("hosts: [a.example.com]\ntls: [{match: [{sniHosts: [a.example.com]}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntls: [{match: [{sniHosts: [a.example.com]}]}]"),
            (E, "spec.tls[0].route", "TLS route is required"),
        ),
        case(
            "TLS match needs sniHosts",
            vs("hosts: [a.example.com]\ntls: [{match: [{sniHosts: [a.example.com]}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntls: [{match: [{port: 443}], route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.tls[0].match[0].sniHosts", "TLS match must have at least one SNI host"),
        ),
        case(
            "SNI host that is an IP warns",
            vs("hosts: ['*.example.com']\ntls: [{match: [{sniHosts: [a.example.com]}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: ['*.example.com']\ntls: [{match: [{sniHosts: [1.2.3.4]}], route: [{destination: {host: b.example.com}}]}]"),
            (W, "spec.tls[0].match[0].sniHosts[0]", "using an IP address (\"1.2.3.4\") goes against SNI spec and most clients do not support this"),
        ),
        case(
            "SNI host is a subset of a VS host",
            vs("hosts: ['*.example.com']\ntls: [{match: [{sniHosts: [a.b.example.com]}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntls: [{match: [{sniHosts: ['*.example.com']}], route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.tls[0].match[0].sniHosts[0]", "SNI host \"*.example.com\" is not a compatible subset of any of the virtual service hosts: [a.example.com]"),
        ),
        case(
            "match destinationSubnets",
            vs("hosts: [a.example.com]\ntcp: [{match: [{destinationSubnets: [10.0.0.0/8]}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{match: [{destinationSubnets: [10.0.0.0/33]}], route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.tcp[0].match[0].destinationSubnets[0]", "10.0.0.0/33 is not a valid CIDR block"),
        ),
        case(
            "match port",
            vs("hosts: [a.example.com]\ntls: [{match: [{sniHosts: [a.example.com], port: 443}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntls: [{match: [{sniHosts: [a.example.com], port: 70000}], route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.tls[0].match[0].port", "port number 70000 must be in the range 1..65535"),
        ),
        case(
            "match sourceLabels",
            vs("hosts: [a.example.com]\ntcp: [{match: [{sourceLabels: {app: web}}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{match: [{sourceLabels: {app: 'a b'}}], route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.tcp[0].match[0].sourceLabels.app", "invalid tag value: \"a b\""),
        ),
        case(
            "match gateway names",
            vs("hosts: [a.example.com]\ntcp: [{match: [{gateways: [ns/gw]}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{match: [{gateways: [ns/Bad_gw]}], route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.tcp[0].match[0].gateways[0]", "invalid value for gateway name: \"Bad_gw\""),
        ),
        case(
            "legacy gateway name warns",
            vs("hosts: [a.example.com]\ngateways: [mesh, ns/gw]\ntcp: [{route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ngateways: [gw.ns]\ntcp: [{route: [{destination: {host: b.example.com}}]}]"),
            (W, "spec.gateways[0]", "using legacy gatewayName format \"gw.ns\"; prefer the <namespace>/<name> format: \"ns/gw\""),
        ),
        case(
            "TCP route needs a route",
            vs("hosts: [a.example.com]\ntcp: [{match: [{port: 5432}], route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{match: [{port: 5432}]}]"),
            (E, "spec.tcp[0].route", "TCP route is required"),
        ),
        case(
            "destination required",
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com}, weight: 10}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{route: [{weight: 10}]}]"),
            (E, "spec.tcp[0].route[0].destination", "destination is required"),
        ),
        case(
            "destination host not *",
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: '*.example.com'}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: '*'}}]}]"),
            (E, "spec.tcp[0].route[0].destination.host", "invalid destination host *"),
        ),
        case(
            "destination subset",
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com, subset: v1}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com, subset: v1.0}}]}]"),
            (E, "spec.tcp[0].route[0].destination.subset", "subset name is invalid: v1.0"),
        ),
        case(
            "destination port",
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com, port: {number: 5432}}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com, port: {number: 0}}}]}]"),
            (E, "spec.tcp[0].route[0].destination.port.number", "port number 0 must be in the range 1..65535"),
        ),
        case(
            "weight not negative",
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com}, weight: 0}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com}, weight: -1}]}]"),
            (E, "spec.tcp[0].route[0].weight", "weight -1 < 0"),
        ),
        case(
            "total weight of several destinations",
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com}, weight: 1}, {destination: {host: c.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com}}, {destination: {host: c.example.com}}]}]"),
            (E, "spec.tcp[0].route", "total destination weight = 0"),
        ),
        case(
            "VS exportTo ~ is ServiceEntry-only",
            vs("hosts: [a.example.com]\nexportTo: [.]\ntcp: [{route: [{destination: {host: b.example.com}}]}]"),
            vs("hosts: [a.example.com]\nexportTo: ['~']\ntcp: [{route: [{destination: {host: b.example.com}}]}]"),
            (E, "spec.exportTo[0]", "exportTo ~ (none) is not allowed for Istio configuration objects"),
        ),
        case(
            "unreachable rule after a match-all rule",
            vs("hosts: [a.example.com]\ntcp: [{match: [{port: 1}], route: [{destination: {host: b.example.com}}]}, {route: [{destination: {host: c.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{route: [{destination: {host: b.example.com}}]}, {route: [{destination: {host: c.example.com}}]}]"),
            (W, "spec.tcp[1]", "virtualService rule #1 not used (only the last rule can have no matches)"),
        ),
        case(
            "duplicate match",
            vs("hosts: [a.example.com]\ntcp: [{match: [{port: 1}], route: [{destination: {host: b.example.com}}]}, {match: [{port: 2}], route: [{destination: {host: c.example.com}}]}]"),
            vs("hosts: [a.example.com]\ntcp: [{match: [{port: 1}], route: [{destination: {host: b.example.com}}]}, {match: [{port: 1}], route: [{destination: {host: c.example.com}}]}]"),
            (W, "spec.tcp[1].match[0]", "virtualService rule #1 match #0 is not used (duplicate/overlapping match in rule #0)"),
        ),
        // §7 DestinationRule.
        case(
            "DR host",
            dr("host: '*'"),
            dr("host: ''"),
            (E, "spec.host", "empty domain name not allowed"),
        ),
        case(
            "DR traffic policy not empty",
            dr("host: a.example.com\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}"),
            dr("host: a.example.com\ntrafficPolicy: {}"),
            (E, "spec.trafficPolicy", "traffic policy must have at least one field"),
        ),
        case(
            "MUTUAL needs a client certificate",
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}}"),
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: MUTUAL, privateKey: /k.pem}}"),
            (E, "spec.trafficPolicy.tls.clientCertificate", "client certificate required for mutual tls"),
        ),
        case(
            "MUTUAL needs a private key",
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: MUTUAL, credentialName: client-cert}}"),
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem}}"),
            (E, "spec.trafficPolicy.tls.privateKey", "private key required for mutual tls"),
        ),
        case(
            "credentialName excludes file certificates",
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: SIMPLE, credentialName: ca}}"),
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: SIMPLE, credentialName: ca, caCertificates: /ca.pem}}"),
            (E, "spec.trafficPolicy.tls", "cannot specify client certificates or CA certificate or CA CRL If credentialName is set"),
        ),
        case(
            "insecureSkipVerify with SIMPLE",
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true}}"),
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [a.example.com]}}"),
            (E, "spec.trafficPolicy.tls", "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true"),
        ),
        case(
            "insecureSkipVerify with MUTUAL",
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: MUTUAL, insecureSkipVerify: true, credentialName: c}}"),
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: MUTUAL, insecureSkipVerify: true, credentialName: c, caCertificates: /ca.pem}}"),
            (E, "spec.trafficPolicy.tls", "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true"),
        ),
        case(
            "configmap credential in own namespace",
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: SIMPLE, credentialName: 'configmap://ns/ca'}}"),
            dr("host: a.example.com\ntrafficPolicy: {tls: {mode: SIMPLE, credentialName: 'configmap://other/ca'}}"),
            (E, "spec.trafficPolicy.tls.credentialName", "invalid configmap:// credentialName: namespace must match the configuration namespace \"ns\""),
        ),
        case(
            "portLevelSettings need a port",
            dr("host: a.example.com\ntrafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: SIMPLE}}]}"),
            dr("host: a.example.com\ntrafficPolicy: {portLevelSettings: [{tls: {mode: SIMPLE}}]}"),
            (E, "spec.trafficPolicy.portLevelSettings[0].port", "portTrafficPolicy must have valid port"),
        ),
        case(
            "port traffic policy not empty",
            dr("host: a.example.com\ntrafficPolicy: {portLevelSettings: [{port: {number: 443}, loadBalancer: {simple: RANDOM}}]}"),
            dr("host: a.example.com\ntrafficPolicy: {portLevelSettings: [{port: {number: 443}}]}"),
            (E, "spec.trafficPolicy.portLevelSettings[0]", "port traffic policy must have at least one field"),
        ),
        case(
            "subset names unique",
            dr("host: a.example.com\nsubsets: [{name: v1}, {name: v2}]"),
            dr("host: a.example.com\nsubsets: [{name: v1}, {name: v1}]"),
            (E, "spec.subsets[1].name", "duplicate subset names: v1"),
        ),
        case(
            "subset name required",
            dr("host: a.example.com\nsubsets: [{name: v1, labels: {version: v1}}]"),
            dr("host: a.example.com\nsubsets: [{labels: {version: v1}}]"),
            (E, "spec.subsets[0].name", "subset name cannot be empty"),
        ),
        case(
            "subset traffic policy",
            dr("host: a.example.com\nsubsets: [{name: v1, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}]"),
            dr("host: a.example.com\nsubsets: [{name: v1, trafficPolicy: {tls: {mode: MUTUAL, privateKey: /k}}}]"),
            (E, "spec.subsets[0].trafficPolicy.tls.clientCertificate", "client certificate required for mutual tls"),
        ),
        case(
            "DR with selector exports only to its namespace",
            dr("host: a.example.com\nworkloadSelector: {matchLabels: {app: x}}\nexportTo: [.]"),
            dr("host: a.example.com\nworkloadSelector: {matchLabels: {app: x}}\nexportTo: [other]"),
            (E, "spec.exportTo", "destination rule with workload selector cannot have exportTo beyond current namespace"),
        ),
        case(
            "DR with selector has one exportTo entry",
            dr("host: a.example.com\nworkloadSelector: {matchLabels: {app: x}}\nexportTo: [ns]"),
            dr("host: a.example.com\nworkloadSelector: {matchLabels: {app: x}}\nexportTo: [., other]"),
            (E, "spec.exportTo", "destination rule with workload selector cannot have multiple entries in exportTo"),
        ),
        case(
            "DR selector without labels warns",
            dr("host: a.example.com\nworkloadSelector: {matchLabels: {app: x}}"),
            dr("host: a.example.com\nworkloadSelector: {}"),
            (W, "spec.workloadSelector", "workload selector specified without labels"),
        ),
        case(
            "tunnel and proxyProtocol",
            dr("host: a.example.com\ntrafficPolicy: {proxyProtocol: {version: V1}}"),
            dr("host: a.example.com\ntrafficPolicy: {proxyProtocol: {version: V1}, tunnel: {protocol: CONNECT}}"),
            (E, "spec.trafficPolicy", "tunnel and proxyProtocol must not be set together"),
        ),
    ]
}

#[test]
fn every_rule_has_a_passing_and_a_failing_document() {
    let mut failures = Vec::new();
    for case in cases() {
        let expected = (
            case.severity,
            case.field.to_owned(),
            case.message.to_owned(),
        );
        let valid = summary(&findings(&case.valid));
        if valid
            .iter()
            .any(|(severity, _, _)| *severity == Severity::Error)
            || valid.contains(&expected)
        {
            failures.push(format!(
                "{}: valid document has findings: {valid:#?}",
                case.rule
            ));
        }
        let invalid = summary(&findings(&case.invalid));
        if !invalid.contains(&expected) {
            failures.push(format!(
                "{}: expected {expected:?}\n  got {invalid:#?}",
                case.rule
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn selector_errors_stop_validation_without_warnings() {
    let yaml = se(
        "hosts: ['*foo.com', '*']\nports: [{number: 5432, name: pg}]\nresolution: NONE\nworkloadSelector: {labels: {app: '*'}}",
    );
    let found = summary(&findings(&yaml));
    assert_eq!(
        found,
        vec![(
            E,
            "spec.workloadSelector.labels.app".to_owned(),
            "wildcard is not supported in selector: \"app=*\"".to_owned()
        )]
    );
}

#[test]
fn findings_name_file_document_object_and_field() {
    let yaml = format!(
        "{}---\n{}",
        se(&format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS")),
        se("hosts: [b.example.com]\nports: [{number: 80, name: a, protocol: HTTP}, {number: 81, name: b, protocol: HTTP, targetPort: 70000}]\nresolution: DNS")
            .replace("name: x", "name: y")
    );
    let found = findings(&yaml);
    let lines: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        vec![
            "error: case.yaml: document 1: ServiceEntry/ns/y: spec.ports[1].targetPort: port number 70000 must be in the range 1..65535"
        ]
    );
}

#[test]
fn partial_wildcard_errors_are_not_warnings() {
    for host in ["foo*", "foo.*.com", "*.*.x"] {
        let found = summary(&findings(&se(&format!(
            "hosts: ['{host}']\n{TLS_443}\nresolution: NONE"
        ))));
        assert!(
            found
                .iter()
                .any(|(severity, field, _)| *severity == E && field == "spec.hosts[0]"),
            "{host}: {found:?}"
        );
    }
}

#[test]
fn wildcard_and_short_hosts_are_fine_with_dns_endpoints() {
    let found = summary(&findings(&se(&format!(
        "hosts: ['*.example.com', short]\n{TLS_443}\nresolution: DNS\nendpoints: [{{address: lb.example.com}}]"
    ))));
    assert!(found.is_empty(), "{found:?}");
}

// Cross-entry rules (`validate::config_set`).

fn se_named(name: &str, created: Option<&str>, body: &str) -> String {
    let created = created
        .map(|time| format!("  creationTimestamp: '{time}'\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: ns\n{created}spec:\n{}",
        indent(body)
    )
}

fn join(documents: &[String]) -> String {
    documents.join("---\n")
}

#[test]
fn port_only_tcp_entries_sharing_a_port_name_the_oldest_as_winner() {
    let body = |host: &str| {
        format!(
            "hosts: [{host}]\nports: [{{number: 5432, name: pg, protocol: TCP}}]\nresolution: NONE"
        )
    };
    let yaml = join(&[
        se_named(
            "newer",
            Some("2024-05-02T00:00:00Z"),
            &body("a.example.com"),
        ),
        se_named(
            "older",
            Some("2024-05-01T23:00:00-02:00"),
            &body("b.example.com"),
        ),
        se_named("untimed", None, &body("c.example.com")),
    ]);
    let found = findings(&yaml);
    let conflicts: Vec<&Finding> = found
        .iter()
        .filter(|f| f.message.contains("claims the same port"))
        .collect();
    // 23:00-02:00 is 01:00Z on May 2nd, after "newer": "newer" is the oldest.
    assert_eq!(conflicts.len(), 2, "{found:#?}");
    for finding in &conflicts {
        assert_eq!(finding.severity, W);
        assert_eq!(finding.field, "spec.ports[0]");
        assert!(
            finding
                .message
                .contains("ServiceEntry/ns/newer (case.yaml document 0) wins"),
            "{}",
            finding.message
        );
    }
    let losers: Vec<&str> = conflicts.iter().map(|f| f.object.as_str()).collect();
    assert_eq!(
        losers,
        vec!["ServiceEntry/ns/older", "ServiceEntry/ns/untimed"]
    );
}

#[test]
fn entries_without_timestamps_count_in_load_order() {
    let body = "hosts: [a.example.com]\nports: [{number: 9000, name: raw}]\nresolution: NONE";
    let yaml = join(&[se_named("zeta", None, body), se_named("alpha", None, body)]);
    let found = findings(&yaml);
    let conflict = found
        .iter()
        .find(|f| f.message.contains("claims the same port"))
        .expect("conflict warning");
    assert_eq!(conflict.object, "ServiceEntry/ns/alpha");
}

#[test]
fn tls_and_http_port_only_entries_may_share_a_port() {
    let tls = |host: &str| format!("hosts: [{host}]\n{TLS_443}\nresolution: NONE");
    let http = |host: &str| format!("hosts: [{host}]\n{HTTP_80}\nresolution: NONE");
    let yaml = join(&[
        se_named("a", None, &tls("a.example.com")),
        se_named("b", None, &tls("b.example.com")),
        se_named("c", None, &http("c.example.com")),
        se_named("d", None, &http("d.example.com")),
    ]);
    assert!(findings(&yaml).is_empty());
}

#[test]
fn opaque_port_only_entry_next_to_sni_entries_is_shadowed() {
    let yaml = join(&[
        se_named(
            "raw",
            None,
            "hosts: [raw.example.com]\nports: [{number: 443, name: raw}]\nresolution: NONE",
        ),
        se_named(
            "tls",
            None,
            &format!("hosts: [a.example.com]\n{TLS_443}\nresolution: NONE"),
        ),
    ]);
    let found = findings(&yaml);
    assert!(
        found.iter().any(|f| f.object == "ServiceEntry/ns/raw"
            && f.field == "spec.ports[0]"
            && f.message.contains("shadowed")
            && f.message.contains("ServiceEntry/ns/tls")),
        "{found:#?}"
    );
}

#[test]
fn two_entries_claiming_one_address_and_port() {
    let body = |host: &str, address: &str| {
        format!(
            "hosts: [{host}]\naddresses: ['{address}']\nports: [{{number: 5432, name: pg, protocol: TCP}}]\nresolution: STATIC"
        )
    };
    let yaml = join(&[
        se_named(
            "first",
            Some("2024-01-01T00:00:00Z"),
            &body("a.example.com", "10.0.0.1"),
        ),
        se_named(
            "second",
            Some("2024-01-01T00:00:00.5Z"),
            &body("b.example.com", "10.0.0.1/32"),
        ),
        se_named("other", None, &body("c.example.com", "10.0.0.2")),
    ]);
    let found = findings(&yaml);
    let conflicts: Vec<&Finding> = found
        .iter()
        .filter(|f| f.message.contains("is also claimed by"))
        .collect();
    assert_eq!(conflicts.len(), 1, "{found:#?}");
    assert_eq!(conflicts[0].object, "ServiceEntry/ns/second");
    assert_eq!(conflicts[0].field, "spec.addresses[0]");
    assert!(
        conflicts[0]
            .message
            .starts_with("address 10.0.0.1 port 5432 is also claimed by ServiceEntry/ns/first")
    );
}

#[test]
fn unparsable_creation_timestamp_warns() {
    let yaml = se_named(
        "x",
        Some("yesterday"),
        &format!("hosts: [a.example.com]\n{TLS_443}\nresolution: DNS"),
    );
    let found = summary(&findings(&yaml));
    assert_eq!(
        found,
        vec![(
            W,
            "metadata.creationTimestamp".to_owned(),
            "creationTimestamp \"yesterday\" is not an RFC 3339 time; the entry is ordered as if it had none".to_owned()
        )]
    );
}

mod helpers {
    use crate::{
        config::validate::names::*,
        registry::{host_subset_of, hosts_overlap},
    };

    #[test]
    fn ip_parsing_follows_go_netip() {
        for good in [
            "1.2.3.4",
            "0.0.0.0",
            "::",
            "2001:db8::1",
            "fe80::1%eth0",
            "::ffff:1.2.3.4",
        ] {
            assert!(is_valid_ip(good), "{good}");
        }
        for bad in [
            "01.2.3.4",
            "1.2.3",
            "256.1.1.1",
            "fe80::1%",
            "1.2.3.4%eth0",
            "",
            "a.b.c.d",
        ] {
            assert!(!is_valid_ip(bad), "{bad}");
        }
        assert!(validate_ip_subnet("2001:db8::/32").is_ok());
        assert!(validate_ip_subnet("10.0.0.0/08").is_err());
        assert!(validate_ip_subnet("10.0.0.0/8/8").is_err());
    }

    #[test]
    fn host_matching() {
        assert!(hosts_overlap("*.foo.com", "a.b.foo.com"));
        assert!(!hosts_overlap("*.foo.com", "foo.com"));
        assert!(hosts_overlap("*", "anything"));
        assert!(hosts_overlap("*.com", "*.foo.com"));
        assert!(hosts_overlap("A.Foo.com", "a.foo.COM"));
        assert!(host_subset_of("A.Foo.com.", "*.foo.COM"));
        assert!(host_subset_of("a.foo.com", "*.foo.com"));
        assert!(!host_subset_of("*.foo.com", "a.foo.com"));
        assert!(host_subset_of("*.a.foo.com", "*.foo.com"));
    }

    #[test]
    fn domain_rules() {
        assert!(validate_wildcard_domain("example.com.").is_ok());
        assert!(validate_wildcard_domain("*-foo.example.com").is_ok());
        assert_eq!(
            validate_fqdn(&"a".repeat(256)),
            Err(format!(
                "domain name {:?} too long (max 255)",
                "a".repeat(256)
            ))
        );
        assert!(validate_fqdn("Upper.Case.Example").is_ok());
        assert!(validate_label_key(&format!("{}/a", "a".repeat(254))).is_err());
    }
}
