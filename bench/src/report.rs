//! Results as JSON files and one Markdown table that grows a row per run.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

fn cell(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    match cur {
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.1}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const HEADER: &str = "| scenario | server | transport | connections | rate/s | delivered/s | delivered per server CPU-s | p50 µs | p99 µs | p999 µs | RSS B/conn | connects/s | server user / sys CPU-s | syscalls per delivery |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";

pub fn row(v: &Value) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |\n",
        cell(v, &["scenario"]),
        cell(v, &["server"]),
        cell(v, &["transport"]),
        cell(v, &["connections"]),
        cell(v, &["rate"]),
        cell(v, &["delivered_per_second"]),
        cell(v, &["delivered_per_cpu_second"]),
        cell(v, &["latency_us", "p50"]),
        cell(v, &["latency_us", "p99"]),
        cell(v, &["latency_us", "p999"]),
        cell(v, &["server_rss_bytes_per_connection"]),
        cell(v, &["connects_per_second"]),
        cell(v, &["server_user_seconds"]),
        cell(v, &["server_sys_seconds"]),
        v["syscalls_per_delivery"]
            .as_f64()
            .map_or("-".into(), |f| format!("{f:.2}")),
    )
}

/// Writes `{dir}/{scenario}-{time}.json` and appends a row to `{dir}/results.md`.
pub fn write(dir: &Path, v: &Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = format!(
        "{}-{}.json",
        cell(v, &["scenario"]),
        crate::now_ns() / 1_000_000
    );
    std::fs::write(dir.join(name), serde_json::to_vec_pretty(v)?)?;
    let md = dir.join("results.md");
    let new = !md.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(md)?;
    if new {
        f.write_all(HEADER.as_bytes())?;
    }
    f.write_all(row(v).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_fill_missing_cells() {
        let r = row(
            &serde_json::json!({"scenario": "idle", "connections": 10, "delivered_per_second": 1.25}),
        );
        assert!(r.starts_with("| idle | - | - | 10 | - | 1.2 |"), "{r}");
        assert!(r.ends_with("| - / - | - |\n"), "{r}");
        let r = row(
            &serde_json::json!({"server_user_seconds": 1.5, "server_sys_seconds": 4,
            "syscalls_per_delivery": 0.2861}),
        );
        assert!(r.ends_with("| 1.5 / 4 | 0.29 |\n"), "{r}");
    }
}
