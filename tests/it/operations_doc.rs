//! docs/operations.md and deploy/ stay true to the code: every configuration key (with its
//! environment variable) is documented, every documented metric exists, and the shipped
//! configuration file parses.

use std::path::Path;

use oppsync::config::{Config, Purpose};
use serde_json::Value;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Dotted paths of every leaf (arrays are leaves) of a JSON object.
fn leaf_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_paths(v, &path, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn every_configuration_key_is_documented_with_its_environment_variable() {
    let doc = repo_file("docs/operations.md");
    let mut keys = Vec::new();
    leaf_paths(&serde_json::to_value(Config::default()).unwrap(), "", &mut keys);
    assert!(keys.len() > 40, "{keys:?}");
    let missing: Vec<String> = keys
        .iter()
        .flat_map(|k| {
            let env = format!("OPPSYNC__{}", k.to_uppercase().replace('.', "__"));
            [format!("`{k}`"), format!("`{env}`")]
        })
        .filter(|needle| !doc.contains(needle.as_str()))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lacks {missing:?}");
}

#[test]
fn every_documented_metric_exists_in_the_code() {
    let doc = repo_file("docs/operations.md");
    let mut code = String::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                code.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let mut documented = 0;
    for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("oppsync_") {
            documented += 1;
            assert!(
                code.contains(&format!("\"{word}\"")),
                "docs/operations.md names metric {word}, which the code does not emit"
            );
        }
    }
    assert!(documented >= 11);
}

#[test]
fn the_shipped_configuration_file_is_valid() {
    let text = repo_file("deploy/base/oppsync.toml");
    let config = Config::from_toml(&text, Purpose::Inspect).unwrap_or_else(|e| panic!("{e}"));
    // The Deployment's grace period (30 s) covers the drain plus the preStop pause.
    assert!(config.server.shutdown_grace_secs + 5 <= 30);
    assert_eq!(config.server.listen, "0.0.0.0:8080");
}

/// The example PrometheusRule (deploy/monitoring) has the operator's shape, names only metrics
/// the code emits, covers the alerts the operations guide promises, and each alert is
/// documented there.
#[test]
fn the_example_prometheus_rule_alerts_on_what_oppsync_emits_and_is_documented() {
    let text = repo_file("deploy/monitoring/prometheusrule.yaml");
    let rule: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(rule["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    assert!(rule["metadata"]["name"].as_str().is_some());
    let doc = repo_file("docs/operations.md");
    let code: String = ["src/service/metrics.rs"].iter().map(|p| repo_file(p)).collect();
    let mut alerts = Vec::new();
    let mut metrics_used = std::collections::BTreeSet::new();
    for group in rule["spec"]["groups"].as_sequence().unwrap() {
        assert!(group["name"].as_str().is_some());
        for r in group["rules"].as_sequence().unwrap() {
            let alert = r["alert"].as_str().expect("every rule is an alert");
            let expr = r["expr"].as_str().unwrap_or_else(|| panic!("{alert}: no expr"));
            assert!(
                ["critical", "warning", "info"].contains(&r["labels"]["severity"].as_str().unwrap_or("")),
                "{alert}: severity"
            );
            assert!(r["annotations"]["summary"].as_str().is_some(), "{alert}: summary");
            if let Some(f) = r["for"].as_str() {
                assert!(
                    f.ends_with('m') && f.trim_end_matches('m').parse::<u32>().is_ok(),
                    "{alert}: for {f}"
                );
            }
            // Balanced brackets: a cheap guard against a broken expression.
            for (open, close) in [('(', ')'), ('[', ']'), ('{', '}')] {
                assert_eq!(
                    expr.matches(open).count(),
                    expr.matches(close).count(),
                    "{alert}: unbalanced {open}{close} in {expr}"
                );
            }
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("oppsync_") {
                    assert!(
                        code.contains(&format!("\"{word}\"")),
                        "{alert} uses {word}, which oppsync does not describe (src/service/metrics.rs)"
                    );
                    metrics_used.insert(word.to_owned());
                }
            }
            assert!(
                doc.contains(&format!("`{alert}`")),
                "docs/operations.md lacks {alert}"
            );
            alerts.push(alert.to_owned());
        }
    }
    for needed in [
        "oppsync_marketo_blocked",
        "oppsync_marketo_writes_oldest_age_seconds",
        "oppsync_dead_letters",
        "oppsync_marketo_quota_left",
    ] {
        assert!(metrics_used.contains(needed), "no alert on {needed}: {alerts:?}");
    }
}

#[test]
fn the_readme_stays_short_and_points_at_the_figures() {
    let readme = repo_file("README.md");
    let lines = readme.lines().count();
    assert!(lines <= 200, "README.md has {lines} lines; figures go to docs/");
    for doc in ["docs/performance.md", "docs/reliability.md", "docs/operations.md"] {
        assert!(readme.contains(doc), "README.md does not link {doc}");
    }
    assert!(readme.contains("cargo run --release -- demo") && readme.contains("scripts/test.sh"));
    let performance = repo_file("docs/performance.md");
    for section in [
        "## Intake",
        "## Pipeline",
        "## Backlog",
        "## Latency",
        "## Memory",
    ] {
        let at = performance
            .find(section)
            .unwrap_or_else(|| panic!("docs/performance.md lacks {section}"));
        let body = &performance[at..];
        let body = &body[..body[3..].find("\n## ").map_or(body.len(), |e| e + 3)];
        for needle in ["Date", "cargo bench", "| "] {
            assert!(body.contains(needle), "{section} has no {needle:?}");
        }
    }
    let reliability = repo_file("docs/reliability.md");
    for needle in ["## Scenarios and criteria", "## Last full run", "| crash", "PASS"] {
        assert!(
            reliability.contains(needle),
            "docs/reliability.md lacks {needle:?}"
        );
    }
}
