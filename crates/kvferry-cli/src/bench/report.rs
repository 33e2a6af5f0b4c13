//! Results of one benchmark point, and the ways they are shown: a table with
//! nixlbench's columns and JSON lines (charts: [`super::plot`]).

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
    /// Which benchmark: "p2p" or "storage".
    pub bench: &'static str,
    /// The backend measured, e.g. "SHM" or "POSIX".
    pub backend: String,
    /// The operation: "WRITE" or "READ".
    pub op: String,
    /// The storage engine (uring, threads), for storage points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// The storage offset pattern (seq, rand), for storage points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Bytes per descriptor.
    pub block_size: u64,
    /// Descriptors per request.
    pub batch_size: usize,
    /// Threads posting at once.
    pub threads: usize,
    /// Timed requests completed.
    pub iters: u64,
    /// Bytes moved by the timed requests.
    pub bytes: u64,
    /// Wall time of the timed requests.
    pub seconds: f64,
    /// Bandwidth in GB/s (10^9 bytes per second).
    pub gbps: f64,
    /// Descriptors per second, for storage points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops: Option<f64>,
    /// Post to completion, mean, in µs.
    pub lat_us_avg: f64,
    /// Post to completion, median, in µs.
    pub lat_us_p50: f64,
    /// Post to completion, 99th percentile, in µs.
    pub lat_us_p99: f64,
    /// Request preparation, mean, in µs.
    pub prep_us_avg: f64,
    /// Request preparation, median, in µs.
    pub prep_us_p50: f64,
    /// Request preparation, 99th percentile, in µs.
    pub prep_us_p99: f64,
    /// The post call alone, median, in µs.
    pub post_us_p50: f64,
    /// The post call alone, 99th percentile, in µs.
    pub post_us_p99: f64,
    /// Whether every byte was checked after the point (with --check-consistency).
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
            pattern: None,
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

/// One column of a table of points: its header, width, alignment and cell.
struct Col {
    head: &'static str,
    width: usize,
    left: bool,
    cell: fn(&Point) -> String,
}

impl Col {
    fn pad(&self, text: &str) -> String {
        if self.left {
            format!("{text:<w$}", w = self.width)
        } else {
            format!("{text:>w$}", w = self.width)
        }
    }
}

/// Renders `cols` of one line: headers when `p` is `None`, else `p`'s cells.
fn line(cols: &[&[Col]], p: Option<&Point>) -> String {
    let cells: Vec<String> =
        cols.iter().flat_map(|c| c.iter()).map(|c| c.pad(&p.map_or_else(|| c.head.to_string(), c.cell))).collect();
    cells.join(" ")
}

/// nixlbench's columns plus backend and op: the table of `bench p2p` and `bench storage`.
const BENCH: &[Col] = &[
    Col { head: "backend", width: 8, left: true, cell: |p| p.backend.clone() },
    Col { head: "op", width: 6, left: true, cell: |p| p.op.clone() },
    Col { head: "block", width: 10, left: false, cell: |p| size_str(p.block_size) },
    Col { head: "batch", width: 6, left: false, cell: |p| p.batch_size.to_string() },
    Col { head: "GB/s", width: 10, left: false, cell: |p| format!("{:.3}", p.gbps) },
    Col { head: "avg lat us", width: 11, left: false, cell: |p| format!("{:.1}", p.lat_us_avg) },
    Col { head: "prep p50", width: 10, left: false, cell: |p| format!("{:.1}", p.prep_us_p50) },
    Col { head: "prep p99", width: 10, left: false, cell: |p| format!("{:.1}", p.prep_us_p99) },
    Col { head: "post p50", width: 10, left: false, cell: |p| format!("{:.1}", p.post_us_p50) },
    Col { head: "post p99", width: 10, left: false, cell: |p| format!("{:.1}", p.post_us_p99) },
    Col { head: "done p50", width: 10, left: false, cell: |p| format!("{:.1}", p.lat_us_p50) },
    Col { head: "done p99", width: 10, left: false, cell: |p| format!("{:.1}", p.lat_us_p99) },
];

/// What storage points add.
const STORAGE: &[Col] = &[
    Col { head: "IOPS", width: 10, left: false, cell: |p| format!("{:.0}", p.iops.unwrap_or(0.0)) },
    Col { head: "engine", width: 8, left: false, cell: |p| p.engine.clone().unwrap_or_else(|| "-".into()) },
];

/// The short table of `kvferry bench` (the summary).
const SUMMARY: &[Col] = &[
    Col { head: "backend", width: 8, left: true, cell: |p| p.backend.clone() },
    Col { head: "op", width: 6, left: true, cell: |p| p.op.clone() },
    Col { head: "block", width: 6, left: false, cell: |p| size_str(p.block_size) },
    Col { head: "batch", width: 6, left: false, cell: |p| p.batch_size.to_string() },
    Col { head: "GB/s", width: 10, left: false, cell: |p| format!("{:.3}", p.gbps) },
    Col { head: "avg us", width: 10, left: false, cell: |p| format!("{:.1}", p.lat_us_avg) },
    Col { head: "p99 us", width: 12, left: false, cell: |p| format!("{:.1}", p.lat_us_p99) },
    Col { head: "IOPS", width: 10, left: false, cell: |p| p.iops.map_or_else(|| "-".into(), |i| format!("{i:.0}")) },
];

/// The table header, nixlbench's columns plus backend and op (and IOPS and
/// engine for storage).
pub fn table_header(storage: bool) -> String {
    if storage {
        line(&[BENCH, STORAGE], None)
    } else {
        line(&[BENCH], None)
    }
}

/// One table row (with IOPS and engine when the point has IOPS).
pub fn table_row(p: &Point) -> String {
    if p.iops.is_some() {
        line(&[BENCH, STORAGE], Some(p))
    } else {
        line(&[BENCH], Some(p))
    }
}

/// The summary table's header.
pub fn summary_header() -> String {
    line(&[SUMMARY], None)
}

/// One row of the summary table.
pub fn summary_row(p: &Point) -> String {
    line(&[SUMMARY], Some(p))
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
    fn tables_keep_their_columns() {
        let t = Timings { iters: 1, bytes: 4096, elapsed: Duration::from_micros(10), ..Default::default() };
        let p = t.point("p2p", "LOCAL", "WRITE", None, 4096, 1, 1, false);
        let (head, row) = (table_header(false), table_row(&p));
        assert!(head.starts_with("backend  op     ") && head.ends_with("  done p99"), "{head}");
        assert_eq!(head.len(), row.len(), "{head}\n{row}");
        assert!(row.starts_with("LOCAL    WRITE  ") && row.contains(" 4K ") && row.contains("0.410"), "{row}");
        let s = t.point("storage", "POSIX", "READ", Some("uring".into()), 4096, 4, 1, true);
        assert!(table_header(true).ends_with("      IOPS   engine"));
        assert!(table_row(&s).ends_with("    400000    uring"), "{}", table_row(&s));
        assert_eq!(summary_header().len(), summary_row(&s).len());
        assert!(summary_row(&p).ends_with("         -"));
    }
}
