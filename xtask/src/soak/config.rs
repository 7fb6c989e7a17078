//! The soak's ServiceEntries: one per traffic class's route, plus reload churn.

use std::{fmt::Write as _, fs, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};

use super::backends::{
    DNS_NAME, ECHO_PORT, FLAKY_PORT, HOST_A, HOST_B, HTTP_PORT, NONE_PORT, ORIGIN_CA_FILE,
    ORIGIN_NAME, ORIGIN_PORT, SINK_PORT, TLS_PORT,
};

/// The STATIC VIP (bulk, request/response, churn, idle, flaky) and the DNS one.
pub const STATIC_VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 1);
pub const DNS_VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 3);
/// The kernel path's VIP: a plain TCP STATIC entry, which `--datapath auto` sends
/// straight to its endpoint with no proxy hop.
pub const KERNEL_VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 4);
/// The TLS origination entry's VIP: plaintext in, TLS to the origin.
pub const ORIGIN_VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 5);
/// A host without addresses: the daemon allocates its VIP and answers for it on the
/// captured port 53.
pub const CAPTURE_HOST: &str = "capture.soak.internal";
/// Where the DNS capture client sends its queries: any port-53 destination is
/// captured; this one is the upstream's, which would answer NXDOMAIN if it were not.
pub const CAPTURE_RESOLVER: std::net::SocketAddr = super::backends::DNS_SERVER;

/// The annotation that keeps an entry on the proxy path: the classes that test the
/// proxy (its drain, its resets, its descriptors) need their bytes to pass through it.
const PROXY_PATH: &str = "  annotations: {interceptor.dev/datapath: proxy}\n";
/// Where the SNI and Host clients connect: an address nobody holds, so that only the
/// port-only entries' redirect reaches a backend.
pub const PORT_ONLY_DESTINATION: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
pub const TLS_HOST: &str = "tls.soak.internal";
pub const HTTP_HOST: &str = "http.soak.internal";

/// The file the soak rewrites; the daemon watches its directory.
pub const FILE: &str = "soak.yaml";

/// The config of reload number `generation`: the same routes each time, plus
/// `generation % 5` extra entries that no client uses, so that each reload changes
/// the registry. `invalid` adds a document that validation rejects. `origin_ca` is
/// the file with the TLS origin's CA.
pub fn yaml(generation: u64, invalid: bool, origin_ca: &Path) -> String {
    let mut yaml = String::new();
    entry(
        &mut yaml,
        ("soak-static", PROXY_PATH),
        &format!(
            "hosts: [static.soak.internal]\n  addresses: [{STATIC_VIP}]\n  resolution: STATIC"
        ),
        &[(SINK_PORT, "TCP"), (ECHO_PORT, "TCP"), (FLAKY_PORT, "TCP")],
        Some(HOST_A),
    );
    entry(
        &mut yaml,
        ("soak-tls", ""),
        &format!("hosts: [{TLS_HOST}]\n  resolution: STATIC"),
        &[(TLS_PORT, "TLS")],
        Some(HOST_A),
    );
    entry(
        &mut yaml,
        ("soak-http", ""),
        &format!("hosts: [{HTTP_HOST}]\n  resolution: STATIC"),
        &[(HTTP_PORT, "HTTP")],
        Some(HOST_A),
    );
    entry(
        &mut yaml,
        ("soak-dns", ""),
        &format!("hosts: [{DNS_NAME}]\n  addresses: [{DNS_VIP}]\n  resolution: DNS"),
        &[(ECHO_PORT, "TCP")],
        None,
    );
    entry(
        &mut yaml,
        ("soak-none", ""),
        &format!("hosts: [none.soak.internal]\n  addresses: [{HOST_B}/32]\n  resolution: NONE"),
        &[(NONE_PORT, "TCP")],
        None,
    );
    entry(
        &mut yaml,
        ("soak-kernel", ""),
        &format!(
            "hosts: [kernel.soak.internal]\n  addresses: [{KERNEL_VIP}]\n  resolution: STATIC"
        ),
        &[(ECHO_PORT, "TCP")],
        Some(HOST_B),
    );
    entry(
        &mut yaml,
        ("soak-capture", ""),
        &format!("hosts: [{CAPTURE_HOST}]\n  resolution: STATIC"),
        &[(ECHO_PORT, "TCP")],
        Some(HOST_A),
    );
    entry(
        &mut yaml,
        ("soak-origin", ""),
        &format!("hosts: [{ORIGIN_NAME}]\n  addresses: [{ORIGIN_VIP}]\n  resolution: STATIC"),
        &[(ORIGIN_PORT, "TCP")],
        Some(HOST_A),
    );
    // SIMPLE: the proxy verifies the origin's certificate against this CA, for the
    // ServiceEntry host, which is also the SNI it sends.
    let _ = write!(
        yaml,
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: soak-origin\n  namespace: soak\nspec:\n  host: {ORIGIN_NAME}\n  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCertificates: {}\n",
        origin_ca.display()
    );
    for extra in 0..generation % 5 {
        entry(
            &mut yaml,
            (&format!("soak-extra-{extra}"), ""),
            &format!(
                "hosts: [extra-{extra}.soak.internal]\n  addresses: [240.240.1.{}]\n  resolution: STATIC",
                extra + 1
            ),
            &[(ECHO_PORT, "TCP")],
            Some(HOST_A),
        );
    }
    if invalid {
        entry(
            &mut yaml,
            ("soak-invalid", ""),
            "hosts: [invalid.soak.internal]\n  addresses: [240.240.2.1]\n  resolution: SOMETIMES",
            &[(ECHO_PORT, "TCP")],
            Some(HOST_A),
        );
    }
    yaml
}

/// One ServiceEntry; `metadata` is `(name, extra metadata lines)`.
fn entry(
    yaml: &mut String,
    (name, annotations): (&str, &str),
    spec: &str,
    ports: &[(u16, &str)],
    endpoint: Option<Ipv4Addr>,
) {
    let _ = write!(
        yaml,
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: soak\n{annotations}spec:\n  {spec}\n  location: MESH_EXTERNAL\n  ports:\n"
    );
    for (port, protocol) in ports {
        let _ = write!(
            yaml,
            "  - number: {port}\n    name: {}-{port}\n    protocol: {protocol}\n",
            protocol.to_lowercase()
        );
    }
    if let Some(endpoint) = endpoint {
        let _ = write!(yaml, "  endpoints:\n  - address: {endpoint}\n");
    }
}

/// Replaces the config file in one rename, so the daemon never reads half of it.
pub fn write(directory: &Path, generation: u64, invalid: bool) -> Result<()> {
    let staged = directory.join(".soak.yaml.tmp");
    let path = directory.join(FILE);
    let origin_ca = directory.parent().unwrap_or(directory).join(ORIGIN_CA_FILE);
    fs::write(&staged, yaml(generation, invalid, &origin_ca))
        .with_context(|| format!("writing {}", staged.display()))?;
    fs::rename(&staged, &path).with_context(|| format!("replacing {}", path.display()))
}
