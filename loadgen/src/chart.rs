//! Line charts as plain inline SVG for the HTML report: axes with their
//! units, round-number ticks with gridlines, the run's phases as labelled
//! bands, a legend. No script and nothing fetched: the report stays one
//! self-contained file.

use std::fmt::Write as _;

/// One line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// SVG colour.
    pub color: &'static str,
    /// `(x, y)` in the axes' units, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// A phase of the run: from `start` to `end` on the x axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    /// Label drawn along the band.
    pub name: String,
    /// Where it begins (x units).
    pub start: f64,
    /// Where it ends (x units).
    pub end: f64,
}

/// A chart: title, axis labels (with units), lines, phases.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    /// Heading above the chart.
    pub title: &'a str,
    /// The x axis, with its unit: "time since start (s)".
    pub x_label: &'a str,
    /// The y axis, with its unit: "latency (ms)".
    pub y_label: &'a str,
    /// The lines.
    pub series: Vec<Series>,
    /// Phases shaded behind the lines.
    pub bands: &'a [Band],
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 300.0;
/// Plot area inside the SVG (room for tick labels, axis labels, legend).
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;
/// Alternating shades of the phase bands.
const BAND_FILLS: [&str; 2] = ["#e8f0fe", "#fef3e0"];

/// Round tick values from 0 to at least `max`: 1, 2 or 5 times a power of
/// ten apart, about five of them.
pub fn ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let n = (max / step).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// A tick label: no decimals unless the step needs them.
fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 || v == 0.0 {
        let v = v.round() as i64;
        if v.abs() >= 10_000 { format!("{}k", v / 1000) } else { v.to_string() }
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{v:.decimals$}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Chart<'_> {
    /// The chart as an `<h2>` and an `<svg>`.
    pub fn svg(&self) -> String {
        let x_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .chain(self.bands.iter().map(|b| b.end))
            .fold(0.0_f64, f64::max);
        let y_max = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0_f64, f64::max);
        let (xt, yt) = (ticks(x_max), ticks(y_max));
        let x_top = *xt.last().expect("ticks");
        let y_top = *yt.last().expect("ticks");
        let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let px = |x: f64| LEFT + x / x_top * pw;
        let py = |y: f64| TOP + ph - y / y_top * ph;
        let mut s = format!(
            "<h2>{}</h2><svg class=chart xmlns='http://www.w3.org/2000/svg' width={WIDTH} height={HEIGHT} font-size=11>",
            escape(self.title)
        );
        // Phases: shaded bands, a line where each begins, its name along it.
        for (i, b) in self.bands.iter().enumerate() {
            let (x0, x1) = (px(b.start.max(0.0)), px(b.end.min(x_top)));
            let _ = write!(
                s,
                "<g class=phase><rect x={x0:.1} y={TOP} width={:.1} height={ph} fill='{}'/>\
                 <line x1={x0:.1} y1={TOP} x2={x0:.1} y2={:.1} stroke='#888' stroke-dasharray='4 3'/>\
                 <text transform='translate({:.1},{:.1}) rotate(-90)' text-anchor=end fill='#555'>{}</text></g>",
                (x1 - x0).max(0.0),
                BAND_FILLS[i % 2],
                TOP + ph,
                x0 + 11.0,
                TOP + 4.0,
                escape(&b.name)
            );
        }
        // Gridlines and tick labels.
        let step = |t: &[f64]| if t.len() > 1 { t[1] - t[0] } else { 1.0 };
        for v in &yt {
            let y = py(*v);
            let _ = write!(
                s,
                "<line class=grid x1={LEFT} y1={y:.1} x2={:.1} y2={y:.1} stroke='#ddd'/><text x={:.1} y={:.1} text-anchor=end>{}</text>",
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                tick_label(*v, step(&yt))
            );
        }
        for v in &xt {
            let x = px(*v);
            let _ = write!(
                s,
                "<line class=grid x1={x:.1} y1={TOP} x2={x:.1} y2={:.1} stroke='#ddd'/><text x={x:.1} y={:.1} text-anchor=middle>{}</text>",
                TOP + ph,
                TOP + ph + 15.0,
                tick_label(*v, step(&xt))
            );
        }
        // Axes and their labels.
        let _ = write!(
            s,
            "<line class=axis x1={LEFT} y1={TOP} x2={LEFT} y2={b:.1} stroke='#333'/><line class=axis x1={LEFT} y1={b:.1} x2={:.1} y2={b:.1} stroke='#333'/>\
             <text class=x-label x={:.1} y={:.1} text-anchor=middle font-size=12>{}</text>\
             <text class=y-label transform='translate(16,{:.1}) rotate(-90)' text-anchor=middle font-size=12>{}</text>",
            LEFT + pw,
            LEFT + pw / 2.0,
            HEIGHT - 10.0,
            escape(self.x_label),
            TOP + ph / 2.0,
            escape(self.y_label),
            b = TOP + ph,
        );
        // The lines, then the legend above the plot's right end.
        for (i, line) in self.series.iter().enumerate() {
            let pts: Vec<String> =
                line.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            let _ = write!(
                s,
                "<polyline fill=none stroke='{}' stroke-width=2 points='{}'/>\
                 <rect x={:.1} y=8 width=12 height=4 fill='{}'/><text x={:.1} y=14>{}</text>",
                line.color,
                pts.join(" "),
                LEFT + pw - 110.0 * (self.series.len() - i) as f64,
                line.color,
                LEFT + pw - 110.0 * (self.series.len() - i) as f64 + 16.0,
                escape(&line.name)
            );
        }
        s.push_str("</svg>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(ticks(9.0), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(1_234.0), [0.0, 500.0, 1_000.0, 1_500.0]);
        let nothing = ticks(0.0);
        assert_eq!(nothing.len(), 6, "{nothing:?}");
        assert!((nothing[1] - 0.2).abs() < 1e-12 && (nothing[5] - 1.0).abs() < 1e-12, "{nothing:?}");
        assert_eq!(ticks(f64::NAN), ticks(1.0));
        let t = ticks(0.37);
        assert!((t[1] - 0.1).abs() < 1e-12 && *t.last().unwrap() >= 0.37, "{t:?}");
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(tick_label(150_000.0, 50_000.0), "150k");
    }

    fn chart(bands: &[Band]) -> String {
        Chart {
            title: "publish → deliver latency over time",
            x_label: "time since start (s)",
            y_label: "latency (ms)",
            series: vec![
                Series { name: "p50".into(), color: "#2a6", points: vec![(5.0, 12.0), (10.0, 40.0)] },
                Series { name: "p99".into(), color: "#c33", points: vec![(5.0, 90.0), (10.0, 430.0)] },
            ],
            bands,
        }
        .svg()
    }

    #[test]
    fn axes_carry_their_units_gridlines_ticks_and_a_legend() {
        let svg = chart(&[]);
        assert!(svg.starts_with("<h2>publish → deliver latency over time</h2><svg"), "{svg}");
        assert!(svg.contains("class=x-label") && svg.contains(">time since start (s)</text>"), "{svg}");
        assert!(svg.contains("class=y-label") && svg.contains(">latency (ms)</text>"), "{svg}");
        assert_eq!(svg.matches("class=axis").count(), 2);
        // y: 0..500 by 100, x: 0..10 by 2: a gridline and a label each.
        assert_eq!(svg.matches("class=grid").count(), 6 + 6, "{svg}");
        for label in [">0<", ">100<", ">500<", ">10<"] {
            assert!(svg.contains(label), "{label}: {svg}");
        }
        assert!(svg.contains(">p50</text>") && svg.contains(">p99</text>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // The p99 line ends at x 10 of 10, y 430 of 500: the plot's right
        // edge, 86 % of its height up.
        let y = TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - 430.0 / 500.0);
        assert!(svg.contains(&format!("{:.1},{y:.1}'", WIDTH - RIGHT)), "{svg}");
        assert!(!svg.contains("class=phase"));
        assert!(!svg.contains("<script"));
    }

    #[test]
    fn every_phase_is_a_labelled_band_with_a_start_line() {
        let bands = [
            Band { name: "storm".into(), start: 0.0, end: 4.0 },
            Band { name: "ramp 6/s".into(), start: 4.0, end: 7.0 },
            Band { name: "steady fan-out <14/s>".into(), start: 7.0, end: 12.0 },
            Band { name: "settle".into(), start: 12.0, end: 13.0 },
        ];
        let svg = chart(&bands);
        assert_eq!(svg.matches("<g class=phase>").count(), 4, "{svg}");
        for label in
            [">storm</text>", ">ramp 6/s</text>", ">steady fan-out &lt;14/s&gt;</text>", ">settle</text>"]
        {
            assert!(svg.contains(label), "{label}: {svg}");
        }
        // The x axis reaches the last phase's end: 0..15 by 5.
        assert!(svg.contains(">15</text>"), "{svg}");
        assert_eq!(svg.matches("stroke-dasharray").count(), 4);
        // Bands alternate their shade.
        assert!(svg.contains(BAND_FILLS[0]) && svg.contains(BAND_FILLS[1]));
    }
}
