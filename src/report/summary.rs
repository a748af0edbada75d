//! The summary `patchbay run` prints: per variant the clean and corrupted metric and the
//! components with the largest effects, then the expectations and the files written.

use std::path::PathBuf;

use crate::run::results::Row;
use crate::run::Outcome;

/// The terminal summary: per variant the clean and corrupted metric and the top components,
/// then the expectations.
pub fn summary(outcome: &Outcome, written: &[PathBuf]) -> String {
    use std::fmt::Write as _;
    let plan = &outcome.plan;
    let mut s = String::new();
    let _ = write!(s, "{}: {} patched passes", plan.experiment, outcome.work.passes);
    if outcome.work.backward_passes > 0 {
        let _ = write!(s, " and {} forward-and-backward passes (attribution)", outcome.work.backward_passes);
    }
    let _ = writeln!(s, " in {:.1} s", outcome.seconds);
    let agreements = crate::report::agreement::agreements(plan, &outcome.rows);
    for (v, variant) in plan.variants.iter().enumerate() {
        let _ = writeln!(s, "\n{} ({} prompts)", variant.label, variant.prompts.len());
        // Once per dataset: its variants share the clean runs.
        let first_of_dataset = plan.variants.iter().position(|x| x.dataset == variant.dataset) == Some(v);
        if let (true, Some(task)) = (first_of_dataset, &outcome.tasks[v]) {
            let _ = write!(
                s,
                "  clean runs: {}/{} prompts right (answer more likely than wrong answer), mean log P(answer) - log P(wrong) {:.3}",
                task.correct, task.prompts, task.mean_log_odds
            );
            if !task.wrong.is_empty() {
                let list: Vec<String> = task.wrong.iter().map(usize::to_string).collect();
                let _ = write!(s, "; wrong on prompts {}", list.join(", "));
            }
            s.push('\n');
        }
        for (m, metric) in plan.metrics.iter().enumerate() {
            let rows: Vec<&Row> = outcome.rows.iter().filter(|r| r.variant == v && !r.summation).collect();
            let Some(first) = rows.first() else { continue };
            let c = &first.cells[m];
            let corrupted = c.corrupted.map_or("-".to_string(), |x| format!("{x:.4}"));
            let _ = write!(s, "  {}: clean {:.4}, corrupted {corrupted}; largest |effect|:", metric.name, c.clean);
            // By size: in the noise direction the components that matter most are negative.
            let size = |r: &Row| r.cells[m].value.map_or(-1.0, f64::abs);
            let mut ranked = rows.clone();
            ranked.sort_by(|a, b| size(b).total_cmp(&size(a)));
            for r in ranked.iter().take(3) {
                let value = r.cells[m].value.map_or("-".to_string(), |x| format!("{x:.3}"));
                let _ = write!(s, " {} {} {value},", r.target, r.component);
            }
            s.pop();
            s.push('\n');
        }
        for a in agreements.iter().filter(|a| a.variant == variant.label) {
            let spearman = a.spearman.map_or("-".to_string(), |x| format!("{x:.3}"));
            let _ = write!(
                s,
                "  {} estimated against {} patched exactly, {}, {} components: Spearman {spearman}, top-{} recall {}/{}",
                a.estimated, a.exact, a.metric, a.components, a.k, a.recalled, a.k
            );
            if !a.misses.is_empty() {
                let misses: Vec<String> = a
                    .misses
                    .iter()
                    .take(3)
                    .map(|m| {
                        format!(
                            "{} ({:.3}, estimated {:.3}, rank {})",
                            m.component, m.exact, m.estimate, m.estimate_rank
                        )
                    })
                    .collect();
                let _ = write!(s, "; missed {}", misses.join(", "));
            }
            s.push('\n');
        }
    }
    if !outcome.verdicts.is_empty() {
        let _ = writeln!(s, "\nexpectations:");
        for verdict in &outcome.verdicts {
            let _ = writeln!(
                s,
                "  {} line {}: {}",
                if verdict.holds { "holds" } else { "FAILS" },
                verdict.line,
                verdict.text
            );
            for d in &verdict.details {
                let _ = writeln!(s, "      {d}");
            }
        }
    }
    for path in written {
        let _ = writeln!(s, "wrote {}", path.display());
    }
    s
}
