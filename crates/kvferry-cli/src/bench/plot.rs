//! `--plot`: bandwidth and latency against block size, drawn with
//! `plotters` into an SVG or a PNG (chosen by the file's extension).
//!
//! Two panels share the x axis, block size on a log scale labelled like the
//! table (`4K`, `64K`, `1M`): GB/s above, average latency in µs (log scale)
//! below; one line per backend, operation and batch size, with a legend.
//! Text is set in DejaVu Sans Mono, embedded in the binary
//! (`assets/DejaVuSansMono.ttf`, Bitstream Vera license), so PNGs render
//! the same on a machine without fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use kvferry::{Error, Result};

use super::report::{size_str, Point};

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 760);

/// One line of the chart.
struct Series {
    name: String,
    /// `(log2 block size, GB/s, average latency µs)`.
    xy: Vec<(f64, f64, f64)>,
}

fn series(points: &[Point]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for p in points {
        let name = format!("{} {} x{}", p.backend, p.op, p.batch_size);
        let xy = ((p.block_size.max(1) as f64).log2(), p.gbps, p.lat_us_avg);
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => s.xy.push(xy),
            None => out.push(Series { name, xy: vec![xy] }),
        }
    }
    for s in &mut out {
        s.xy.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Writes the chart of `points` to `path` (`.svg` or `.png`).
pub fn write(path: &Path, points: &[Point], title: &str) -> Result<()> {
    if points.is_empty() {
        return Err(Error::invalid("--plot: no points were measured, so there is nothing to draw"));
    }
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    static FONT_OK: OnceLock<bool> = OnceLock::new();
    if !*FONT_OK.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        return Err(Error::internal("--plot: the embedded font does not load"));
    }
    let s = series(points);
    let failed = |e: String| Error::invalid(format!("--plot {}: {e}", path.display()));
    match ext.as_deref() {
        Some("svg") => draw(SVGBackend::new(path, SIZE).into_drawing_area(), &s, title).map_err(failed),
        Some("png") => draw(BitMapBackend::new(path, SIZE).into_drawing_area(), &s, title).map_err(failed),
        _ => Err(Error::invalid(format!(
            "--plot {}: the file name must end in .svg or .png (the format is chosen by it)",
            path.display()
        ))),
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    s: &[Series],
    title: &str,
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, (FAMILY, 24)).map_err(e)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2 - 20);
    let mut keys: Vec<f64> = s.iter().flat_map(|s| s.xy.iter().map(|p| p.0)).collect();
    keys.sort_by(f64::total_cmp);
    keys.dedup();
    let (lo, hi) = (keys[0], keys[keys.len() - 1]);
    let (lo, hi) = if hi > lo { (lo - 0.3, hi + 0.3) } else { (lo - 1.0, hi + 1.0) };
    // Labels at whole powers of two only (the axis is log2 of the block size).
    let label = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
            size_str(2f64.powf(x.round()) as u64)
        } else {
            String::new()
        }
    };
    let ticks = ((hi - lo).ceil() as usize + 1).min(40);

    let gmax = s.iter().flat_map(|s| s.xy.iter().map(|p| p.1)).fold(0.0, f64::max).max(1e-3) * 1.15;
    let mut bw = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..hi, 0.0..gmax)
        .map_err(e)?;
    bw.configure_mesh()
        .x_desc("block size")
        .y_desc("bandwidth, GB/s")
        .x_labels(ticks)
        .x_label_formatter(&label)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(e)?;
    lines(&mut bw, s, |p| p.1).map_err(e)?;

    let lats = s.iter().flat_map(|s| s.xy.iter().map(|p| p.2)).filter(|v| *v > 0.0);
    let (lmin, lmax) = lats.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lmin, lmax) = if lmax > 0.0 { (lmin / 1.5, lmax * 1.5) } else { (0.1, 10.0) };
    let mut lat = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..hi, (lmin..lmax).log_scale())
        .map_err(e)?;
    lat.configure_mesh()
        .x_desc("block size")
        .y_desc("average latency, µs")
        .x_label_formatter(&label)
        .y_label_formatter(&|v| {
            if *v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
            }
        })
        .label_style((FAMILY, 14))
        .draw()
        .map_err(e)?;
    lines(&mut lat, s, |p| p.2.max(lmin)).map_err(e)?;
    root.present().map_err(e)
}

/// Draws every series on `chart` (y from `y`) with markers and a legend.
fn lines<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    s: &[Series],
    y: impl Fn(&(f64, f64, f64)) -> f64,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, ser) in s.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = ser.xy.iter().map(|p| (p.0, y(p))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(ser.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points() -> Vec<Point> {
        let mut v = Vec::new();
        for (be, op) in [("TCP", "WRITE"), ("SHM", "READ")] {
            for (i, bs) in [4096u64, 65536, 1 << 20, 16 << 20].into_iter().enumerate() {
                let mut p = super::super::report::Timings::default().point("p2p", be, op, None, bs, 1, 1, false);
                p.gbps = 0.5 + i as f64 * (if be == "TCP" { 1.0 } else { 2.5 });
                p.lat_us_avg = bs as f64 / (p.gbps * 1e3);
                v.push(p);
            }
        }
        v
    }

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kvferry-plot-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn renders_png_and_svg() {
        let d = dir();
        let png = d.join("c.png");
        write(&png, &points(), "kvferry bench p2p").unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
        let (w, h) = (
            u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
            u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
        );
        assert_eq!((w, h), SIZE);
        let svg = d.join("c.svg");
        write(&svg, &points(), "kvferry <bench>").unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        for want in [
            "<svg",
            "TCP WRITE x1",
            "SHM READ x1",
            "bandwidth, GB/s",
            "average latency, µs",
            "64K",
            "16M",
            "&lt;bench&gt;",
        ] {
            assert!(text.contains(want), "the SVG lacks {want}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_other_formats_and_empty_runs() {
        let e = write(Path::new("/tmp/x.jpg"), &points(), "t").unwrap_err();
        assert!(e.to_string().contains(".svg or .png"), "{e}");
        let e = write(Path::new("/tmp/x.png"), &[], "t").unwrap_err();
        assert!(e.to_string().contains("nothing to draw"), "{e}");
    }
}
