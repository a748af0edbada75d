//! The window profile: effect by layer for each window width, beside its summation baseline
//! (dashed), drawn with `plotters`' SVG backend. Unlike the heat maps this chart needs no
//! per-element tooltips (the peak table gives the numbers), so a charting library does it.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::escape;
use super::read::Table;

/// One colour per window width, repeating after six.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// The profile of one window target (at one position label) in a variant for a metric; `None`
/// when the target has no windows.
pub fn window_profile(
    table: &Table,
    variant: &str,
    target: &str,
    position: Option<&str>,
    metric: usize,
) -> Result<Option<String>> {
    let rows: Vec<_> = table
        .rows_of(variant, target)
        .filter(|r| r.window.is_some() && r.position_label.as_deref() == position)
        .filter_map(|r| Some((r.window?, r.summation, r.layer? as f64, r.cells[metric].shown())))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let mut windows: Vec<usize> = rows.iter().map(|r| r.0).collect();
    windows.sort();
    windows.dedup();
    let max_layer = rows.iter().map(|r| r.2).fold(0.0, f64::max).max(1.0);
    let (lo, hi) = rows.iter().fold((0.0f64, 0.0f64), |(lo, hi), r| (lo.min(r.3), hi.max(r.3)));
    let pad = ((hi - lo) * 0.08).max(1e-6);
    let title = escape::visible(&format!(
        "{variant} · {target}{} · {}: windows vs summation baseline",
        position.map(|p| format!(" @ {p}")).unwrap_or_default(),
        table.metrics[metric]
    ));

    let mut svg = String::new();
    {
        let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw the window profile: {e}");
        let root = SVGBackend::with_string(&mut svg, (760, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_layer, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("layer (window centre)")
            .y_desc(escape::visible(&table.metrics[metric]))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(RGBColor(242, 242, 242))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, &w) in windows.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let series = |summation: bool| {
                let mut points: Vec<(f64, f64)> =
                    rows.iter().filter(|r| r.0 == w && r.1 == summation).map(|r| (r.2, r.3)).collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                points
            };
            chart
                .draw_series(LineSeries::new(series(false), colour.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("w{w}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            let baseline = series(true);
            if !baseline.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(baseline, 5, 4, colour.stroke_width(1)))
                    .map_err(|e| err(&e))?
                    .label(format!("w{w} summation"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(1)));
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(Some(svg))
}
