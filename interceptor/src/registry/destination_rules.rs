//! Which DestinationRule traffic policy applies to which service port, and what it
//! makes of the upstream connection.
//!
//! A rule applies to the ServiceEntry hosts its `host` covers, wildcards included;
//! the most specific pattern wins, and between rules with the same host the first
//! loaded. A `portLevelSettings` entry replaces the top-level policy for its port
//! wholesale, as in Istio: fields it leaves unset are not inherited.

use std::{cell::Cell, sync::Arc};

use serde::Serialize;

use super::{HostTable, Service};
use crate::{
    config::{
        ClientTlsSettings, ConfigSet, DestinationRule, Finding, Opaque, Severity,
        SimpleLoadBalancer, Sourced, TlsMode, object_name,
    },
    proxy::{balance::Balancer, pool::TcpPool, tls::Origination},
};

/// The effective policy for one service port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamPolicy {
    /// `DestinationRule/namespace/name`, and the field the policy came from.
    pub rule: String,
    pub field: String,
    /// SIMPLE or MUTUAL origination; `None` is plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Origination>,
    /// `connectionPool.tcp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<TcpPool>,
    /// `loadBalancer.simple` and `outlierDetection`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balancer: Option<Balancer>,
}

/// The rules by host, built once per snapshot.
pub(super) struct DestinationRules<'a> {
    rules: &'a [Sourced<DestinationRule>],
    by_host: HostTable<usize>,
    /// Whether a file could not be read for want of descriptors or memory.
    shortage: Cell<bool>,
}

/// One place in a rule that holds a policy: the top level or a port's settings.
struct PolicySite<'a> {
    field: String,
    port: Option<u16>,
    tls: Option<&'a ClientTlsSettings>,
    pool: Option<&'a Opaque>,
    load_balancer: Option<SimpleLoadBalancer>,
    outlier: Option<&'a Opaque>,
}

fn sites(rule: &DestinationRule) -> Vec<PolicySite<'_>> {
    let Some(policy) = &rule.spec.traffic_policy else {
        return Vec::new();
    };
    let mut sites = vec![PolicySite {
        field: "spec.trafficPolicy".into(),
        port: None,
        tls: policy.tls.as_ref(),
        pool: policy.connection_pool.as_ref(),
        load_balancer: policy.load_balancer.as_ref().and_then(|lb| lb.simple),
        outlier: policy.outlier_detection.as_ref(),
    }];
    for (index, port_policy) in policy.port_level_settings.iter().enumerate() {
        let Some(port) = port_policy
            .port
            .and_then(|port| u16::try_from(port.number).ok())
        else {
            continue;
        };
        sites.push(PolicySite {
            field: format!("spec.trafficPolicy.portLevelSettings[{index}]"),
            port: Some(port),
            tls: port_policy.tls.as_ref(),
            pool: port_policy.connection_pool.as_ref(),
            load_balancer: port_policy.load_balancer.as_ref().and_then(|lb| lb.simple),
            outlier: port_policy.outlier_detection.as_ref(),
        });
    }
    sites
}

impl<'a> DestinationRules<'a> {
    /// Indexes the rules and checks what each can be served with: the modes a node
    /// agent can carry out and the files they name, so that a rule no ServiceEntry
    /// uses yet cannot hide a missing key until one does.
    pub(super) fn new(
        config: &'a ConfigSet,
        errors: &mut Vec<Finding>,
        warnings: &mut Vec<Finding>,
    ) -> Self {
        let rules = &config.destination_rules[..];
        let mut by_host = HostTable::default();
        let mut shortage = false;
        for (index, rule) in rules.iter().enumerate() {
            by_host.insert_if_absent(&rule.resource.spec.host, index);
            for site in sites(&rule.resource) {
                if let Some(Err((field, message))) = site.pool.map(TcpPool::parse) {
                    errors.push(finding(
                        rule,
                        format!("{}.connectionPool.{field}", site.field),
                        message,
                    ));
                }
                if let Err((field, message)) = Balancer::parse(site.load_balancer, site.outlier) {
                    errors.push(finding(
                        rule,
                        format!("{}.outlierDetection.{field}", site.field),
                        message,
                    ));
                }
                let Some(tls) = site.tls else { continue };
                let field = format!("{}.tls", site.field);
                if tls.insecure_skip_verify == Some(true) {
                    warnings.push(Finding {
                        severity: Severity::Warning,
                        ..finding(
                            rule,
                            format!("{field}.insecureSkipVerify"),
                            "the upstream's certificate is not verified: anyone on the path can read and change this traffic".into(),
                        )
                    });
                }
                if let Err((field, message)) = servable(tls, &field) {
                    errors.push(finding(rule, field, message));
                } else if let Err(error) = Origination::load(tls, &[]) {
                    shortage |= error.shortage;
                    errors.push(finding(
                        rule,
                        format!("{field}.{}", error.field),
                        error.message,
                    ));
                }
            }
        }
        Self {
            rules,
            by_host,
            shortage: Cell::new(shortage),
        }
    }

    /// Whether a finding so far only says that a file could not be read for want of
    /// descriptors or memory.
    pub(super) fn met_a_shortage(&self) -> bool {
        self.shortage.get()
    }

    /// The policy of each of the service's ports (`None`: no rule applies), with
    /// the entry's subject alternative names for rules that name none.
    pub(super) fn policies(
        &self,
        service: &Service,
        service_sans: &[String],
        errors: &mut Vec<Finding>,
    ) -> Vec<Option<Arc<UpstreamPolicy>>> {
        let Some(&index) = service
            .hosts
            .iter()
            .find_map(|host| self.by_host.lookup(host))
        else {
            return vec![None; service.ports.len()];
        };
        let rule = &self.rules[index];
        let sites = sites(&rule.resource);
        service
            .ports
            .iter()
            .map(|port| {
                let site = sites
                    .iter()
                    .find(|site| site.port == Some(port.number))
                    .or_else(|| sites.iter().find(|site| site.port.is_none()))?;
                let tls = match site.tls {
                    // Refused and reported when the rules were indexed.
                    Some(tls) if servable(tls, "").is_ok() => {
                        match Origination::load(tls, service_sans) {
                            Ok(tls) => tls,
                            Err(error) => {
                                self.shortage.set(self.shortage.get() | error.shortage);
                                errors.push(finding(
                                    rule,
                                    format!("{}.tls.{}", site.field, error.field),
                                    error.message,
                                ));
                                None
                            }
                        }
                    }
                    _ => None,
                };
                Some(Arc::new(UpstreamPolicy {
                    rule: object_name("DestinationRule", &rule.resource.metadata),
                    field: site.field.clone(),
                    tls,
                    // Reported when the rules were indexed.
                    pool: site
                        .pool
                        .and_then(|pool| TcpPool::parse(pool).ok().flatten()),
                    balancer: Balancer::parse(site.load_balancer, site.outlier)
                        .ok()
                        .flatten(),
                }))
            })
            .collect()
    }
}

/// What no file can fix: ISTIO_MUTUAL needs the mesh's CA and `credentialName` a
/// secret store, and a node agent reading files has neither.
fn servable(tls: &ClientTlsSettings, field: &str) -> Result<(), (String, String)> {
    if tls.mode == TlsMode::IstioMutual {
        return Err((
            format!("{field}.mode"),
            "ISTIO_MUTUAL needs the mesh's certificate authority, which interceptor does not have; use MUTUAL with certificate files".into(),
        ));
    }
    if !tls.credential_name.is_empty() {
        return Err((
            format!("{field}.credentialName"),
            "credentialName names a Kubernetes secret, which interceptor cannot read; use clientCertificate, privateKey and caCertificates files".into(),
        ));
    }
    Ok(())
}

fn finding(rule: &Sourced<DestinationRule>, field: String, message: String) -> Finding {
    let object = object_name("DestinationRule", &rule.resource.metadata);
    Finding::at(Severity::Error, &rule.source, object, field, message)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::{Registry, test_support::config};
    use crate::config::{ConfigSet, Source, Sourced};

    fn with_rules(entries: &[&str], rules: &[&str]) -> ConfigSet {
        let mut config = config(entries);
        config.destination_rules = rules
            .iter()
            .enumerate()
            .map(|(document, yaml)| Sourced {
                source: Source {
                    file: PathBuf::from("rules.yaml"),
                    document,
                },
                resource: serde_saphyr::from_str(yaml).expect("valid DestinationRule"),
            })
            .collect();
        config
    }

    fn rule(name: &str, host: &str, policy: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec:\n  host: \"{host}\"\n  trafficPolicy:\n{policy}"
        )
    }

    const DB: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.example.com]\n  addresses: [240.240.0.1]\n  ports: [{number: 80, name: http}, {number: 81, name: tcp}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.0.1}]\n";

    /// (rule field, TLS mode) per port of the one service.
    fn effective(registry: &Registry) -> Vec<Option<(String, String, Option<String>)>> {
        registry.services()[0]
            .upstream
            .iter()
            .map(|policy| {
                policy.as_ref().map(|policy| {
                    (
                        policy.rule.clone(),
                        policy.field.clone(),
                        policy
                            .tls
                            .as_ref()
                            .map(|tls| tls.server_name(None, "db.example.com")),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn port_settings_replace_the_top_level_policy_wholesale() {
        let config = with_rules(
            &[DB],
            &[&rule(
                "db",
                "db.example.com",
                "    tls: {mode: SIMPLE, insecureSkipVerify: true, sni: top.example}\n    portLevelSettings:\n    - port: {number: 80}\n      tls: {mode: SIMPLE, insecureSkipVerify: true}\n",
            )],
        );
        let (registry, warnings) = Registry::build(&config).unwrap();
        assert_eq!(
            effective(&registry),
            [
                Some((
                    "DestinationRule/default/db".into(),
                    "spec.trafficPolicy.portLevelSettings[0]".into(),
                    // Not the top level's sni: nothing is inherited.
                    Some("db.example.com".into())
                )),
                Some((
                    "DestinationRule/default/db".into(),
                    "spec.trafficPolicy".into(),
                    Some("top.example".into())
                )),
            ]
        );
        // insecureSkipVerify is said out loud, once per place it is set.
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].field.ends_with("tls.insecureSkipVerify"));
    }

    #[test]
    fn the_most_specific_host_wins_and_disable_is_plaintext() {
        let config = with_rules(
            &[DB],
            &[
                &rule(
                    "wide",
                    "*.example.com",
                    "    tls: {mode: SIMPLE, insecureSkipVerify: true}\n",
                ),
                &rule("exact", "db.example.com", "    tls: {mode: DISABLE}\n"),
                &rule(
                    "other",
                    "other.example.com",
                    "    tls: {mode: SIMPLE, insecureSkipVerify: true}\n",
                ),
            ],
        );
        let (registry, _) = Registry::build(&config).unwrap();
        let exact = Some((
            "DestinationRule/default/exact".to_owned(),
            "spec.trafficPolicy".to_owned(),
            None,
        ));
        assert_eq!(effective(&registry), [exact.clone(), exact]);

        let config = with_rules(
            &[DB],
            &[&rule(
                "wide",
                "*.example.com",
                "    tls: {mode: SIMPLE, insecureSkipVerify: true}\n",
            )],
        );
        let (registry, _) = Registry::build(&config).unwrap();
        assert_eq!(
            effective(&registry)[0].as_ref().unwrap().0,
            "DestinationRule/default/wide"
        );
        let (registry, _) = Registry::build(&with_rules(&[DB], &[])).unwrap();
        assert_eq!(effective(&registry), [None, None]);
    }

    #[test]
    fn what_a_node_agent_cannot_serve_is_refused_naming_the_field() {
        for (policy, field, message) in [
            (
                "    tls: {mode: ISTIO_MUTUAL}\n",
                "spec.trafficPolicy.tls.mode",
                "ISTIO_MUTUAL",
            ),
            (
                "    portLevelSettings:\n    - port: {number: 81}\n      tls: {mode: SIMPLE, credentialName: db-secret}\n",
                "spec.trafficPolicy.portLevelSettings[0].tls.credentialName",
                "credentialName",
            ),
            (
                "    tls: {mode: SIMPLE, caCertificates: /nonexistent/ca.pem}\n",
                "spec.trafficPolicy.tls.caCertificates",
                "/nonexistent/ca.pem",
            ),
            (
                "    tls: {mode: MUTUAL, clientCertificate: /nonexistent/c.pem, privateKey: /nonexistent/k.pem, insecureSkipVerify: true}\n",
                "spec.trafficPolicy.tls.clientCertificate",
                "/nonexistent/c.pem",
            ),
        ] {
            // A rule that covers no service is checked all the same.
            let config = with_rules(&[DB], &[&rule("db", "unused.example.com", policy)]);
            let error = Registry::build(&config).unwrap_err();
            assert_eq!(error.findings.len(), 1, "{error}");
            let finding = &error.findings[0];
            assert_eq!(finding.field, field);
            assert_eq!(finding.object, "DestinationRule/default/db");
            assert_eq!(finding.file, PathBuf::from("rules.yaml"));
            assert!(finding.message.contains(message), "{}", finding.message);
        }
    }

    /// Set in the child process the next test runs itself in.
    const SHORTAGE_CHILD: &str = "INTERCEPTOR_TEST_SHORTAGE_CHILD";

    /// The soak's finding: a reload that met a low descriptor limit called the
    /// configuration invalid. The test lowers the open-files limit of a process, so it
    /// runs in a child of the test binary where nothing else runs.
    #[test]
    fn a_file_unread_for_want_of_descriptors_is_a_shortage_not_a_fault_of_the_rule() {
        let config = with_rules(
            &[DB],
            &[&rule(
                "db",
                "db.example.com",
                "    tls: {mode: MUTUAL, clientCertificate: /nonexistent/c.pem, privateKey: /nonexistent/k.pem, caCertificates: /nonexistent/ca.pem}\n",
            )],
        );
        if std::env::var_os(SHORTAGE_CHILD).is_none() {
            let missing = Registry::build(&config).unwrap_err();
            assert!(!missing.shortage, "{missing}");
            let name = "registry::destination_rules::tests::a_file_unread_for_want_of_descriptors_is_a_shortage_not_a_fault_of_the_rule";
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads=1", "--nocapture"])
                .env(SHORTAGE_CHILD, "1")
                .output()
                .unwrap();
            let output = String::from_utf8_lossy(&child.stdout);
            assert!(
                child.status.success(),
                "{output}{}",
                String::from_utf8_lossy(&child.stderr)
            );
            assert!(output.contains("1 passed"), "{output}");
            return;
        }
        // An open fails for want of a descriptor before it looks for the file.
        let (soft, hard) = interceptor_common::host::open_files_limit().unwrap();
        let lowest_free = std::fs::File::open("/dev/null").map(|file| {
            use std::os::fd::AsRawFd as _;
            file.as_raw_fd() as u64
        });
        interceptor_common::host::set_open_files_limit(lowest_free.unwrap(), hard).unwrap();
        let starved = Registry::build(&config);
        interceptor_common::host::set_open_files_limit(soft, hard).unwrap();
        let error = starved.unwrap_err();
        assert!(error.shortage, "{error}");
        assert!(error.to_string().contains("Too many open files"), "{error}");
    }
}
