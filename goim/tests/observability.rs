//! The chart's Grafana dashboard and alerts parse, and every metric they name is one the roles
//! or the operator export (a renamed metric fails here, not silently on a dashboard).

use std::collections::BTreeSet;

use serde_json::Value;

const DASHBOARD: &str = include_str!("../../charts/goim/dashboards/goim.json");
const RULES: &str = include_str!("../../charts/goim/rules/goim.rules.yaml");

/// Metric names in a PromQL expression, without the series suffixes of counters and
/// histograms (the exposition's `# TYPE` lines name the family).
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("goim_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_total", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(family.to_string());
        rest = &tail[end..];
    }
    out
}

/// Families from `# TYPE` lines of a Prometheus text exposition.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Every family the roles and the operator register, each labelled family given one series
/// (an empty family prints nothing at all).
fn exported() -> BTreeSet<String> {
    let mut registry = prometheus_client::registry::Registry::default();
    let comet = goim_comet::CometMetrics::default();
    let r = |reason| goim_comet::metrics::Reason { reason };
    comet.pushes_dropped.get_or_create(&r("x")).inc();
    comet.closed.get_or_create(&r("x")).inc();
    comet.history_failures.get_or_create(&r("x")).inc();
    comet.register(&mut registry);
    let logic = goim_logic::LogicMetrics::default();
    let k = goim_logic::logic::Kind { kind: "x" };
    logic.pushes.get_or_create(&k).inc();
    logic.push_seconds.get_or_create(&k).observe(0.001);
    logic.register(&mut registry);
    let job = goim_job::JobMetrics::default();
    let j = goim_job::Reason { reason: "x" };
    job.comet_calls.get_or_create(&j).inc();
    job.comet_call_seconds.get_or_create(&j).observe(0.001);
    job.undeliverable.get_or_create(&j).inc();
    job.register(&mut registry);
    let operator = goim_operator::metrics::Metrics::default();
    operator
        .failures
        .get_or_create(&goim_operator::metrics::ErrorKind { kind: "x" })
        .inc();
    operator.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    families(&text)
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let exported = exported();
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "goim-rs");
    let mut named = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for p in panels {
        assert!(p["title"].is_string() && p["gridPos"]["w"].is_number());
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            named.extend(metrics_in(t["expr"].as_str().expect("expr")));
        }
    }
    let rules: serde_yaml::Value = serde_yaml::from_str(RULES).expect("the rules are YAML");
    let rules = rules["groups"][0]["rules"].as_sequence().expect("rules");
    assert!(rules.len() >= 5);
    for r in rules {
        assert!(r["alert"].as_str().is_some() && r["labels"]["severity"].as_str().is_some());
        named.extend(metrics_in(r["expr"].as_str().expect("expr")));
    }
    for n in &named {
        assert!(
            exported.contains(n),
            "{n} is not exported by any role or the operator"
        );
    }
    // Latency, connections, pushes by kind and drops by reason are all on the dashboard.
    for needed in [
        "goim_logic_push_seconds",
        "goim_job_comet_call_seconds",
        "goim_comet_connections",
        "goim_logic_pushes",
        "goim_comet_pushes_dropped",
        "goim_job_undeliverable",
    ] {
        assert!(named.iter().any(|n| n == needed), "{needed} is not shown");
    }
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metrics_in("histogram_quantile(0.99, sum by (le) (rate(goim_logic_push_seconds_bucket{a=\"b\"}[5m]))) / goim_comet_connections"),
        ["goim_logic_push_seconds", "goim_comet_connections"]
    );
}
