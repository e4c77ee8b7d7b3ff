//! What every benchmark of `make bench` shares: the quick mode, repeated runs reported as
//! min / median / max, a progress bar per scenario, and the results written as JSON and
//! drawn as SVG under `docs/bench/`.
//!
//! A benchmark measures each figure [`runs`] times and hands the values to a [`Figure`];
//! [`write`] stores every figure of a scenario in `docs/bench/<scenario>.json` and draws
//! each as `docs/bench/<scenario>-<figure>.svg` (a bar per series at its median, a whisker
//! from its minimum to its maximum), with the plotting crate `plotters` (no browser, no
//! font files: SVG text is left to the viewer).

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use plotters::prelude::*;
use serde_json::{Value, json};

/// Where the results go.
pub const DIR: &str = "docs/bench";

/// `BENCH_QUICK=1` (`make bench QUICK=1`): smaller loads and fewer runs, for a look in a
/// few minutes; the figures say so.
#[must_use]
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// How many times each figure is measured: 3 in quick mode, 5 otherwise. Never fewer than
/// three, so that a spread can be reported.
#[must_use]
pub fn runs() -> usize {
    if quick() { 3 } else { 5 }
}

/// `full` normally, `quick` in quick mode.
#[must_use]
pub fn size(full: usize, quick_size: usize) -> usize {
    if quick() { quick_size } else { full }
}

/// Minimum, median and maximum of some runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (all zero for none). The median of an even count is the
    /// lower middle value, so it is always one of the runs.
    #[must_use]
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self { min: 0.0, median: 0.0, max: 0.0 };
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self { min: sorted[0], median: sorted[(sorted.len() - 1) / 2], max: sorted[sorted.len() - 1] }
    }
}

/// One series of a figure: a label and the value of each run.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub runs: Vec<f64>,
}

impl Series {
    #[must_use]
    pub fn new(label: impl Into<String>, runs: Vec<f64>) -> Self {
        Self { label: label.into(), runs }
    }

    #[must_use]
    pub fn spread(&self) -> Spread {
        Spread::of(&self.runs)
    }
}

/// One figure: several series of one quantity, compared.
#[derive(Debug, Clone)]
pub struct Figure {
    /// A short id, part of the file names (`lock-strategies-throughput`).
    pub id: String,
    pub title: String,
    /// What the values are (`charges/s`, `ms`).
    pub unit: String,
    pub series: Vec<Series>,
}

impl Figure {
    #[must_use]
    pub fn new(id: impl Into<String>, title: impl Into<String>, unit: impl Into<String>) -> Self {
        Self { id: id.into(), title: title.into(), unit: unit.into(), series: Vec::new() }
    }

    #[must_use]
    pub fn with(mut self, series: Series) -> Self {
        self.series.push(series);
        self
    }

    /// The figure as a Markdown table: one row per series, min / median / max.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out =
            format!("| {} | {} min | median | max |\n|---|---:|---:|---:|\n", self.title, self.unit);
        for series in &self.series {
            let s = series.spread();
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                series.label,
                fmt(s.min),
                fmt(s.median),
                fmt(s.max)
            ));
        }
        out
    }

    /// Every run of every series is a finite number.
    fn check_finite(&self) -> anyhow::Result<()> {
        for series in &self.series {
            if let Some(bad) = series.runs.iter().find(|v| !v.is_finite()) {
                anyhow::bail!("figure {:?}, series {:?}: a run measured {bad}", self.id, series.label);
            }
        }
        Ok(())
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "title": self.title,
            "unit": self.unit,
            "series": self.series.iter().map(|s| {
                let spread = s.spread();
                json!({"label": s.label, "runs": s.runs, "min": spread.min, "median": spread.median, "max": spread.max})
            }).collect::<Vec<_>>(),
        })
    }

    /// Draws the figure as an SVG bar chart at `path`.
    fn draw(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let width = 160 + 150 * u32::try_from(self.series.len()).unwrap_or(1);
        let root = SVGBackend::new(path, (width.max(640), 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let top =
            self.series.iter().map(|s| s.spread().max).fold(0.0_f64, f64::max).max(f64::MIN_POSITIVE) * 1.15;
        let n = self.series.len();
        let labels: Vec<String> = self.series.iter().map(|s| s.label.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..n as f64, 0.0..top)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(&self.unit)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Each series' name under its bar (a numeric axis would label numbers).
        let label_font =
            TextStyle::from(("sans-serif", 14).into_font()).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ));
        for (i, label) in labels.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(label.clone(), (x, y + 8), label_font.clone()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        for (i, series) in self.series.iter().enumerate() {
            let s = series.spread();
            let x = i as f64;
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.2, 0.0), (x + 0.8, s.median)],
                    color.filled(),
                )))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x + 0.5, s.min), (x + 0.5, s.max)],
                    BLACK.stroke_width(2),
                )))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for y in [s.min, s.max] {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x + 0.4, y), (x + 0.6, y)],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    fmt(s.median),
                    (x + 0.25, s.max + top * 0.03),
                    ("sans-serif", 14),
                )))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}

/// A value as a report prints it: whole numbers from 100 up, three significant digits below.
#[must_use]
pub fn fmt(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// `numerator / denominator`, refused unless it is a finite number: a ratio over a rate
/// of zero (a run that did nothing) would otherwise reach the JSON as `null`, since
/// `serde_json` writes infinity and NaN that way, and the report would quote nonsense.
///
/// # Errors
/// When the quotient is infinite or NaN; `what` names the ratio in the message.
pub fn ratio(what: &str, numerator: f64, denominator: f64) -> anyhow::Result<f64> {
    let quotient = numerator / denominator;
    anyhow::ensure!(
        quotient.is_finite(),
        "the ratio {what} is {numerator} / {denominator}, not a finite number"
    );
    Ok(quotient)
}

/// Writes `docs/bench/<scenario>.json` (the figures, `extra`, the machine and the mode) and
/// one SVG per figure; returns the Markdown section to print or include.
///
/// # Errors
/// When a run's value is not a finite number (a division by a zero rate, say: JSON would
/// write it as `null` and the plot's scale would break), or a file cannot be written.
pub fn write(scenario: &str, about: &str, figures: &[Figure], extra: Value) -> anyhow::Result<String> {
    for figure in figures {
        figure.check_finite()?;
    }
    std::fs::create_dir_all(DIR).with_context(|| format!("create {DIR}"))?;
    let machine = crate::stats::machine();
    let mode = if quick() { "quick" } else { "full" };
    let json = json!({
        "scenario": scenario,
        "about": about,
        "machine": machine,
        "mode": mode,
        "runs": runs(),
        "figures": figures.iter().map(Figure::json).collect::<Vec<_>>(),
        "extra": extra,
    });
    let json_path = format!("{DIR}/{scenario}.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("write {json_path}"))?;
    let mut markdown = format!(
        "### {scenario}\n\n{about}\n\nMeasured {machine}, {mode} mode, {} runs per figure.\n\n",
        runs()
    );
    for figure in figures {
        let svg = format!("{scenario}-{}.svg", figure.id);
        figure.draw(&std::path::Path::new(DIR).join(&svg))?;
        markdown.push_str(&figure.table());
        // Relative to docs/bench/, where this Markdown is written.
        markdown.push_str(&format!("\n![{}]({svg})\n\n", figure.title));
    }
    std::fs::write(format!("{DIR}/{scenario}.md"), &markdown)
        .with_context(|| format!("write {DIR}/{scenario}.md"))?;
    Ok(markdown)
}

/// A progress bar on stderr for one scenario: redrawn in place on a terminal, one line per
/// tenth otherwise (CI logs). Cheap to call from many tasks.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    shown: Mutex<u64>,
    started: Instant,
    terminal: bool,
}

impl Progress {
    #[must_use]
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        let progress = Self {
            label: label.into(),
            total: total.max(1),
            done: AtomicU64::new(0),
            shown: Mutex::new(u64::MAX),
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        };
        progress.show(0);
        progress
    }

    /// `n` more steps done.
    pub fn step(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.show(done.min(self.total));
    }

    fn show(&self, done: u64) {
        let tenth = done * 10 / self.total;
        let percent = done * 100 / self.total;
        let mut shown = self.shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = if self.terminal { percent } else { tenth };
        if *shown == key {
            return;
        }
        *shown = key;
        let filled = usize::try_from(done * 30 / self.total).unwrap_or(30);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(30 - filled));
        let line = format!(
            "{:<28} [{bar}] {percent:>3}% {:>6.1} s",
            self.label,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r{line}");
            if done >= self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_are_min_median_max_of_the_runs() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let even = Spread::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(even.median, 2.0, "the lower middle run, one that was measured");
        assert_eq!(Spread::of(&[]).max, 0.0);
    }

    #[test]
    fn a_figure_is_drawn_as_svg_and_tabled() {
        let figure = Figure::new("t", "Things per second", "1/s")
            .with(Series::new("before", vec![10.0, 12.0, 11.0]))
            .with(Series::new("after", vec![100.0, 120.0, 110.0]));
        let path = std::env::temp_dir().join(format!("benchkit-{}.svg", uuid::Uuid::new_v4().simple()));
        figure.draw(&path).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        std::fs::remove_file(&path).ok();
        assert!(
            svg.starts_with("<svg") && svg.contains("Things per second") && svg.contains("before"),
            "{svg}"
        );
        assert!(figure.table().contains("| after | 100 | 110 | 120 |"), "{}", figure.table());
    }

    #[test]
    fn a_ratio_over_a_rate_of_zero_is_refused_with_its_name() {
        assert!((ratio("a / b", 3.0, 2.0).expect("finite") - 1.5).abs() < f64::EPSILON);
        for (n, d) in [(1.0, 0.0), (0.0, 0.0), (f64::NAN, 1.0)] {
            let error = ratio("cached / uncached", n, d).expect_err("refused");
            assert!(error.to_string().contains("cached / uncached"), "{error}");
        }
    }

    #[test]
    fn a_run_that_is_not_a_finite_number_is_refused_before_anything_is_written() {
        for bad in [f64::INFINITY, f64::NAN] {
            let figure =
                Figure::new("t", "Ratio", "x").with(Series::new("ours / limit", vec![1.0, bad, 2.0]));
            let error = figure.check_finite().expect_err("refused");
            assert!(error.to_string().contains("ours / limit"), "{error}");
        }
        Figure::new("t", "Ratio", "x")
            .with(Series::new("fine", vec![0.0, 1.5]))
            .check_finite()
            .expect("finite");
    }
}
