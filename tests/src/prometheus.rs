//! Prometheus exposition text read by the reference parser: Debian's
//! python3-prometheus-client (`/usr/bin/python3`; `scripts/install-deps` installs it),
//! its OpenMetrics parser and its classic text parser both. A text either rejects fails
//! the test with the parser's error.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// The Python that parses a scrape: the OpenMetrics parser (the text ends in `# EOF`, and
/// is served as OpenMetrics), then the classic text parser. Prints the samples as JSON.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as classic
text = sys.stdin.read()
out = []
for fam in om(text):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
n = sum(1 for _ in classic(text))
if n == 0:
    raise SystemExit("the classic text parser found no metric")
print(json.dumps(out))
"#;

/// One sample of a scrape, as the parser read it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub family: String,
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// `name{label="value",...}` with the labels sorted by name (`name` alone without
    /// labels): one key per sample of a scrape.
    pub fn key(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// Parse exposition text with the Python parser; panics with the parser's error.
pub fn parse(text: &str) -> Vec<Sample> {
    let python = "/usr/bin/python3";
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {python}: {e} (install python3 and python3-prometheus-client)")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape to the parser");
    let out = child.wait_with_output().expect("wait for the parser");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the scrape: {}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the parser's JSON output");
    v.as_array()
        .expect("a list of samples")
        .iter()
        .map(|s| Sample {
            family: s["family"].as_str().expect("family").to_string(),
            kind: s["type"].as_str().expect("type").to_string(),
            name: s["name"].as_str().expect("name").to_string(),
            labels: s["labels"]
                .as_object()
                .expect("labels")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_string()))
                .collect(),
            value: s["value"].as_f64().expect("value"),
        })
        .collect()
}

/// The samples of `text` by [`Sample::key`].
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    parse(text)
        .into_iter()
        .map(|s| (s.key(), s.value))
        .collect()
}
