//! Heat maps as SVG: layers across, and down whatever else the target varies (heads,
//! positions, windows); one cell per CSV row, coloured on a diverging scale centred on 0.
//!
//! Written by hand rather than with `plotters`: every cell carries its value in a `<title>`
//! tooltip (and `data-` attributes for tests and scripts), which plotters' SVG backend cannot
//! attach to the rectangles it draws. The grid is simple enough that the remaining work (axes,
//! ticks, a gradient legend) is a page of code.

use std::fmt::Write as _;

use super::escape::{self, xml};

/// The colour scale: `t = value / limit` clamped to [-1, 1] interpolates linearly (per sRGB
/// channel, rounded) from [`MID`] at 0 to [`POSITIVE`] at 1 or [`NEGATIVE`] at -1.
pub const NEGATIVE: [u8; 3] = [33, 102, 172];
pub const MID: [u8; 3] = [247, 247, 247];
pub const POSITIVE: [u8; 3] = [178, 24, 43];
/// The fill of a grid cell no row fills.
pub const EMPTY: &str = "#d9d9d9";

/// A cell colour as `#rrggbb`.
pub fn colour(value: f64, limit: f64) -> String {
    let t = (value / limit).clamp(-1.0, 1.0);
    let end = if t < 0.0 { NEGATIVE } else { POSITIVE };
    let c: Vec<u8> =
        (0..3).map(|i| (MID[i] as f64 + (end[i] as f64 - MID[i] as f64) * t.abs()).round() as u8).collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// A heat map's content, before layout.
#[derive(Debug, Clone)]
pub struct Grid {
    pub title: String,
    pub x_title: String,
    pub y_title: String,
    pub x_ticks: Vec<String>,
    /// Row labels; the long form goes in the label's tooltip.
    pub y_ticks: Vec<Tick>,
    pub cells: Vec<GridCell>,
    /// The colour scale's limit; `None`: the largest |value| (1 when every value is 0).
    pub limit: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Tick {
    pub label: String,
    pub tip: String,
}

#[derive(Debug, Clone)]
pub struct GridCell {
    pub x: usize,
    pub y: usize,
    pub value: f64,
    /// The component's name, for the tooltip and `data-component`.
    pub name: String,
}

/// Labels longer than this are cut (with `…`); the full text is in the tooltip.
const MAX_LABEL: usize = 28;
/// Rough width of one character of the 11px labels, for the layout.
const CHAR_W: f64 = 6.6;

fn cut(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL {
        label.to_string()
    } else {
        label.chars().take(MAX_LABEL - 1).collect::<String>() + "…"
    }
}

/// The value as the tooltip and legend write it.
pub fn show(value: f64) -> String {
    format!("{value:.4}")
}

/// The heat map as a standalone `<svg>` element; `id` makes its gradient id unique on a page
/// that inlines many maps.
pub fn svg(grid: &Grid, id: &str) -> String {
    let largest = grid.cells.iter().map(|c| c.value.abs()).fold(0.0, f64::max);
    let limit = grid.limit.unwrap_or(if largest > 0.0 { largest } else { 1.0 });
    let (nx, ny) = (grid.x_ticks.len().max(1), grid.y_ticks.len().max(1));
    let cw = (720.0 / nx as f64).clamp(12.0, 40.0).floor();
    let ch = 18.0;
    let longest_y = grid.y_ticks.iter().map(|t| cut(&escape::visible(&t.label)).chars().count()).max().unwrap_or(1);
    let left = 30.0 + longest_y as f64 * CHAR_W + 8.0;
    let top = 44.0;
    let (gw, gh) = (cw * nx as f64, ch * ny as f64);
    let legend_x = left + gw + 24.0;
    let legend_h = gh.clamp(80.0, 220.0);
    // Wide enough for the legend's labels and the (bold, larger) title.
    let title_w = left + escape::visible(&grid.title).chars().count() as f64 * CHAR_W * 1.25 + 10.0;
    let width = (legend_x + 16.0 + 70.0).max(title_w).ceil();
    let height = top + gh.max(legend_h) + 48.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<title>{}</title>"#, xml(&grid.title));
    let _ = write!(
        s,
        r#"<text class="title" x="{left}" y="18" font-size="13" font-weight="bold">{}</text>"#,
        xml(&grid.title)
    );
    // The gradient runs top (+limit) to bottom (-limit) through MID at 0, as `colour` does.
    let gradient = format!("scale-{id}");
    let hex = |c: [u8; 3]| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
    let _ = write!(
        s,
        r#"<defs><linearGradient id="{gradient}" x1="0" y1="0" x2="0" y2="1"><stop offset="0" stop-color="{}"/><stop offset="0.5" stop-color="{}"/><stop offset="1" stop-color="{}"/></linearGradient></defs>"#,
        hex(POSITIVE),
        hex(MID),
        hex(NEGATIVE)
    );
    for c in &grid.cells {
        let (x, y) = (left + cw * c.x as f64, top + ch * c.y as f64);
        let _ = write!(
            s,
            r#"<rect class="cell" x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{}" data-component="{}" data-value="{}"><title>{}: {}</title></rect>"#,
            colour(c.value, limit),
            xml(&c.name),
            c.value,
            xml(&c.name),
            show(c.value)
        );
    }
    let filled: std::collections::HashSet<(usize, usize)> = grid.cells.iter().map(|c| (c.x, c.y)).collect();
    for y in 0..grid.y_ticks.len() {
        for x in (0..grid.x_ticks.len()).filter(|&x| !filled.contains(&(x, y))) {
            let _ = write!(
                s,
                r#"<rect class="empty" x="{}" y="{}" width="{cw}" height="{ch}" fill="{EMPTY}"><title>not patched</title></rect>"#,
                left + cw * x as f64,
                top + ch * y as f64
            );
        }
    }
    // x ticks: every one when they fit, else every k-th.
    let longest_x = grid.x_ticks.iter().map(|t| t.chars().count()).max().unwrap_or(1) as f64 * CHAR_W;
    let every = ((longest_x + 4.0) / cw).ceil().max(1.0) as usize;
    for (i, tick) in grid.x_ticks.iter().enumerate().filter(|(i, _)| i % every == 0) {
        let x = left + cw * (i as f64 + 0.5);
        let _ = write!(
            s,
            r#"<text class="xtick" x="{x}" y="{}" text-anchor="middle">{}</text>"#,
            top + gh + 14.0,
            xml(tick)
        );
    }
    for (i, tick) in grid.y_ticks.iter().enumerate() {
        let y = top + ch * (i as f64 + 0.5) + 4.0;
        let _ = write!(
            s,
            r#"<text class="ytick" x="{}" y="{y}" text-anchor="end">{}<title>{}</title></text>"#,
            left - 6.0,
            xml(&cut(&escape::visible(&tick.label))),
            xml(&tick.tip)
        );
    }
    let _ = write!(
        s,
        r#"<text class="xtitle" x="{}" y="{}" text-anchor="middle" font-size="12">{}</text>"#,
        left + gw / 2.0,
        top + gh + 34.0,
        xml(&grid.x_title)
    );
    let _ = write!(
        s,
        r#"<text class="ytitle" transform="translate(14 {}) rotate(-90)" text-anchor="middle" font-size="12">{}</text>"#,
        top + gh / 2.0,
        xml(&grid.y_title)
    );
    // The legend: the gradient bar with +limit, 0 and -limit marked.
    let _ = write!(
        s,
        r##"<g class="legend"><rect x="{legend_x}" y="{top}" width="14" height="{legend_h}" fill="url(#{gradient})" stroke="#888" stroke-width="0.5"/>"##
    );
    for (frac, v) in [(0.0, limit), (0.5, 0.0), (1.0, -limit)] {
        let y = top + legend_h * frac;
        let _ = write!(
            s,
            r##"<line x1="{legend_x}" x2="{}" y1="{y}" y2="{y}" stroke="#333"/><text class="legend-tick" x="{}" y="{}">{}</text>"##,
            legend_x + 18.0,
            legend_x + 20.0,
            y + 4.0,
            show(v)
        );
    }
    s.push_str("</g></svg>");
    s
}
