//! `interceptor explain`: why a connect to a destination is (or is not) intercepted,
//! where it goes and by which path, as a plain value.
//!
//! Every answer comes from the functions the data path itself runs: the registry's
//! lookups and [`outbound::decide`] for the route, [`datapath::plan`] and
//! [`datapath::backend_set`] for the path, the resolver's endpoint selection for the
//! endpoints. Only the words around them are new here, so an explanation cannot
//! drift from what a connection really does.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use serde::Serialize;

use crate::{
    audience::Audience,
    config::Resolution,
    datapath::{self, DatapathMode, Resolved},
    proxy::{
        OutboundPolicy,
        outbound::{self, Decision, Step},
    },
    registry::{Choice, EndpointAddress, HostKind, Registry, Route, best_match},
    resolve::{self, Target},
};

/// What is asked: a destination, the name the client sends, and its cgroup.
#[derive(Debug, Clone)]
pub struct Query {
    pub destination: SocketAddr,
    pub name: Option<(HostKind, String)>,
    /// The client's cgroup, and the one the programs are attached to.
    pub cgroup: Option<(PathBuf, PathBuf)>,
    /// Whether the proxy listens for native IPv6 connects (`--proxy-addr-v6`).
    pub ipv6_proxy: bool,
    /// The client's namespace, where rules are scoped by `exportTo`; `None` where
    /// every rule is everyone's.
    pub namespace: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub destination: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Whether connect4/6 redirect the connect (to the proxy or to a backend).
    pub intercepted: bool,
    /// Why, or why not.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<Datapath>,
    pub decision: &'static str,
    /// Where the connection may go: one route, or a VirtualService's weighted split.
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Serialize)]
pub struct Datapath {
    /// `kernel` or `proxy`.
    pub path: &'static str,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub service: String,
    pub file: PathBuf,
    pub document: usize,
    pub port: u16,
    /// Why this service and not another.
    pub why: String,
    pub weight: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub resolution: &'static str,
    pub endpoints: Vec<EndpointView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<DnsView>,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub address: String,
    pub port: u16,
    pub weight: u64,
    /// Ejected by the DestinationRule's outlier detection right now.
    pub ejected: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DnsView {
    pub host: String,
    /// What the daemon's DNS cache says now; empty when the lookup failed.
    pub addresses: Vec<IpAddr>,
}

impl Explanation {
    /// The hostnames whose current addresses the explanation shows: look them up and
    /// explain again with the answers.
    pub fn hosts(&self) -> BTreeSet<String> {
        self.routes
            .iter()
            .flat_map(|route| route.dns.iter().map(|dns| dns.host.clone()))
            .collect()
    }
}

/// Explains `query` against `registry` under the daemon's `--datapath` and
/// `--outbound-policy`, with the DNS answers in `resolved`.
pub fn explain(
    registry: &Registry,
    mode: DatapathMode,
    policy: OutboundPolicy,
    query: &Query,
    resolved: &Resolved,
) -> Explanation {
    let destination = query.destination;
    let (sni, host) = match &query.name {
        Some((HostKind::Sni, name)) => (Some(name.clone()), None),
        Some((HostKind::Http, name)) => (None, Some(name.clone())),
        None => (None, None),
    };
    let mut explanation = Explanation {
        destination,
        sni,
        host,
        intercepted: false,
        reason: String::new(),
        datapath: None,
        decision: "direct",
        routes: Vec::new(),
    };
    if let Some((client, attached)) = &query.cgroup
        && !client.starts_with(attached)
    {
        explanation.reason = format!(
            "{} is outside {}, the cgroup the programs are attached to",
            client.display(),
            attached.display()
        );
        return explanation;
    }
    let Some((rule, rule_service, audience)) = kernel_rule(registry, destination) else {
        explanation.reason = format!(
            "no ServiceEntry claims {} on port {}: connect4/6 leave it alone",
            destination.ip(),
            destination.port()
        );
        return explanation;
    };
    if let Some(namespace) = &query.namespace
        && !audience.includes(namespace)
    {
        explanation.reason = format!(
            "{rule}, but it is not exported to namespace {namespace}, this client's (exportTo): \
             connect4/6 leave it alone"
        );
        return explanation;
    }
    let datapath = path(registry, mode, &rule_service, destination, resolved);
    if datapath.path == "proxy" && destination.ip().to_canonical().is_ipv6() && !query.ipv6_proxy {
        explanation.reason = format!(
            "{rule}, but the proxy has no IPv6 listener (--proxy-addr-v6 off, or no IPv6 on \
             the host): connect6 leaves native IPv6 connects on the proxy path alone"
        );
        return explanation;
    }
    explanation.intercepted = true;
    explanation.reason = rule.clone();
    explanation.datapath = Some(datapath);

    let choices: Vec<(Choice, String)> = match outbound::decide(registry, destination, policy) {
        Step::Decided(Decision::Forward(forward)) => {
            let why = rule.clone();
            vec![(
                Choice {
                    route: forward.route,
                    weight: 1,
                    virtual_service: None,
                },
                why,
            )]
        }
        Step::Decided(unmatched) => {
            explanation.decision = unmatched_label(&unmatched, policy);
            return explanation;
        }
        Step::NeedsHost(routes) => {
            let Some((kind, name)) = &query.name else {
                explanation.decision = "needs_host";
                explanation.reason = format!(
                    "{rule}; the port routes by TLS SNI or HTTP Host: ask again with --sni or --host"
                );
                return explanation;
            };
            let choices = registry.host_choices(routes, *kind, Some(name));
            if choices.is_empty() {
                let unmatched = outbound::decide_by_host(
                    registry,
                    routes,
                    destination,
                    *kind,
                    Some(name),
                    policy,
                );
                explanation.decision = unmatched_label(&unmatched, policy);
                return explanation;
            }
            choices
                .into_iter()
                .map(|choice| {
                    let why = host_reason(&choice, *kind, name);
                    (choice, why)
                })
                .collect()
        }
    };
    explanation.decision = "forward";
    explanation.routes = choices
        .into_iter()
        .map(|(choice, why)| route_view(choice, why, destination, resolved))
        .collect();
    explanation
}

/// The kernel's rule for `destination`, in words, and the service whose path it
/// carries: the longest address prefix on the port first, then the port alone, as
/// the connect hooks look them up.
fn kernel_rule(registry: &Registry, destination: SocketAddr) -> Option<(String, String, Audience)> {
    let intercepts = registry.intercepts();
    let ip = destination.ip().to_canonical();
    let services = registry.services();
    if let Some((network, _, rule_id)) = intercepts
        .addresses
        .iter()
        .filter(|(network, port, _)| *port == destination.port() && network.contains(&ip))
        .max_by_key(|(network, _, _)| network.prefix_len())
    {
        let service = &services[*rule_id as usize];
        let vip = intercepts.vips.contains(&ip);
        let words = if vip {
            format!(
                "{ip} is a VIP allocated to a host of {} (port {})",
                service.name,
                destination.port()
            )
        } else {
            format!(
                "longest address prefix {network} on port {} ({})",
                destination.port(),
                service.name
            )
        };
        return Some((words, service.name.clone(), service.audience.clone()));
    }
    let (_, rule_id) = intercepts
        .ports
        .iter()
        .find(|(port, _)| *port == destination.port())?;
    let service = &services[*rule_id as usize];
    Some((
        format!(
            "port-only rule for port {}: entries without addresses claim it ({} first)",
            destination.port(),
            service.name
        ),
        service.name.clone(),
        Audience::union_of(
            registry
                .port_only_services(destination.port())
                .map(|service| service.audience.clone()),
        ),
    ))
}

fn path(
    registry: &Registry,
    mode: DatapathMode,
    service: &str,
    destination: SocketAddr,
    resolved: &Resolved,
) -> Datapath {
    // Which audience a rule has never changes its path.
    let plan = datapath::plan(registry, mode, false);
    let proxy = |reason: String| Datapath {
        path: "proxy",
        reason,
    };
    match plan.path_of(service, destination.port()) {
        // Whether the kernel can hold the set at all; ejections are shown per endpoint.
        Some(Ok(backends)) => match datapath::backend_set(backends, resolved, |_| false) {
            Ok(_) => Datapath {
                path: "kernel",
                reason: "plain TCP with endpoints the kernel can pick: connect goes straight \
                         to a backend"
                    .into(),
            },
            Err(reason) => proxy(format!(
                "{} (until the kernel path can hold it)",
                reason.label()
            )),
        },
        Some(Err(reason)) => proxy(reason.label().into()),
        None => proxy("no kernel backends planned".into()),
    }
}

fn unmatched_label(decision: &Decision, policy: OutboundPolicy) -> &'static str {
    match (decision, policy) {
        (Decision::Reject(_), _) => "reject (outbound policy REGISTRY_ONLY: no service matches)",
        (Decision::Passthrough(_), _) => {
            "passthrough (outbound policy ALLOW_ANY: no service matches)"
        }
        (Decision::Forward(_), _) => "forward",
    }
}

/// Why a host-routed choice was taken, in words.
fn host_reason(choice: &Choice, kind: HostKind, name: &str) -> String {
    let field = match kind {
        HostKind::Sni => "SNI",
        HostKind::Http => "Host",
    };
    if let Some(virtual_service) = &choice.virtual_service {
        return format!("{virtual_service} routes {field} {name} here");
    }
    let hosts = &choice.route.service.hosts;
    match best_match(hosts, name) {
        Some(index) if hosts[index].starts_with('*') => {
            format!("{field} {name} matches the wildcard host {}", hosts[index])
        }
        Some(index) => format!("{field} {name} matches the exact host {}", hosts[index]),
        None => format!(
            "no host matches {field} {name}: the port's oldest opaque (TCP) service takes it"
        ),
    }
}

fn route_view(choice: Choice, why: String, original: SocketAddr, resolved: &Resolved) -> RouteView {
    let Choice { route, weight, .. } = choice;
    let service = &route.service;
    let ejected = route
        .upstream_policy()
        .and_then(|policy| policy.balancer.as_ref())
        .map(|balancer| balancer.ejected(Instant::now()))
        .unwrap_or_default();
    let (endpoints, dns) = endpoints(&route, original, &ejected, resolved);
    RouteView {
        service: service.name.clone(),
        file: service.source.file.clone(),
        document: service.source.document,
        port: route.port().number,
        why,
        weight,
        host: route.host.clone(),
        resolution: service.resolution.as_str(),
        endpoints,
        policy: route
            .upstream_policy()
            .and_then(|policy| serde_json::to_value(&**policy).ok()),
        dns,
    }
}

/// The endpoints the proxy picks among for `route`, and the DNS answers of those that
/// are hostnames.
fn endpoints(
    route: &Route,
    original: SocketAddr,
    ejected: &[Target],
    resolved: &Resolved,
) -> (Vec<EndpointView>, Vec<DnsView>) {
    let port = route.port();
    if route.service.resolution == Resolution::None {
        return (
            vec![EndpointView {
                address: original.ip().to_string(),
                port: port.default_endpoint_port,
                weight: 1,
                ejected: false,
            }],
            Vec::new(),
        );
    }
    let all = resolve::routed_endpoints(route);
    let used = if route.service.resolution == Resolution::DnsRoundRobin {
        &all[..all.len().min(1)]
    } else {
        &all[..]
    };
    let mut dns = Vec::new();
    let views = used
        .iter()
        .map(|endpoint| {
            let number = resolve::endpoint_port(endpoint, route);
            let (address, target) = match &endpoint.address {
                EndpointAddress::Ip(ip) => (
                    ip.to_string(),
                    Some(Target::Tcp(SocketAddr::new(*ip, number))),
                ),
                EndpointAddress::Unix(path) => (
                    format!("unix://{path}"),
                    Some(Target::Unix(Path::new(path).to_path_buf())),
                ),
                EndpointAddress::Hostname(host) => {
                    dns.push(DnsView {
                        host: host.clone(),
                        addresses: resolved
                            .get(host)
                            .map(|addresses| addresses.to_vec())
                            .unwrap_or_default(),
                    });
                    (host.clone(), None)
                }
            };
            EndpointView {
                address,
                port: number,
                weight: endpoint.weight,
                ejected: target.is_some_and(|target| ejected.contains(&target)),
            }
        })
        .collect();
    (views, dns)
}

/// The explanation as one screen of text.
pub fn render(explanation: &Explanation) -> String {
    let mut out = String::new();
    let name = match (&explanation.sni, &explanation.host) {
        (Some(sni), _) => format!(" (SNI {sni})"),
        (_, Some(host)) => format!(" (Host {host})"),
        _ => String::new(),
    };
    let _ = writeln!(out, "{}{name}", explanation.destination);
    let yes_no = if explanation.intercepted { "yes" } else { "no" };
    let _ = writeln!(out, "  intercepted: {yes_no}: {}", explanation.reason);
    if let Some(datapath) = &explanation.datapath {
        let _ = writeln!(
            out,
            "  datapath:    {} ({})",
            datapath.path, datapath.reason
        );
    }
    let _ = writeln!(out, "  decision:    {}", explanation.decision);
    for route in &explanation.routes {
        let _ = writeln!(
            out,
            "  route:       {} port {} ({}, document {}), weight {}",
            route.service,
            route.port,
            route.file.display(),
            route.document,
            route.weight
        );
        let _ = writeln!(out, "    why:       {}", route.why);
        let host = route
            .host
            .as_ref()
            .map(|host| format!(", host {host}"))
            .unwrap_or_default();
        let _ = writeln!(out, "    resolution: {}{host}", route.resolution);
        for endpoint in &route.endpoints {
            let ejected = if endpoint.ejected { " EJECTED" } else { "" };
            let _ = writeln!(
                out,
                "    endpoint:  {} port {} weight {}{ejected}",
                endpoint.address, endpoint.port, endpoint.weight
            );
        }
        for answer in &route.dns {
            let addresses: Vec<String> = answer.addresses.iter().map(ToString::to_string).collect();
            let said = if addresses.is_empty() {
                "no addresses (lookup failed or not made)".to_owned()
            } else {
                addresses.join(", ")
            };
            let _ = writeln!(out, "    dns:       {} -> {said}", answer.host);
        }
        match &route.policy {
            Some(policy) => {
                let _ = writeln!(out, "    policy:    {policy}");
            }
            None => {
                let _ = writeln!(out, "    policy:    none (no DestinationRule covers it)");
            }
        }
    }
    out
}

/// Resolves what `explanation` shows of DNS through the daemon's cache.
pub async fn lookups(hosts: BTreeSet<String>, dns: &Arc<resolve::DnsCache>) -> Resolved {
    let mut resolved = Resolved::new();
    for host in hosts {
        if let Ok(addresses) = dns.lookup(&host).await {
            resolved.insert(host, addresses);
        }
    }
    resolved
}

/// The `key=value` pairs of a URL query, percent-decoded (`+` is a space).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = bytes
            .get(index + 1..index + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[index], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                index += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                index += 1;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` as a URL query value: unreserved characters and `/` as they are, the
/// rest percent-encoded.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests;
