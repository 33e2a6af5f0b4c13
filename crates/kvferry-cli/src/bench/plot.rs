//! `--plot PATH`: a chart of bandwidth and average latency against block
//! size, one line per series (backend, operation, storage pattern, batch
//! size, engine, threads), drawn with plotters as SVG or PNG, chosen by the extension.
//!
//! Text in PNGs is drawn with Noto Sans, built into the binary (the
//! `ttf-noto-sans` crate), so no system font or fontconfig is needed. SVGs
//! name the `sans-serif` family and leave the text to the viewer.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::sync::OnceLock;

use kvferry::{Error, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{size_str, Point};

/// Chart size in pixels (SVG user units).
const SIZE: (u32, u32) = (1280, 900);
/// Narrowest legend column on the right; it widens to fit the names.
const LEGEND_MIN_W: u32 = 220;
/// The font family name the text asks for (registered for PNGs).
const FONT: &str = "sans-serif";
/// Line colours, one per series in turn (the "tab10" palette).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The file formats `--plot` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Scalable vector graphics (`.svg`).
    Svg,
    /// A PNG picture (`.png`).
    Png,
}

impl Format {
    /// The format named by `path`'s extension, `.svg` or `.png` (any case).
    pub fn of(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(Error::invalid(format!(
                "--plot {}: the chart's format is told by the file name's extension; name a .svg or a .png file",
                path.display()
            ))),
        }
    }
}

/// Checks a `--plot` path before a run, so that a bad name fails at once
/// rather than after the benchmark.
pub fn check(path: Option<&Path>) -> Result<()> {
    path.map_or(Ok(()), |p| Format::of(p).map(|_| ()))
}

/// One measured point of a series, in the table's units.
#[derive(Clone, Copy, Debug)]
struct Sample {
    block: f64,
    gbps: f64,
    lat_us: f64,
}

/// One line of the chart.
#[derive(Debug)]
struct Series {
    name: String,
    samples: Vec<Sample>,
}

/// The name of `p`'s series: what tells its points from other lines.
fn series_name(p: &Point) -> String {
    let mut name = format!("{} {}", p.backend, p.op);
    if let Some(pat) = &p.pattern {
        name.push_str(&format!(" {pat}"));
    }
    if p.batch_size != 1 {
        name.push_str(&format!(", batch {}", p.batch_size));
    }
    if let Some(e) = &p.engine {
        name.push_str(&format!(", {e}"));
    }
    if p.threads > 1 {
        name.push_str(&format!(", {} threads", p.threads));
    }
    name
}

/// Groups points into series, in the order they first appear, each sorted
/// by block size.
fn series(points: &[Point]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for p in points {
        let name = series_name(p);
        let s = Sample { block: p.block_size as f64, gbps: p.gbps, lat_us: p.lat_us_avg };
        match out.iter_mut().find(|s| s.name == name) {
            Some(series) => series.samples.push(s),
            None => out.push(Series { name, samples: vec![s] }),
        }
    }
    for s in &mut out {
        s.samples.sort_by(|a, b| a.block.total_cmp(&b.block));
    }
    out
}

/// Writes the chart of `points` to `path`, as SVG or PNG by its extension.
pub fn write(path: &Path, points: &[Point], title: &str) -> Result<()> {
    let format = Format::of(path)?;
    if points.is_empty() {
        return Err(Error::invalid(format!(
            "--plot {}: the run measured no points, so there is no chart to draw; give block sizes to measure",
            path.display()
        )));
    }
    register_font()?;
    let s = series(points);
    let bytes = match format {
        Format::Svg => {
            let mut svg = String::new();
            draw(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(), title, &s)?;
            svg.into_bytes()
        }
        Format::Png => {
            let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
            draw(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(), title, &s)?;
            encode_png(&rgb)?
        }
    };
    let what = || format!("writing the chart to {}", path.display());
    let mut f = File::create(path).map_err(|e| Error::io(what(), e))?;
    f.write_all(&bytes).map_err(|e| Error::io(what(), e))
}

/// Registers the built-in font under [`FONT`], once.
fn register_font() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok =
        *OK.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::internal("the chart's built-in font (Noto Sans) did not load; this build is broken"))
    }
}

/// An RGB buffer of [`SIZE`] as PNG bytes.
fn encode_png(rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(BufWriter::new(&mut out), SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let fail = |e: png::EncodingError| Error::internal(format!("encoding the chart as PNG failed: {e}"));
    let mut w = enc.write_header().map_err(fail)?;
    w.write_image_data(rgb).map_err(fail)?;
    w.finish().map_err(fail)?;
    Ok(out)
}

/// A drawing error as the CLI's error.
fn drawing<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::internal(format!("drawing the chart failed: {e}"))
}

/// Draws the whole chart on `root`: title, the two panels, the legend.
fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, s: &[Series]) -> Result<()> {
    root.fill(&WHITE).map_err(drawing)?;
    let root = root.titled(title, (FONT, 34)).map_err(drawing)?;
    let (w, h) = root.dim_in_pixel();
    let names = s.iter().map(|s| root.estimate_text_size(&s.name, &legend_style()).map_or(0, |(w, _)| w));
    let legend_w = names.max().unwrap_or(0).saturating_add(100).clamp(LEGEND_MIN_W, w / 2);
    let (charts, legend) = root.split_horizontally(w.saturating_sub(legend_w));
    let (top, bottom) = charts.split_vertically(h / 2);
    let all = || s.iter().flat_map(|s| s.samples.iter());
    let bw_max = all().map(|p| p.gbps).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-3) * 1.15;
    let lat = all().map(|p| p.lat_us).filter(|v| v.is_finite() && *v > 0.0);
    let (lat_lo, lat_hi) = lat.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lat_lo, lat_hi) = if lat_hi > 0.0 { (lat_lo, lat_hi) } else { (1.0, 1.0) };
    let y_bw = plotters::coord::types::RangedCoordf64::from(0.0..bw_max);
    panel(&top, "bandwidth", "bandwidth (GB/s)", y_bw, s, |p| p.gbps).map_err(drawing)?;
    let y_lat = decades(lat_lo, lat_hi);
    panel(&bottom, "average latency (log scale)", "average latency (µs)", y_lat, s, |p| p.lat_us).map_err(drawing)?;
    draw_legend(&legend, s).map_err(drawing)?;
    root.present().map_err(drawing)
}

/// The block-size axis: log scale, ticks at powers of two labelled like the
/// table (4K, 64K, 1M).
fn x_axis(s: &[Series]) -> impl Ranged<ValueType = f64> + ValueFormatter<f64> {
    let blocks = || s.iter().flat_map(|s| s.samples.iter()).map(|p| p.block.max(1.0));
    let lo = blocks().fold(f64::INFINITY, f64::min);
    let hi = blocks().fold(1.0, f64::max);
    let (e_lo, e_hi) = (lo.log2().floor() as i32, hi.log2().ceil() as i32);
    // At most about a dozen labels: every 2nd, 4th ... power of two.
    let step = ((e_hi - e_lo) / 12 + 1) as usize;
    let ticks: Vec<f64> = (e_lo..=e_hi).step_by(step).map(|e| 2f64.powi(e)).collect();
    (lo / 1.5..hi * 1.5).log_scale().with_key_points(ticks)
}

/// A log axis from the decade below `lo` to the decade above `hi`, ticks on
/// each decade (and at 2 and 5 times it when there are few decades).
fn decades(lo: f64, hi: f64) -> impl Ranged<ValueType = f64> + ValueFormatter<f64> {
    let (e_lo, e_hi) = ((lo / 1.25).log10().floor() as i32, (hi * 1.25).log10().ceil() as i32);
    let e_hi = e_hi.max(e_lo + 1);
    let steps: &[f64] = if e_hi - e_lo < 3 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    let mut ticks: Vec<f64> = (e_lo..e_hi).flat_map(|e| steps.iter().map(move |m| m * 10f64.powi(e))).collect();
    ticks.push(10f64.powi(e_hi));
    (10f64.powi(e_lo)..10f64.powi(e_hi)).log_scale().with_key_points(ticks)
}

/// Draws one panel: `value` of every series against block size.
fn panel<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    y: Y,
    s: &[Series],
    value: fn(&Sample) -> f64,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 25))
        .margin(14)
        .x_label_area_size(60)
        .y_label_area_size(96)
        .build_cartesian_2d(x_axis(s), y)?;
    chart
        .configure_mesh()
        .x_desc("block size")
        .y_desc(y_desc)
        .x_label_formatter(&|b| size_str(b.round() as u64))
        .y_label_formatter(&|v| number(*v))
        .label_style((FONT, 19))
        .axis_desc_style((FONT, 21))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    for (i, series) in s.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = series
            .samples
            .iter()
            .map(|p| (p.block.max(1.0), value(p)))
            .filter(|(_, v)| v.is_finite() && *v > 0.0)
            .collect();
        chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        // Past ten series the colours come round again, with another marker.
        match marker(i) {
            Marker::Circle => chart.draw_series(pts.iter().map(|&xy| Circle::new(xy, 4, color.filled())))?,
            Marker::Triangle => chart.draw_series(pts.iter().map(|&xy| TriangleMarker::new(xy, 6, color.filled())))?,
            Marker::Cross => chart.draw_series(pts.iter().map(|&xy| Cross::new(xy, 5, color.stroke_width(2))))?,
        };
    }
    Ok(())
}

/// The legend column: a coloured line and marker, then the series' name.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &[Series],
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let left = Pos::new(HPos::Left, VPos::Center);
    let head = TextStyle::from((FONT, 23).into_font()).color(&BLACK).pos(left);
    area.draw(&Text::new("series", (12, 60), head))?;
    for (i, series) in s.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let y = 92 + 28 * i as i32;
        area.draw(&PathElement::new(vec![(12, y), (44, y)], color.stroke_width(2)))?;
        match marker(i) {
            Marker::Circle => area.draw(&Circle::new((28, y), 4, color.filled()))?,
            Marker::Triangle => area.draw(&TriangleMarker::new((28, y), 6, color.filled()))?,
            Marker::Cross => area.draw(&Cross::new((28, y), 5, color.stroke_width(2)))?,
        }
        area.draw(&Text::new(series.name.clone(), (54, y), legend_style()))?;
    }
    Ok(())
}

/// The legend's text.
fn legend_style() -> TextStyle<'static> {
    TextStyle::from((FONT, 19).into_font()).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center))
}

/// The marker of a series' points.
enum Marker {
    Circle,
    Triangle,
    Cross,
}

/// Series `i`'s marker: circles for the first ten, then triangles, crosses.
fn marker(i: usize) -> Marker {
    match i / COLORS.len() % 3 {
        0 => Marker::Circle,
        1 => Marker::Triangle,
        _ => Marker::Cross,
    }
}

/// An axis number: as many decimals as it needs, at most three.
fn number(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Timings;
    use std::time::Duration;

    fn points() -> Vec<Point> {
        let mut v = Vec::new();
        for (backend, op) in [("SHM", "WRITE"), ("TCP", "READ")] {
            for (i, block) in [4u64 << 10, 64 << 10, 1 << 20].into_iter().enumerate() {
                let t = Timings {
                    iters: 10,
                    bytes: 10 * block,
                    elapsed: Duration::from_micros(100 * (i as u64 + 1)),
                    ..Default::default()
                };
                v.push(t.point("p2p", backend, op, None, block, 1, 1, false));
            }
        }
        v
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kvferry-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn svg_has_series_and_axes() {
        let path = temp("chart.svg");
        write(&path, &points(), "a <test>").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        for want in
            ["SHM WRITE", "TCP READ", "bandwidth (GB/s)", "average latency (µs)", "block size", "\n4K\n", "\n1M\n"]
        {
            assert!(svg.contains(want), "no {want:?} in the SVG");
        }
        assert!(svg.contains("a &lt;test&gt;"));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn png_decodes_at_its_size() {
        let path = temp("chart.png");
        write(&path, &points(), "kvferry bench p2p").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let info = reader.info().clone();
        assert_eq!((info.width, info.height), SIZE);
        let mut pixels = vec![0u8; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        let channels = frame.color_type.samples();
        let drawn =
            pixels[..frame.buffer_size()].chunks(channels).filter(|p| p.iter().take(3).any(|&c| c < 200)).count();
        let total = (info.width * info.height) as usize;
        assert!(drawn * 100 > total, "lines, axes and text cover more than 1% of the picture: {drawn} of {total}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn bad_names_and_empty_runs_are_told() {
        let e = write(Path::new("chart.jpg"), &points(), "t").unwrap_err();
        assert!(e.message().contains(".svg") && e.message().contains(".png"), "{}", e.message());
        assert!(check(Some(Path::new("chart"))).is_err());
        assert!(check(Some(Path::new("x/Chart.PNG"))).is_ok() && check(None).is_ok());
        let path = temp("empty.svg");
        let e = write(&path, &[], "t").unwrap_err();
        assert!(e.message().contains("no points"), "{}", e.message());
        assert!(!path.exists());
    }

    #[test]
    fn series_names_and_numbers() {
        let t = Timings { iters: 1, bytes: 4096, elapsed: Duration::from_micros(10), ..Default::default() };
        let mut p = t.point("storage", "POSIX", "READ", Some("uring".into()), 4096, 64, 2, true);
        p.pattern = Some("rand".into());
        assert_eq!(series_name(&p), "POSIX READ rand, batch 64, uring, 2 threads");
        assert_eq!(series(&points()).len(), 2);
        assert_eq!((number(2.0), number(0.25), number(12.5)), ("2".into(), "0.25".into(), "12.5".into()));
    }
}
