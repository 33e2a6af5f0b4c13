//! Results of one benchmark point, and the ways they are shown: a table with
//! nixlbench's columns, JSON lines, and an SVG chart.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency samples in nanoseconds.
#[derive(Debug)]
pub struct Samples {
    hist: Histogram<u64>,
    sum_ns: u128,
}

impl Default for Samples {
    fn default() -> Self {
        Samples {
            // Three significant digits from 1 ns to an hour: plenty for a transfer.
            hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds"),
            sum_ns: 0,
        }
    }
}

impl Samples {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = (d.as_nanos() as u64).clamp(1, 3_600_000_000_000);
        self.sum_ns += u128::from(ns);
        // The value is clamped into the histogram's bounds above.
        let _ = self.hist.record(ns);
    }

    /// Merges another set of samples.
    pub fn merge(&mut self, other: &Samples) {
        let _ = self.hist.add(&other.hist);
        self.sum_ns += other.sum_ns;
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Mean in microseconds.
    pub fn avg_us(&self) -> f64 {
        if self.count() == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count() as f64 / 1e3
        }
    }

    /// A percentile in microseconds.
    pub fn pct_us(&self, p: f64) -> f64 {
        if self.count() == 0 {
            0.0
        } else {
            self.hist.value_at_quantile(p / 100.0) as f64 / 1e3
        }
    }
}

/// One measured point: a block size and batch size on one backend.
#[derive(Debug, Serialize)]
pub struct Point {
    pub bench: &'static str,
    pub backend: String,
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    pub block_size: u64,
    pub batch_size: usize,
    pub threads: usize,
    pub iters: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops: Option<f64>,
    pub lat_us_avg: f64,
    pub lat_us_p50: f64,
    pub lat_us_p99: f64,
    pub prep_us_avg: f64,
    pub prep_us_p50: f64,
    pub prep_us_p99: f64,
    pub post_us_p50: f64,
    pub post_us_p99: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

/// Timings gathered by one run, turned into a [`Point`].
#[derive(Debug, Default)]
pub struct Timings {
    pub prep: Samples,
    pub post: Samples,
    pub complete: Samples,
    pub iters: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Timings {
    pub fn merge(&mut self, o: &Timings) {
        self.prep.merge(&o.prep);
        self.post.merge(&o.post);
        self.complete.merge(&o.complete);
        self.iters += o.iters;
        self.bytes += o.bytes;
        self.elapsed = self.elapsed.max(o.elapsed);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn point(
        &self,
        bench: &'static str,
        backend: &str,
        op: &str,
        engine: Option<String>,
        block: u64,
        batch: usize,
        threads: usize,
        iops: bool,
    ) -> Point {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        Point {
            bench,
            backend: backend.to_string(),
            op: op.to_string(),
            engine,
            block_size: block,
            batch_size: batch,
            threads,
            iters: self.iters,
            bytes: self.bytes,
            seconds: secs,
            gbps: self.bytes as f64 / secs / 1e9,
            iops: iops.then(|| (self.iters * batch as u64) as f64 / secs),
            lat_us_avg: self.complete.avg_us(),
            lat_us_p50: self.complete.pct_us(50.0),
            lat_us_p99: self.complete.pct_us(99.0),
            prep_us_avg: self.prep.avg_us(),
            prep_us_p50: self.prep.pct_us(50.0),
            prep_us_p99: self.prep.pct_us(99.0),
            post_us_p50: self.post.pct_us(50.0),
            post_us_p99: self.post.pct_us(99.0),
            verified: None,
        }
    }
}

/// Human size: 4K, 64K, 1M, 64M.
pub fn size_str(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// The table header, nixlbench's columns plus backend and op.
pub fn table_header(storage: bool) -> String {
    let mut s = format!(
        "{:<8} {:<6} {:>10} {:>6} {:>10} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "backend",
        "op",
        "block",
        "batch",
        "GB/s",
        "avg lat us",
        "prep p50",
        "prep p99",
        "post p50",
        "post p99",
        "done p50",
        "done p99"
    );
    if storage {
        s.push_str(&format!(" {:>10} {:>8}", "IOPS", "engine"));
    }
    s
}

/// One table row.
pub fn table_row(p: &Point) -> String {
    let mut s = format!(
        "{:<8} {:<6} {:>10} {:>6} {:>10.3} {:>11.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        p.backend,
        p.op,
        size_str(p.block_size),
        p.batch_size,
        p.gbps,
        p.lat_us_avg,
        p.prep_us_p50,
        p.prep_us_p99,
        p.post_us_p50,
        p.post_us_p99,
        p.lat_us_p50,
        p.lat_us_p99
    );
    if let Some(iops) = p.iops {
        s.push_str(&format!(" {:>10.0} {:>8}", iops, p.engine.as_deref().unwrap_or("-")));
    }
    s
}

/// An SVG line chart of bandwidth against block size (log scale), one line
/// per backend and operation.
pub fn svg_plot(points: &[Point], title: &str) -> String {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for p in points {
        let key = format!("{} {} x{}", p.backend, p.op, p.batch_size);
        let xy = ((p.block_size as f64).log2(), p.gbps);
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(xy),
            None => series.push((key, vec![xy])),
        }
    }
    let (w, h, m) = (800.0, 480.0, 60.0);
    let xmin = points.iter().map(|p| (p.block_size as f64).log2()).fold(f64::INFINITY, f64::min);
    let xmax = points.iter().map(|p| (p.block_size as f64).log2()).fold(f64::NEG_INFINITY, f64::max);
    let ymax = points.iter().map(|p| p.gbps).fold(0.0, f64::max).max(1e-3) * 1.1;
    let xspan = (xmax - xmin).max(1.0);
    let sx = |x: f64| m + (x - xmin) / xspan * (w - 2.0 * m);
    let sy = |y: f64| h - m - y / ymax * (h - 2.0 * m);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        w / 2.0,
        xml(title)
    );
    let _ = write!(
        s,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#,
        h - m,
        w - m,
        h - m,
        h - m
    );
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">{y:.2}</text>"#, m - 6.0, sy(y) + 4.0);
    }
    let mut x = xmin.floor();
    while x <= xmax {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(x),
            h - m + 18.0,
            size_str(2f64.powf(x) as u64)
        );
        x += 1.0f64.max((xspan / 10.0).ceil());
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">block size</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">GB/s</text>"#,
        w / 2.0,
        h - 16.0,
        h / 2.0,
        h / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#, path.join(" "));
        for &(x, y) in pts {
            let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#, sx(x), sy(y));
        }
        let _ =
            write!(s, r#"<text x="{}" y="{}" fill="{c}">{}</text>"#, m + 10.0, m + 16.0 * (i as f64 + 1.0), xml(name));
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_sizes() {
        let mut s = Samples::default();
        for us in 1..=100 {
            s.record(Duration::from_micros(us));
        }
        assert!((s.avg_us() - 50.5).abs() < 0.1);
        assert!((s.pct_us(50.0) - 50.0).abs() < 1.0);
        assert_eq!(size_str(64 << 20), "64M");
        assert_eq!(size_str(4096), "4K");
        assert_eq!(size_str(1000), "1000");
    }

    #[test]
    fn plot_is_svg() {
        let t = Timings { iters: 1, bytes: 4096, elapsed: Duration::from_micros(10), ..Default::default() };
        let pts = vec![
            t.point("p2p", "LOCAL", "WRITE", None, 4096, 1, 1, false),
            t.point("p2p", "LOCAL", "WRITE", None, 1 << 20, 1, 1, false),
        ];
        let svg = svg_plot(&pts, "a <test>");
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("&lt;test&gt;"));
    }
}
