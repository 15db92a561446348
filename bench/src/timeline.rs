//! A long run's timeline: each second, the server processes' RSS and CPU (from /proc, by pid
//! files that a script keeps current across restarts) beside the load's counters, written as
//! CSV and drawn as a PNG.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The processes named by the files of a directory (name: file name, content: pid).
pub struct Procs {
    dir: PathBuf,
    pub names: Vec<String>,
    /// Per name: the pid and CPU seconds at the last sample.
    last: HashMap<String, (u32, f64)>,
}

/// One process at one sample: RSS in MiB and CPU in percent of one core since the last.
#[derive(Clone, Copy, Default)]
pub struct Sample {
    pub rss_mib: f64,
    pub cpu_pct: f64,
}

impl Procs {
    pub fn new(dir: &Path) -> anyhow::Result<Procs> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("pid directory {}", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(Procs {
            dir: dir.to_path_buf(),
            names,
            last: HashMap::new(),
        })
    }

    /// Samples every process; one that is down (restarting) reads as zero.
    pub fn sample(&mut self, seconds: f64) -> Vec<Sample> {
        let names = self.names.clone();
        names.iter().map(|n| self.one(n, seconds)).collect()
    }

    fn one(&mut self, name: &str, seconds: f64) -> Sample {
        let pid = std::fs::read_to_string(self.dir.join(name))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(pid) = pid else {
            return Sample::default();
        };
        let (Ok(rss), Ok(cpu)) = (crate::rss_kib(pid), crate::cpu_seconds(pid)) else {
            return Sample::default();
        };
        let cpu_pct = match self.last.insert(name.to_string(), (pid, cpu)) {
            Some((p, before)) if p == pid && seconds > 0.0 => (cpu - before) / seconds * 100.0,
            _ => 0.0,
        };
        Sample {
            rss_mib: rss as f64 / 1024.0,
            cpu_pct,
        }
    }
}

/// Rows of numbers under a header, the first column being seconds since the start.
#[derive(Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<f64>>,
}

impl Table {
    pub fn csv(&self) -> String {
        let mut out = self.header.join(",");
        out.push('\n');
        for r in &self.rows {
            let cells: Vec<String> = r.iter().map(|v| format!("{v:.2}")).collect();
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// Draws one panel per group of columns (a title and the columns' names) against time.
    pub fn plot(&self, path: &Path, panels: &[(&str, Vec<String>)]) -> anyhow::Result<()> {
        use plotters::prelude::*;
        register_font()?;
        let area = BitMapBackend::new(path, (1400, 360 * panels.len() as u32)).into_drawing_area();
        area.fill(&WHITE)?;
        let t_max = self.rows.last().map_or(1.0, |r| r[0]).max(1.0);
        for (area, (title, cols)) in area.split_evenly((panels.len(), 1)).iter().zip(panels) {
            let idx: Vec<(usize, &String)> = cols
                .iter()
                .filter_map(|c| Some((self.column(c)?, c)))
                .collect();
            let y_max = self
                .rows
                .iter()
                .flat_map(|r| idx.iter().map(|(i, _)| r[*i]))
                .fold(1.0f64, f64::max)
                * 1.1;
            let mut chart = ChartBuilder::on(area)
                .caption(*title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .label_style(("sans-serif", 14))
                .draw()?;
            for (n, (i, name)) in idx.iter().enumerate() {
                let color = Palette99::pick(n).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        self.rows.iter().map(|r| (r[0], r[*i])),
                        color.stroke_width(2),
                    ))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()?;
        }
        area.present()?;
        Ok(())
    }
}

/// plotters draws text with a font it is given: the system's sans-serif, found by
/// fontconfig's `fc-match` (Debian: fontconfig and fonts-dejavu-core).
fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = DONE.get_or_init(|| {
        let out = std::process::Command::new("fc-match")
            .args(["-f", "%{file}", "sans-serif"])
            .output()
            .map_err(|e| format!("fc-match: {e} (install fontconfig)"))?;
        let file = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let bytes = std::fs::read(&file).map_err(|e| format!("font {file}: {e}"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| format!("font {file} is not a font plotters can read"))
    });
    r.clone().map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_the_header_and_one_line_per_row() {
        let t = Table {
            header: vec!["t".into(), "rss".into()],
            rows: vec![vec![0.0, 1.5], vec![1.0, 2.25]],
        };
        assert_eq!(t.csv(), "t,rss\n0.00,1.50\n1.00,2.25\n");
    }

    #[test]
    fn a_pid_directory_names_its_processes_and_samples_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("me"), std::process::id().to_string()).unwrap();
        std::fs::write(dir.path().join("gone"), "not a pid").unwrap();
        let mut p = Procs::new(dir.path()).unwrap();
        assert_eq!(p.names, ["gone", "me"]);
        let s = p.sample(1.0);
        assert_eq!(s[0].rss_mib, 0.0);
        assert!(s[1].rss_mib > 0.0);
    }
}
