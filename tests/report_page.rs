//! The report (HTML page and Markdown with SVG files) rendered from small known CSVs: every heat
//! map cell's value and colour against the CSV and the colour scale, the axes' labels, and the
//! comparison tables against numbers computed here, independently and plainly. Also: token text
//! that looks like markup stays text, and bad input is refused with a clear error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use patchbay::report::page::{self, read};

const METRICS: [&str; 2] = ["ld", "p"];
const HEADER: &str = "experiment,variant,dataset,corruption,direction,target,component,hook,layer,head,position,position_label,window,baseline,n_prompts,n_samples,method";

/// One CSV row of the test experiment.
#[derive(Clone, Debug)]
struct R {
    variant: &'static str,
    target: &'static str,
    component: String,
    layer: usize,
    head: Option<usize>,
    position: Option<(usize, &'static str)>,
    window: Option<usize>,
    summation: bool,
    values: [f64; 2],
}

/// The second variant's label holds markup: labels from a CSV are escaped too.
const VARIANTS: [&str; 2] = ["t/a/denoise", "t/<b>&/noise"];

/// Two variants, each with a heads sweep (4 layers x 4 heads, with ties and outliers), a
/// positions sweep (4 layers x 3 positions) and a windows sweep (w = 1, 3 with summation
/// baseline rows for w = 3).
fn rows() -> Vec<R> {
    let mut out = vec![];
    for (vi, variant) in VARIANTS.into_iter().enumerate() {
        for layer in 0..4 {
            for head in 0..4 {
                let base = if vi == 0 {
                    ((layer * 7 + head * 3) % 11) as f64 / 10.0 - 0.5
                } else {
                    ((layer * 5 + head * 2) % 7) as f64 / 10.0 - 0.3
                };
                let ld = match (vi, layer, head) {
                    (_, 3, 2) => 3.0,
                    (0, 1, 0) => -2.5,
                    (1, 2, 1) => 2.2,
                    _ => base,
                };
                out.push(R {
                    variant,
                    target: "heads",
                    component: format!("L{layer}.H{head}"),
                    layer,
                    head: Some(head),
                    position: None,
                    window: None,
                    summation: false,
                    values: [ld, (base * 3.0).round() / 10.0],
                });
            }
        }
        for layer in 0..4 {
            for (i, (index, label)) in [(1, "IO"), (4, "S2"), (6, "end")].into_iter().enumerate() {
                let v = (layer as f64 - 1.5) * (i as f64 + 1.0) / 4.0 + vi as f64 * 0.1;
                out.push(R {
                    variant,
                    target: "resid",
                    component: format!("L{layer}@{label}"),
                    layer,
                    head: None,
                    position: Some((index, label)),
                    window: None,
                    summation: false,
                    values: [v, -v / 2.0],
                });
            }
        }
        for w in [1usize, 3] {
            for layer in 0..5 {
                let v = 1.0 / (1.0 + (layer as f64 - 2.0 - vi as f64).powi(2)) * w as f64 / 2.0;
                let component = format!("L{layer} w{w}");
                let row = R {
                    variant,
                    target: "mlp",
                    component: component.clone(),
                    layer,
                    head: None,
                    position: None,
                    window: Some(w),
                    summation: false,
                    values: [v, v / 3.0],
                };
                out.push(row.clone());
                if w == 3 {
                    out.push(R { summation: true, values: [v * 0.8 - 0.05, v / 4.0], ..row });
                }
            }
        }
    }
    out
}

fn num(x: f64) -> String {
    x.to_string()
}

fn csv_text(rows: &[R]) -> String {
    let mut s = HEADER.to_string();
    for m in METRICS {
        for suffix in ["", "_effect", "_patched", "_clean", "_corrupted", "_sem", "_estimate"] {
            s += &format!(",{m}{suffix}");
        }
    }
    s.push('\n');
    for r in rows {
        let direction = r.variant.rsplit('/').next().unwrap();
        let corruption = r.variant.split('/').nth(1).unwrap();
        let (position, label) = r.position.map_or((String::new(), String::new()), |(i, l)| (i.to_string(), l.into()));
        let fields = [
            "t".to_string(),
            r.variant.to_string(),
            "t".into(),
            corruption.into(),
            direction.into(),
            r.target.into(),
            r.component.clone(),
            format!("blocks.{}.hook", r.layer),
            r.layer.to_string(),
            r.head.map(|h| h.to_string()).unwrap_or_default(),
            position,
            label,
            r.window.map(|w| w.to_string()).unwrap_or_default(),
            if r.summation { "summation".into() } else { String::new() },
            "8".into(),
            "1".into(),
            "exact".into(),
        ];
        let mut line: Vec<String> = fields
            .iter()
            .map(|f| if f.contains([',', '"']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.clone() })
            .collect();
        for v in r.values {
            let patched = if r.summation { String::new() } else { num(v - 0.5) };
            let sem = if r.summation { String::new() } else { "0.01".into() };
            line.extend([num(v), num(v * 2.0), patched, "1.5".into(), "-0.5".into(), sem, String::new()]);
        }
        s += &line.join(",");
        s.push('\n');
    }
    s
}

/// Token text as a vocabulary may have it: markup, an ampersand, quotes and control bytes.
const EVIL: &str = "<script>alert(1)</script>";
fn sidecar_text() -> String {
    let tokens = serde_json::json!([
        {"label": "IO", "index": 1, "token": " John"},
        {"label": "S2", "index": 4, "token": EVIL},
        {"label": "end", "index": 6, "token": "&\"'\u{7}\u{0}\n"},
    ]);
    serde_json::json!({
        "patchbay_version": "0.1.0",
        "model": {"manifest_sha256": "abc123"},
        "positions": {VARIANTS[0]: tokens, VARIANTS[1]: tokens},
        "expectations": [
            {"line": 7, "text": "expect top 1 heads by ld includes L3.H2", "holds": true, "details": ["t/a/denoise: rank 1"]},
            {"line": 8, "text": "expect effect heads L0.H0 by ld > 9", "holds": false, "details": []},
        ],
        "attribution_agreement": [{
            "variant": VARIANTS[0], "estimated": "atp", "exact": "heads", "metric": "ld", "components": 12,
            "spearman": 0.9, "k": 10, "recalled": 9,
            "misses": [{"component": "L1.H2", "exact": -0.25, "estimate": 0.01, "estimate_rank": 11}],
        }],
    })
    .to_string()
}

/// Renders the report at `target` (in `dir`) from the test CSV and sidecar; the files written.
fn render(dir: &Path, name: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let csv = csv_text(&rows());
    let sidecar = sidecar_text();
    let files =
        page::render((csv.as_bytes(), "t.csv"), Some((sidecar.as_bytes(), "t.provenance.json")), &dir.join(name))
            .unwrap();
    page::write(&files, false).unwrap();
    files
}

fn parse(text: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    roxmltree::Document::parse_with_options(text, options).unwrap_or_else(|e| panic!("not well-formed: {e}"))
}

fn is(n: &roxmltree::Node, tag: &str) -> bool {
    n.is_element() && n.tag_name().name() == tag
}

fn class(n: &roxmltree::Node, c: &str) -> bool {
    n.attribute("class") == Some(c)
}

fn text_of(n: &roxmltree::Node) -> String {
    n.descendants().filter(|d| d.is_text()).map(|d| d.text().unwrap()).collect()
}

/// The colour scale, written out: t = v / max|v| of the map; white-ish at 0 to red at 1 and
/// blue at -1, linear per channel.
fn expected_colour(v: f64, limit: f64) -> String {
    let (mid, pos, neg) = ([247.0, 247.0, 247.0], [178.0, 24.0, 43.0], [33.0, 102.0, 172.0]);
    let t = (v / limit).clamp(-1.0, 1.0);
    let end = if t < 0.0 { neg } else { pos };
    let c: Vec<u8> = (0..3).map(|i| (mid[i] + (end[i] - mid[i]) * t.abs()).round() as u8).collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn f(attr: Option<&str>) -> f64 {
    attr.unwrap().parse().unwrap()
}

/// Checks one heat map SVG against the CSV rows it draws.
fn check_heatmap(svg: roxmltree::Node, rows: &[R], metric: usize, y_title: &str, y_ticks: &[&str]) {
    let cells: Vec<_> = svg.descendants().filter(|n| is(n, "rect") && class(n, "cell")).collect();
    assert_eq!(cells.len(), rows.len(), "one cell per row");
    let limit = rows.iter().map(|r| r.values[metric].abs()).fold(0.0, f64::max);
    let xticks: Vec<_> = svg.descendants().filter(|n| class(n, "xtick")).collect();
    let yticks: Vec<_> = svg.descendants().filter(|n| class(n, "ytick")).collect();
    let layers: BTreeSet<usize> = rows.iter().map(|r| r.layer).collect();
    assert_eq!(
        xticks.iter().map(|t| t.text().unwrap().to_string()).collect::<Vec<_>>(),
        layers.iter().map(|l| l.to_string()).collect::<Vec<_>>()
    );
    let shown: Vec<String> = yticks.iter().map(|t| t.text().unwrap().to_string()).collect();
    assert_eq!(shown, y_ticks);
    let title = |class_name: &str| svg.descendants().find(|n| class(n, class_name)).map(|n| text_of(&n)).unwrap();
    assert_eq!(title("xtitle"), if rows[0].window.is_some() { "layer (window centre)" } else { "layer" });
    assert_eq!(title("ytitle"), y_title);
    for cell in cells {
        let name = cell.attribute("data-component").unwrap();
        let row = rows
            .iter()
            .find(|r| {
                if r.summation {
                    format!("{} (summation baseline)", r.component) == name
                } else {
                    r.component == name
                }
            })
            .unwrap_or_else(|| panic!("no row for cell {name}"));
        let v = row.values[metric];
        assert_eq!(f(cell.attribute("data-value")), v, "{name}");
        assert_eq!(text_of(&cell), format!("{name}: {v:.4}"));
        assert_eq!(cell.attribute("fill").unwrap(), expected_colour(v, limit), "{name}");
        // The cell sits in its layer's column and its row's line.
        let centre_x = f(cell.attribute("x")) + f(cell.attribute("width")) / 2.0;
        let column = xticks.iter().find(|t| t.text() == Some(&row.layer.to_string())).unwrap();
        assert!((centre_x - f(column.attribute("x"))).abs() < 1e-9, "{name} column");
        let centre_y = f(cell.attribute("y")) + f(cell.attribute("height")) / 2.0;
        let line = yticks
            .iter()
            .min_by(|a, b| (f(a.attribute("y")) - centre_y).abs().total_cmp(&(f(b.attribute("y")) - centre_y).abs()));
        let want = match (row.head, row.position, row.window) {
            (Some(h), _, _) => format!("H{h}"),
            (_, Some((_, label)), _) => label.to_string(),
            (_, _, Some(w)) => {
                if row.summation {
                    format!("w{w} sum")
                } else {
                    format!("w{w}")
                }
            }
            _ => unreachable!(),
        };
        assert!(line.unwrap().text().unwrap().starts_with(&want), "{name} row");
    }
    // The legend reads +max, 0, -max.
    let legend: Vec<String> = svg.descendants().filter(|n| class(n, "legend-tick")).map(|n| text_of(&n)).collect();
    assert_eq!(legend, [format!("{limit:.4}"), "0.0000".into(), format!("{:.4}", -limit)]);
}

fn rows_of<'a>(rows: &'a [R], variant: &str, target: &str) -> Vec<&'a R> {
    rows.iter().filter(|r| r.variant == variant && r.target == target).collect()
}

#[test]
fn every_heat_map_cell_matches_the_csv_and_the_colour_scale() {
    let dir = tempfile::tempdir().unwrap();
    render(dir.path(), "t.html");
    let html = std::fs::read_to_string(dir.path().join("t.html")).unwrap();
    assert!(html.starts_with(page::MARKER));
    let doc = parse(&html);
    let maps: BTreeMap<String, roxmltree::Node> = doc
        .descendants()
        .filter(|n| is(n, "svg") && class(n, "heatmap"))
        .map(|n| (text_of(&n.descendants().find(|t| class(t, "title")).unwrap()), n))
        .collect();
    let all = rows();
    let mut checked = 0;
    for variant in VARIANTS {
        for (m, metric) in METRICS.iter().enumerate() {
            let heads: Vec<R> = rows_of(&all, variant, "heads").into_iter().cloned().collect();
            check_heatmap(maps[&format!("{variant} · heads · {metric}")], &heads, m, "head", &["H0", "H1", "H2", "H3"]);
            let resid: Vec<R> = rows_of(&all, variant, "resid").into_iter().cloned().collect();
            // Position rows carry the first prompt's token; the long one is cut with `…`.
            let cut: String = format!("S2 {EVIL:?}").chars().take(27).collect::<String>() + "…";
            let ticks = ["IO \" John\"", cut.as_str(), "end \"&\\\"'\\u{7}\\0\\n\""];
            check_heatmap(maps[&format!("{variant} · resid · {metric}")], &resid, m, "position", &ticks);
            let mlp: Vec<R> = rows_of(&all, variant, "mlp").into_iter().cloned().collect();
            check_heatmap(maps[&format!("{variant} · mlp · {metric}")], &mlp, m, "window", &["w1", "w3", "w3 sum"]);
            checked += 3;
        }
    }
    assert_eq!(checked, 12);
    // One map per (variant, target, metric), two matrices per (target, metric), and a window
    // profile per (variant, window target, metric).
    assert_eq!(doc.descendants().filter(|n| is(n, "svg")).count(), 12 + 2 * 3 * 2 + 2 * 2);
}

/// Detection, written out: more than 2 population sd from the mean.
fn detected(rows: &[&R], metric: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let comps: Vec<&&R> = rows.iter().filter(|r| !r.summation).collect();
    let n = comps.len() as f64;
    let mean = comps.iter().map(|r| r.values[metric]).sum::<f64>() / n;
    let var = comps.iter().map(|r| (r.values[metric] - mean) * (r.values[metric] - mean)).sum::<f64>() / n;
    let sd = var.sqrt();
    let mut pos = BTreeSet::new();
    let mut neg = BTreeSet::new();
    for r in comps {
        if r.values[metric] > mean + 2.0 * sd {
            pos.insert(r.component.clone());
        }
        if r.values[metric] < mean - 2.0 * sd {
            neg.insert(r.component.clone());
        }
    }
    (pos, neg)
}

/// Average ranks, counted: rank = 1 + (number smaller) + (number equal - 1) / 2.
fn average_ranks(xs: &[f64]) -> Vec<f64> {
    xs.iter()
        .map(|x| {
            let smaller = xs.iter().filter(|y| *y < x).count() as f64;
            let equal = xs.iter().filter(|y| *y == x).count() as f64;
            1.0 + smaller + (equal - 1.0) / 2.0
        })
        .collect()
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let mut cov = 0.0;
    let mut va = 0.0;
    let mut vb = 0.0;
    for i in 0..a.len() {
        cov += (a[i] - ma) * (b[i] - mb);
        va += (a[i] - ma) * (a[i] - ma);
        vb += (b[i] - mb) * (b[i] - mb);
    }
    cov / (va * vb).sqrt()
}

fn cells(row: roxmltree::Node) -> Vec<String> {
    row.children().filter(|c| is(c, "td")).map(|c| text_of(&c)).collect()
}

#[test]
fn comparison_tables_equal_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    render(dir.path(), "t.html");
    let html = std::fs::read_to_string(dir.path().join("t.html")).unwrap();
    let doc = parse(&html);
    let all = rows();
    let section = doc.descendants().find(|n| n.attribute("id") == Some("comparison")).unwrap();
    let headings: Vec<String> = section.descendants().filter(|n| is(n, "h3")).map(|n| text_of(&n)).collect();
    let tables: Vec<_> = section.descendants().filter(|n| is(n, "table") && class(n, "pairs")).collect();
    let set_tables: Vec<_> =
        section.descendants().filter(|n| is(n, "h3")).map(|h| h.next_sibling_element().unwrap()).collect();
    let mut i = 0;
    let mut some_defined = false;
    for target in ["heads", "resid", "mlp"] {
        for (m, metric) in METRICS.iter().enumerate() {
            assert_eq!(headings[i], format!("{target} · {metric}"));
            let (a, b) = (rows_of(&all, VARIANTS[0], target), rows_of(&all, VARIANTS[1], target));
            let ((pa, na), (pb, nb)) = (detected(&a, m), detected(&b, m));
            // Detected sets side by side.
            let listed = |cell: &str| -> BTreeSet<String> {
                if cell == "none" {
                    return BTreeSet::new();
                }
                cell.split(", ").map(|c| c.split(" (").next().unwrap().to_string()).collect()
            };
            let set_rows: Vec<Vec<String>> =
                set_tables[i].children().filter(|r| is(r, "tr")).skip(1).map(cells).collect();
            assert_eq!((listed(&set_rows[0][1]), listed(&set_rows[0][2])), (pa.clone(), na.clone()));
            assert_eq!((listed(&set_rows[1][1]), listed(&set_rows[1][2])), (pb.clone(), nb.clone()));
            // Jaccard and Spearman.
            let sa: BTreeSet<String> = pa.union(&na).cloned().collect();
            let sb: BTreeSet<String> = pb.union(&nb).cloned().collect();
            let union = sa.union(&sb).count();
            let jaccard = if union == 0 { None } else { Some(sa.intersection(&sb).count() as f64 / union as f64) };
            let (mut xs, mut ys) = (vec![], vec![]);
            for ra in a.iter().filter(|r| !r.summation) {
                let rb = b.iter().find(|r| !r.summation && r.component == ra.component).unwrap();
                xs.push(ra.values[m]);
                ys.push(rb.values[m]);
            }
            let spearman = pearson(&average_ranks(&xs), &average_ranks(&ys));
            let show = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.4}"));
            let row = cells(tables[i].children().filter(|r| is(r, "tr")).nth(1).unwrap());
            let want = [
                VARIANTS[0].to_string(),
                VARIANTS[1].to_string(),
                sa.len().to_string(),
                sb.len().to_string(),
                sa.intersection(&sb).count().to_string(),
                show(jaccard),
                xs.len().to_string(),
                show(Some(spearman)),
            ];
            assert_eq!(row, want, "{target} {metric}");
            some_defined |= jaccard.is_some_and(|j| j > 0.0 && j < 1.0);
            i += 1;
        }
    }
    assert!(some_defined, "the test data detects overlapping, different sets somewhere");
    assert_eq!(tables.len(), 6);
}

#[test]
fn window_peaks_are_compared_with_the_summation_baseline() {
    let dir = tempfile::tempdir().unwrap();
    render(dir.path(), "t.html");
    let html = std::fs::read_to_string(dir.path().join("t.html")).unwrap();
    let doc = parse(&html);
    let table = doc.descendants().find(|n| is(n, "table") && class(n, "peaks")).unwrap();
    let got: Vec<Vec<String>> = table.children().filter(|r| is(r, "tr")).skip(1).map(cells).collect();
    let all = rows();
    let mut want = vec![];
    for (m, metric) in METRICS.iter().enumerate() {
        for variant in VARIANTS {
            for w in [1, 3] {
                let peak = |summation: bool| {
                    let mut best: Option<(usize, f64)> = None;
                    for r in rows_of(&all, variant, "mlp") {
                        if r.window == Some(w) && r.summation == summation {
                            let v = r.values[m];
                            if best.is_none_or(|(_, b)| v.abs() > b.abs()) {
                                best = Some((r.layer, v));
                            }
                        }
                    }
                    best
                };
                let (layer, value) = peak(false).unwrap();
                let baseline = peak(true);
                want.push(vec![
                    variant.to_string(),
                    "mlp".into(),
                    "–".into(),
                    metric.to_string(),
                    w.to_string(),
                    format!("{value:.4} at L{layer}"),
                    baseline.map_or("–".into(), |(l, b)| format!("{b:.4} at L{l}")),
                    baseline.map_or("–".into(), |(_, b)| format!("{:.4}", value / b)),
                ]);
            }
        }
    }
    assert_eq!(got, want);
    // The profiles draw each window and its summation baseline, labelled.
    let section = doc.descendants().find(|n| n.attribute("id") == Some("windows")).unwrap();
    let labels: Vec<String> =
        section.descendants().filter(|n| is(n, "text")).map(|n| text_of(&n).trim().to_string()).collect();
    for label in ["w1", "w3", "w3 summation", "layer (window centre)"] {
        assert_eq!(labels.iter().filter(|l| *l == label).count(), 4, "{label} in each of the 4 profiles");
    }
}

#[test]
fn token_text_that_looks_like_markup_stays_inert_text() {
    let dir = tempfile::tempdir().unwrap();
    render(dir.path(), "t.html");
    let html = std::fs::read_to_string(dir.path().join("t.html")).unwrap();
    assert!(!html.contains("<script"), "no script element");
    assert!(!html.contains("<b>&"), "labels from the CSV are escaped");
    assert!(html.bytes().all(|b| b >= 0x20 || b == b'\n'), "no control bytes");
    let doc = parse(&html);
    assert!(!doc.descendants().any(|n| is(&n, "script")));
    // The token is text: in a row label's tooltip, whole, and the control bytes made visible.
    let tips: Vec<String> = doc.descendants().filter(|n| class(n, "ytick")).map(|n| text_of(&n)).collect();
    assert!(tips.iter().any(|t| t.contains(&format!("{EVIL:?}"))), "{tips:?}");
    assert!(tips.iter().any(|t| t.contains("\"&\\\"'\\u{7}\\0\\n\"")), "{tips:?}");
    // The variant label with markup shows as written.
    assert!(doc.descendants().any(|n| is(&n, "h2") && text_of(&n) == VARIANTS[1]));
}

#[test]
fn markdown_report_has_the_tables_and_links_valid_svg_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = render(dir.path(), "t.md");
    let md = std::fs::read_to_string(dir.path().join("t.md")).unwrap();
    assert!(md.starts_with(page::MARKER));
    assert_eq!(files.len(), 1 + 12 + 12 + 4, "the summary, 12 heat maps, 12 matrices, 4 window profiles");
    for (path, _) in &files[1..] {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(md.contains(&format!("(<{}>)", name.replace('_', "\\_"))), "{name} is linked");
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.starts_with(page::MARKER));
        let doc = parse(&svg);
        assert!(doc.descendants().any(|n| is(&n, "rect") || is(&n, "polyline")));
        assert!(!svg.contains("<script"));
    }
    // Markup in a variant label is escaped for Markdown too, and the tables are there.
    assert!(md.contains("## t/&lt;b&gt;&amp;/noise"));
    assert!(md.contains("| variant A | variant B |"));
    assert!(md.contains("| 7 | expect top 1 heads by ld includes L3.H2<br/>t/a/denoise: rank 1 | holds |"));
    assert!(md.contains("**FAILS**"));
}

#[test]
fn expectations_and_provenance_come_from_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    render(dir.path(), "t.html");
    let html = std::fs::read_to_string(dir.path().join("t.html")).unwrap();
    let doc = parse(&html);
    let table = doc.descendants().find(|n| is(n, "table") && class(n, "expectations")).unwrap();
    let verdicts: Vec<String> =
        table.children().filter(|r| is(r, "tr")).skip(1).map(|r| cells(r).last().unwrap().clone()).collect();
    assert_eq!(verdicts, ["holds", "FAILS"]);
    let provenance = doc.descendants().find(|n| is(n, "table") && class(n, "provenance")).unwrap();
    assert!(text_of(&provenance).contains("model.manifest_sha256abc123"));
    assert!(!text_of(&provenance).contains("attribution_agreement"), "shown in its own table");
    let agreement = doc.descendants().find(|n| is(n, "table") && class(n, "agreement")).unwrap();
    let row: Vec<String> = agreement.children().filter(|r| is(r, "tr")).nth(1).map(|r| cells(r)).unwrap();
    assert_eq!(row[1..], ["atp", "heads", "ld", "12", "0.9000", "9/10", "L1.H2 (-0.2500, estimated 0.0100, rank 11)"]);
}

fn error_of(csv: &str) -> String {
    read::read(csv.as_bytes(), "x.csv").unwrap_err().to_string()
}

#[test]
fn bad_csvs_are_refused_naming_the_problem() {
    let good = csv_text(&rows());
    assert!(error_of("a,b\n1,2\n").contains("x.csv is not a patchbay result CSV"));
    assert!(error_of("a,b\n1,2\n").contains("help:"));
    assert!(error_of(&good.replacen(",hook,", ",hooks,", 1)).contains("lacks the column `hook`"));
    let per_prompt = good.replacen("method,ld,", "method,prompt_index,sample,ld,", 1);
    assert!(error_of(&per_prompt).contains("per-prompt CSV"));
    let no_sem = good.lines().next().unwrap().replace(",p_sem", "") + "\n";
    assert!(error_of(&no_sem).contains("lacks the column `p_sem`"));
    let mut mixed = good.clone();
    let last = good.lines().last().unwrap().replacen("t,", "other,", 1);
    mixed.push_str(&(last + "\n"));
    let e = error_of(&mixed);
    assert!(e.contains("mixes experiments: `t` and, on line"), "{e}");
    assert!(e.contains("`other`"), "{e}");
    assert!(error_of(HEADER).contains("no metric columns"));
    let header = good.lines().next().unwrap();
    assert!(error_of(&format!("{header}\n")).contains("has no result rows"));
    let bad_number = good.replacen(",1.5,", ",abc,", 1);
    assert!(error_of(&bad_number).contains("line 2, column `ld_clean`: `abc` is not a finite number"));
    let nan = good.replacen(",1.5,", ",NaN,", 1);
    assert!(error_of(&nan).contains("is not a finite number"));
    let e = page::kind_of(Path::new("r.txt")).unwrap_err().to_string();
    assert!(e.contains("name the report `.html`"), "{e}");
}

#[test]
fn the_command_writes_the_page_and_never_replaces_a_file_that_is_not_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("r.csv");
    std::fs::write(&csv, csv_text(&rows())).unwrap();
    std::fs::write(dir.path().join("r.provenance.json"), sidecar_text()).unwrap();
    let out = dir.path().join("out");
    let report = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_patchbay"))
            .arg("report")
            .arg(&csv)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("r.html"), "my notes").unwrap();
    let refused = report(&[]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is not a patchbay report; not replacing it"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("r.html")).unwrap(), "my notes");

    let forced = report(&["--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    assert_eq!(String::from_utf8_lossy(&forced.stdout).trim(), out.join("r.html").display().to_string());
    let page = std::fs::read_to_string(out.join("r.html")).unwrap();
    assert!(page.contains("abc123"), "the sidecar beside the CSV is read");
    // A report replaces a report without asking.
    assert!(report(&[]).status.success());
    // Markdown: the summary and its SVG files, also guarded.
    std::fs::write(out.join("r.md"), "not mine").unwrap();
    assert_eq!(report(&["--markdown"]).status.code(), Some(2));
    std::fs::remove_file(out.join("r.md")).unwrap();
    assert!(report(&["--markdown"]).status.success());
    let svgs =
        std::fs::read_dir(&out).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "svg"));
    assert_eq!(svgs.count(), 28);
    // Not a CSV at all.
    std::fs::write(&csv, "hello\n").unwrap();
    let bad = report(&["--force"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a patchbay result CSV"));
}

/// Path rows: the report draws senders x receivers, one column per `path` target, the senders
/// of largest |value| through any receiver as rows, every cell its CSV value.
#[test]
fn path_targets_are_drawn_as_senders_by_receivers() {
    let mut csv = HEADER.to_string();
    for suffix in ["", "_effect", "_patched", "_clean", "_corrupted", "_sem", "_estimate"] {
        csv += &format!(",ld{suffix}");
    }
    csv.push('\n');
    // 25 senders (more than the 20 drawn) to two receivers; sender i's value through receiver
    // r is (i - 12) / 10 * (r + 1), so the senders farthest from 12 are drawn.
    let mut expected = std::collections::BTreeMap::new();
    for (r, (target, receiver)) in [("to_a", "[L5.H1] q"), ("to_b", "resid 6")].into_iter().enumerate() {
        for i in 0..25usize {
            let (layer, head) = (i / 5, i % 5);
            let value = (i as f64 - 12.0) / 10.0 * (r as f64 + 1.0);
            csv += &format!(
                "t,t/a/denoise,t,a,denoise,{target},L{layer}.H{head},\"blocks.{layer}.attn.hook_z->{receiver}\",{layer},{head},,,,,8,1,path,{value},{value},0.5,1.5,-0.5,0.01,\n"
            );
            if (i as f64 - 12.0).abs() >= 3.0 {
                expected.insert(format!("L{layer}.H{head} -> {receiver}"), value);
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let files = page::render((csv.as_bytes(), "t.csv"), None, &tmp.path().join("t.html")).unwrap();
    let html = String::from_utf8(files[0].1.clone()).unwrap();
    let doc = parse(&html);
    let section = doc.descendants().find(|n| n.attribute("id") == Some("paths")).expect("a paths section");
    let drawn: std::collections::BTreeMap<String, f64> = section
        .descendants()
        .filter(|n| class(n, "cell"))
        .map(|n| (n.attribute("data-component").unwrap().to_string(), f(n.attribute("data-value"))))
        .collect();
    // |i - 12| >= 3 keeps 20 of the 25 senders (i = 0..=9 and 15..=24); both receivers each.
    assert_eq!(drawn.len(), 40, "{drawn:?}");
    for (name, value) in &expected {
        assert!((drawn[name] - value).abs() < 1e-9, "{name}: {} vs {value}", drawn[name]);
    }
}
