//! Loader tests: multi-document files, directories, skipped kinds, strict decoding,
//! versions, all-or-nothing; the Istio reference examples; and property tests that
//! nothing panics on any input.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use proptest::prelude::*;

use super::{LoadError, Loaded, OutputFormat, Severity, load, load_str, render};

const REFERENCE_EXAMPLES: &str = include_str!("testdata/istio-serviceentry-reference.yaml");

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "interceptor-config-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).expect("write test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn entry(name: &str, host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\nspec:\n  hosts: [{host}]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  resolution: DNS\n"
    )
}

fn invalid_findings(result: Result<Loaded, LoadError>) -> Vec<super::Finding> {
    match result {
        Err(LoadError::Invalid { findings }) => findings,
        Err(other) => panic!("expected invalid configuration, got {other}"),
        Ok(loaded) => panic!("expected invalid configuration, got {loaded:?}"),
    }
}

#[test]
fn reference_examples_load_without_errors() {
    let loaded = load_str(
        Path::new("istio-serviceentry-reference.yaml"),
        REFERENCE_EXAMPLES,
    )
    .unwrap_or_else(|error| panic!("{error}"));
    let config = &loaded.config;
    assert_eq!(config.service_entries.len(), 18);
    assert_eq!(config.workload_entries.len(), 4);
    assert_eq!(config.virtual_services.len(), 4);
    assert_eq!(config.destination_rules.len(), 2);
    assert_eq!(loaded.skipped.len(), 2, "{:?}", loaded.skipped);
    assert!(loaded.skipped.iter().all(|line| line.ends_with("Gateway")));
    // Each example appears once per API version, so the copies conflict with each
    // other; that is a warning, never an error.
    assert!(
        loaded
            .warnings
            .iter()
            .all(|f| f.severity == Severity::Warning)
    );
}

#[test]
fn each_reference_service_entry_is_clean_on_its_own() {
    for document in REFERENCE_EXAMPLES.split("\n---\n") {
        if !document.contains("kind: ServiceEntry") {
            continue;
        }
        let loaded = load_str(Path::new("example.yaml"), document)
            .unwrap_or_else(|error| panic!("{error}\n{document}"));
        assert!(
            loaded.warnings.is_empty(),
            "{:?}\n{document}",
            loaded.warnings
        );
    }
}

#[test]
fn multi_document_files_keep_document_indices() {
    let text = format!(
        "{}---\n---\n{}",
        entry("a", "a.example.com"),
        entry("b", "b.example.com")
    );
    let loaded = load_str(Path::new("multi.yaml"), &text).expect("loads");
    let documents: Vec<usize> = loaded
        .config
        .service_entries
        .iter()
        .map(|e| e.source.document)
        .collect();
    assert_eq!(documents, vec![0, 2]);
}

#[test]
fn directories_are_read_in_name_order_and_non_config_files_ignored() {
    let dir = TempDir::new();
    dir.write("b.yaml", &entry("second", "b.example.com"));
    dir.write("a.yml", &entry("first", "a.example.com"));
    dir.write("c.json", r#"{"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "third"}, "spec": {"hosts": ["c.example.com"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}], "resolution": "DNS"}}"#);
    dir.write("notes.txt", "not: [config");
    let loaded = load(std::slice::from_ref(&dir.0)).expect("loads");
    let names: Vec<&str> = loaded
        .config
        .service_entries
        .iter()
        .map(|e| e.resource.metadata.name.as_str())
        .collect();
    assert_eq!(names, vec!["first", "second", "third"]);
}

#[test]
fn an_empty_directory_is_an_error() {
    let dir = TempDir::new();
    dir.write("readme.md", "nothing here");
    assert!(matches!(
        load(std::slice::from_ref(&dir.0)),
        Err(LoadError::Empty { .. })
    ));
}

#[test]
fn a_missing_path_is_a_read_error() {
    let missing = PathBuf::from("/nonexistent/interceptor/config.yaml");
    assert!(matches!(load(&[missing]), Err(LoadError::Read { .. })));
}

#[test]
fn other_kinds_are_skipped() {
    let text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec: {{}}\n---\n{}",
        entry("a", "a.example.com")
    );
    let loaded = load_str(Path::new("mixed.yaml"), &text).expect("loads");
    assert_eq!(
        loaded.skipped,
        vec![
            "mixed.yaml: document 0: v1 ConfigMap",
            "mixed.yaml: document 1: networking.istio.io/v1 Gateway"
        ]
    );
    assert_eq!(loaded.config.service_entries.len(), 1);
}

#[test]
fn unknown_fields_are_errors_naming_the_field() {
    let text = entry("a", "a.example.com").replace("protocol: TLS", "protocol: TLS, nmae: x");
    let findings = invalid_findings(load_str(Path::new("typo.yaml"), &text));
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].field, "spec.ports[0].nmae");
    assert!(
        findings[0].message.contains("unknown field `nmae`"),
        "{}",
        findings[0].message
    );
    assert_eq!(findings[0].object, "ServiceEntry/default/a");

    for (kind, spec, field) in [
        (
            "WorkloadEntry",
            "{address: 1.1.1.1, wieght: 2}",
            "spec.wieght",
        ),
        (
            "VirtualService",
            "{hosts: [a.example.com], tcp: [{route: [{destination: {hots: b}}]}]}",
            "spec.tcp[0].route[0].destination.hots",
        ),
        (
            "DestinationRule",
            "{host: a.example.com, trafficPolicy: {tls: {mdoe: SIMPLE}}}",
            "spec.trafficPolicy.tls.mdoe",
        ),
    ] {
        let text = format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: {kind}\nmetadata: {{name: x}}\nspec: {spec}\n"
        );
        let findings = invalid_findings(load_str(Path::new("typo.yaml"), &text));
        assert_eq!(findings[0].field, field, "{kind}: {findings:?}");
        assert!(
            findings[0].message.contains("unknown field"),
            "{kind}: {findings:?}"
        );
    }
}

#[test]
fn metadata_accepts_server_populated_fields() {
    let text = entry("a", "a.example.com").replace(
        "  name: a\n",
        "  name: a\n  uid: 1234\n  resourceVersion: '99'\n  generation: 3\n  managedFields: [{manager: kubectl}]\n  creationTimestamp: '2024-01-01T00:00:00Z'\n",
    );
    let loaded = load_str(Path::new("server.yaml"), &text).expect("loads");
    assert_eq!(loaded.config.service_entries.len(), 1);
}

#[test]
fn every_served_version_loads_and_others_are_errors() {
    for version in ["v1alpha3", "v1beta1", "v1"] {
        let text = entry("a", "a.example.com").replace(
            "networking.istio.io/v1",
            &format!("networking.istio.io/{version}"),
        );
        assert!(load_str(Path::new("v.yaml"), &text).is_ok(), "{version}");
    }
    let text =
        entry("a", "a.example.com").replace("networking.istio.io/v1", "networking.istio.io/v2");
    let findings = invalid_findings(load_str(Path::new("v.yaml"), &text));
    assert_eq!(findings[0].field, "apiVersion");
    assert!(findings[0].message.starts_with("unsupported version"));
}

#[test]
fn kubernetes_lists_are_unpacked() {
    let text = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n",
        serde_json::to_string(
            &serde_saphyr::from_str::<serde_json::Value>(&entry("a", "a.example.com"))
                .expect("yaml")
        )
        .expect("json")
    );
    let loaded = load_str(Path::new("list.yaml"), &text).expect("loads");
    assert_eq!(loaded.config.service_entries.len(), 1);
}

#[test]
fn loading_is_all_or_nothing() {
    let dir = TempDir::new();
    dir.write("a.yaml", &entry("good", "a.example.com"));
    dir.write("b.yaml", &entry("bad", "'*'"));
    dir.write("c.yaml", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: nopes}\nspec: {hosts: [c.example.com], ports: [{number: 5432, name: pg}]}\n");
    let findings = invalid_findings(load(std::slice::from_ref(&dir.0)));
    // The error comes first, and the warning from another file is still reported.
    assert_eq!(findings[0].severity, Severity::Error);
    assert_eq!(findings[0].object, "ServiceEntry/default/bad");
    assert!(
        findings
            .iter()
            .any(|f| f.severity == Severity::Warning && f.object == "ServiceEntry/default/nopes")
    );
}

#[test]
fn yaml_syntax_errors_are_findings() {
    let findings = invalid_findings(load_str(Path::new("broken.yaml"), "kind: [unclosed\n"));
    assert!(findings[0].message.starts_with("invalid YAML"));
}

#[test]
fn missing_kind_is_an_error() {
    let findings = invalid_findings(load_str(
        Path::new("nokind.yaml"),
        "apiVersion: v1\nmetadata: {name: a}\n",
    ));
    assert_eq!(findings[0].field, "kind");
}

#[test]
fn report_renders_text_and_json() {
    let text = format!(
        "{}---\n{}",
        entry("a", "'*'"),
        entry("b", "b.example.com").replace("443", "0")
    );
    let findings = invalid_findings(load_str(Path::new("r.yaml"), &text));
    let rendered = render(&findings, OutputFormat::Text);
    assert_eq!(rendered.lines().count(), findings.len());
    assert!(rendered.starts_with(
        "error: r.yaml: document 0: ServiceEntry/default/a: spec.hosts[0]: invalid host *\n"
    ));

    let json: serde_json::Value =
        serde_json::from_str(&render(&findings, OutputFormat::Json)).expect("valid JSON");
    assert_eq!(
        json["errors"],
        findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    );
    assert_eq!(json["findings"][0]["severity"], "error");
    assert_eq!(json["findings"][0]["field"], "spec.hosts[0]");
    assert_eq!(json["findings"][0]["document"], 0);
    assert_eq!(render(&[], OutputFormat::Text), "");
    assert_eq!(
        "JSON".parse::<OutputFormat>().ok(),
        Some(OutputFormat::Json)
    );
    assert!("xml".parse::<OutputFormat>().is_err());
}

/// The one finding of a document the parser refuses, checked to name the file and
/// the document.
fn yaml_error(text: &str, document: usize) -> String {
    let findings = invalid_findings(load_str(Path::new("hostile.yaml"), text));
    assert_eq!(findings.len(), 1, "{findings:?}");
    let finding = &findings[0];
    assert_eq!(finding.file, Path::new("hostile.yaml"));
    assert_eq!(finding.document, document);
    assert!(finding.message.starts_with("invalid YAML: "), "{finding}");
    finding.message.clone()
}

#[test]
fn deep_nesting_is_refused_at_the_depth_limit() {
    for text in [
        "[".repeat(200_000),
        "{".repeat(200_000),
        "[".repeat(100_000) + &"]".repeat(100_000),
        "[{a: ".repeat(50_000),
        "- ".repeat(50_000) + "x\n",
        (0..2_000)
            .map(|depth| format!("{}a:\n", " ".repeat(depth)))
            .collect(),
    ] {
        let message = yaml_error(&text, 0);
        assert!(message.contains("recursion limit exceeded"), "{message}");
    }
}

#[test]
fn alias_expansion_is_refused_at_its_budget() {
    let mut laughs = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (name, previous) in ["b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .zip("abcdefgh".chars())
    {
        let aliases = vec![format!("*{previous}"); 9].join(", ");
        laughs.push_str(&format!("{name}: &{name} [{aliases}]\n"));
    }
    let message = yaml_error(&laughs, 0);
    assert!(
        message.contains("too complex: total_replayed_events"),
        "{message}"
    );

    let many = format!("a: &a x\nb: [{}]\n", vec!["*a"; 60_000].join(", "));
    let message = yaml_error(&many, 0);
    assert!(message.contains("limits breached: Aliases"), "{message}");
}

#[test]
fn long_scalars_and_many_documents_load() {
    let long = entry("a", "a.example.com").replace(
        "  name: a\n",
        &format!(
            "  name: a\n  annotations: {{note: {}}}\n",
            "x".repeat(1 << 20)
        ),
    );
    let loaded = load_str(Path::new("long.yaml"), &long).expect("loads");
    assert_eq!(
        loaded.config.service_entries[0]
            .resource
            .metadata
            .annotations["note"]
            .len(),
        1 << 20
    );

    let many = "---\n".repeat(20_000) + &entry("a", "a.example.com");
    let loaded = load_str(Path::new("many.yaml"), &many).expect("loads");
    assert_eq!(loaded.config.service_entries[0].source.document, 19_999);
}

#[test]
fn documents_before_a_broken_one_still_load_and_lines_count_from_the_file() {
    let text = format!(
        "{}---\n{}---\nkind: [unclosed\n",
        entry("a", "'*'"),
        entry("b", "b.example.com")
    );
    let findings = invalid_findings(load_str(Path::new("broken.yaml"), &text));
    let syntax = findings
        .iter()
        .find(|f| f.message.starts_with("invalid YAML"))
        .expect("a syntax finding");
    assert_eq!(syntax.document, 2);
    assert!(syntax.message.contains("line 19"), "{}", syntax.message);
    // Document 0 was still read and validated.
    assert!(
        findings
            .iter()
            .any(|f| f.document == 0 && f.field == "spec.hosts[0]")
    );

    let duplicate = format!("{}---\na: 1\na: 2\n", entry("a", "a.example.com"));
    let message = yaml_error(&duplicate, 1);
    assert!(message.contains("duplicate"), "{message}");
    assert!(message.contains("line 11"), "{message}");
}

#[test]
fn scalars_read_as_yaml_1_2() {
    // YAML 1.1 booleans and numbers with leading zeros stay strings, as in serde_yaml.
    let text = entry("a", "a.example.com").replace(
        "  name: a\n",
        "  name: a\n  labels: {enabled: yes, mode: on, code: 0755, big: 1_000}\n",
    );
    let loaded = load_str(Path::new("scalars.yaml"), &text).expect("loads");
    let labels = &loaded.config.service_entries[0].resource.metadata.labels;
    assert_eq!(labels["enabled"], "yes");
    assert_eq!(labels["mode"], "on");
    assert_eq!(labels["code"], "0755");
    assert_eq!(labels["big"], "1_000");
}

/// Fragments that make arbitrary text look more like the documents we parse.
fn yaml_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("apiVersion: networking.istio.io/v1\n".to_owned()),
        Just("kind: ServiceEntry\n".to_owned()),
        Just("kind: VirtualService\n".to_owned()),
        Just("kind: DestinationRule\n".to_owned()),
        Just("kind: WorkloadEntry\n".to_owned()),
        Just("metadata: {name: x}\n".to_owned()),
        Just("spec:\n".to_owned()),
        Just("  hosts: ['*']\n".to_owned()),
        Just("  ports: [null, {number: -1}]\n".to_owned()),
        Just("  endpoints: []\n".to_owned()),
        Just("---\n".to_owned()),
        Just("...\n".to_owned()),
        Just("a: &x [1, {b: *x}]\n".to_owned()),
        Just("<<: *x\n".to_owned()),
        Just("%YAML 1.2\n".to_owned()),
        "[\\[\\]{}:, ]{0,40}",
        "[ -~\n]{0,20}",
    ]
}

/// Applies one edit to `text` at a position chosen by `at` (a fraction).
fn mutate(text: &str, edit: u8, at: f64, insert: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let position = ((chars.len() as f64) * at) as usize;
    let position = position.min(chars.len());
    let mut out: Vec<char> = chars.clone();
    match edit % 4 {
        0 => {
            let end = (position + insert.len()).min(out.len());
            out.drain(position..end);
        }
        1 => {
            for (offset, c) in insert.chars().enumerate() {
                out.insert(position + offset, c);
            }
        }
        2 => {
            if let Some(c) = out.get_mut(position) {
                *c = insert.chars().next().unwrap_or(' ');
            }
        }
        _ => {
            // Duplicate a line, which repeats keys and list items.
            let line_start = chars[..position]
                .iter()
                .rposition(|c| *c == '\n')
                .map_or(0, |p| p + 1);
            let line_end = chars[position..]
                .iter()
                .position(|c| *c == '\n')
                .map_or(chars.len(), |p| position + p + 1);
            let line: Vec<char> = chars[line_start..line_end].to_vec();
            for (offset, c) in line.into_iter().enumerate() {
                out.insert(line_end + offset, c);
            }
        }
    }
    out.into_iter().collect()
}

/// Renders the findings of a load of `file`, each of which must name that file.
fn render_all(file: &str, result: &Result<Loaded, LoadError>) {
    if let Err(LoadError::Invalid { findings }) = result {
        assert!(
            findings.iter().all(|f| f.file == Path::new(file)),
            "{findings:?}"
        );
        let _ = render(findings, OutputFormat::Json);
        let _ = render(findings, OutputFormat::Text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        render_all("fuzz.yaml", &load_str(Path::new("fuzz.yaml"), &text));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        render_all("bytes.yaml", &load_str(Path::new("bytes.yaml"), &text));
    }

    #[test]
    fn yaml_like_text_never_panics(parts in proptest::collection::vec(yaml_fragment(), 0..24)) {
        render_all("fuzz.yaml", &load_str(Path::new("fuzz.yaml"), &parts.concat()));
    }

    #[test]
    fn mutated_reference_documents_never_panic(
        edits in proptest::collection::vec((any::<u8>(), 0.0f64..1.0, "[ -~\n]{1,8}"), 1..6),
    ) {
        let mut text = REFERENCE_EXAMPLES.to_owned();
        for (edit, at, insert) in &edits {
            text = mutate(&text, *edit, *at, insert);
        }
        render_all("mutated.yaml", &load_str(Path::new("mutated.yaml"), &text));
    }
}
