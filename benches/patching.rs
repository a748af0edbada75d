//! Patching sweeps on the demo model (SmolLM2-135M), fast path against the way peer libraries
//! patch (one full forward pass of all prompts per component), measured in the same run.
//!
//! - W1: IOI head sweep, 48 prompts, all 30 x 9 heads, all positions, denoise, S2 -> IO,
//!   normalised logit difference.
//! - W2: `hook_resid_pre`, all layers x `positions each`, same prompts.
//!
//! And attribution patching (AtP, and AtP* with GradDrop) against the exact fast path on the
//! same sweeps (`atp-w1`, `atp-w2`, and `atp-hp`: the heads by position, 14 times W1's
//! components; run only when named): wall time of each, their ratio, and the estimates'
//! Spearman correlation and top-10 recall against the exact values (AtP*'s unsigned score
//! against the exact values' sizes).
//!
//! And path patching (`path`, run only when named): the IOI path sweep, every head of layers
//! 0..22 as a sender to L23.H3's query (heads and MLPs frozen), the fast path against the
//! reference executor (two full forward passes per sender and prompt, one per call), in one
//! run: wall time, ratio, largest difference.
//!
//! Run: `cargo bench --bench patching` (or `-- w1` / `-- w2` for one; `-- prompts=16` for a
//! quicker, smaller run; `-- device=cuda` on a GPU with the onnxruntime-gpu build). Reports wall time,
//! patched passes per second and useful GFLOP/s: the FLOPs of the fast path's own work
//! (passes that change something, from their first patched layer, last-position unembedding),
//! divided by each executor's time. Compare with `benches/matmul_ceiling.py`.

use std::time::Instant;

use patchbay::model::ModelConfig;
use patchbay::run::{self, Executor, RunOptions};
use patchbay::{demo, runtime};

const IOI: &str = r#"
pool names = [" Mary", " John", " Tom", " Sarah", " Alice", " Bob", " James", " Anna", " Michael", " David"]
dataset ioi {
  template "When{IO} and{S1} went to the{PLACE},{S2} gave a{OBJECT} to"
  slot IO, S1 from names distinct
  slot S2 = S1
  slot PLACE from [" store", " park", " school", " station"]
  slot OBJECT from [" drink", " book", " ball", " letter"]
  count PROMPTS  seed 1
  answer IO  wrong S1
}
corruption s2_io = replace S2 with IO
metric ld = logit_diff normalized
"#;

/// Multiply-adds of one transformer layer for one token at sequence length `pos`.
fn layer_macs(c: &ModelConfig, pos: usize) -> f64 {
    let (d, dh) = (c.d_model as f64, c.d_head as f64);
    let proj = d * dh * (2.0 * c.n_heads as f64 + 2.0 * c.n_kv_heads as f64);
    let mlp = 3.0 * d * c.d_mlp as f64;
    proj + mlp + 2.0 * c.n_heads as f64 * dh * pos as f64
}

fn main() -> anyhow::Result<()> {
    runtime::ensure(true)?;
    let model = demo::ensure_demo_model(true)?;
    let c = model.manifest.config.clone();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let prompts = args.iter().find_map(|a| a.strip_prefix("prompts=")).unwrap_or("48");
    let device = args.iter().find_map(|a| a.strip_prefix("device=")).unwrap_or("cpu");
    let only: Vec<&String> = args.iter().filter(|a| !a.contains('=')).collect();
    let tmp = std::env::temp_dir().join(format!("patchbay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let workloads = [
        ("w1", "patch heads = attn.hook_z layers all heads all"),
        ("w2", "patch resid = hook_resid_pre layers all positions each"),
    ];
    for (name, patch) in workloads {
        if !only.is_empty() && !only.iter().any(|o| *o == name) {
            continue;
        }
        let file = tmp.join(format!("{name}.bay"));
        let ioi = IOI.replace("PROMPTS", prompts);
        std::fs::write(&file, format!("model \"{}\"\n{ioi}{patch}\n", model.path.display()))?;
        let exp = patchbay::check::check_file(&file, Some(device.parse().unwrap()))
            .map_err(|d| anyhow::anyhow!("{}", d.iter().map(|d| d.render_terminal()).collect::<String>()))?;
        let len = exp.datasets[0].prompts[0].ids.len();
        let mut results = vec![];
        for executor in [Executor::Fast, Executor::PerComponent] {
            let start = Instant::now();
            let outcome = run::run(&exp, &RunOptions { executor, ..RunOptions::default() })?;
            results.push((executor, start.elapsed().as_secs_f64(), outcome));
        }
        let fast = &results[0].2;
        // Useful work: what the fast path computed, plus the last-position unembedding.
        let useful_flops = 2.0
            * (fast.work.layer_tokens as f64 * layer_macs(&c, len)
                + fast.work.passes as f64 * (c.d_model * c.vocab_size) as f64);
        let planned = fast.plan.counts.patched_runs;
        println!("{name} on {device}: {planned} patched (prompt, component) pairs, {len} tokens per prompt");
        for (executor, seconds, outcome) in &results {
            println!(
                "  {:<14} {:>8.1} s  {:>7} passes  {:>8.1} pairs/s  {:>6.1} useful GFLOP/s",
                format!("{executor:?}"),
                seconds,
                outcome.work.passes,
                planned as f64 / seconds,
                useful_flops / seconds / 1e9
            );
        }
        let max_diff = results[0]
            .2
            .rows
            .iter()
            .zip(&results[1].2.rows)
            .map(|(a, b)| (a.cells[0].value.unwrap() - b.cells[0].value.unwrap()).abs())
            .fold(0.0, f64::max);
        println!("  speed-up {:.1}x; largest difference between the two: {max_diff:.2e}", results[1].1 / results[0].1);
    }
    let attribution = [
        ("atp-w1", workloads[0].1, false),
        ("atp-w2", workloads[1].1, false),
        ("atp-hp", "patch heads = attn.hook_z layers all heads all positions each", true),
    ];
    for (name, patch, only_when_named) in attribution {
        let named = only.iter().any(|o| *o == name);
        if (!only.is_empty() || only_when_named) && !named {
            continue;
        }
        let ioi = IOI.replace("PROMPTS", prompts);
        let mut timed = vec![];
        for (suffix, extra) in [("exact", ""), ("atp", " by attribution"), ("atp-star", " by atp*")] {
            let file = tmp.join(format!("{name}-{suffix}.bay"));
            std::fs::write(&file, format!("model \"{}\"\n{ioi}{patch}{extra}\n", model.path.display()))?;
            let exp = patchbay::check::check_file(&file, Some(device.parse().unwrap()))
                .map_err(|d| anyhow::anyhow!("{}", d.iter().map(|d| d.render_terminal()).collect::<String>()))?;
            let start = Instant::now();
            let outcome = run::run(&exp, &RunOptions::default())?;
            timed.push((start.elapsed().as_secs_f64(), outcome));
        }
        let exact: Vec<f64> = timed[0].1.rows.iter().map(|r| r.cells[0].value.unwrap()).collect();
        let sizes: Vec<f64> =
            timed[0].1.rows.iter().map(|r| patchbay::report::agreement::exact_size(r, 0).unwrap()).collect();
        let top = |v: &[f64]| {
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()));
            order.truncate(10);
            order
        };
        println!("{name} on {device}: {} components x {prompts} prompts", exact.len());
        println!("  exact fast path  {:>8.1} s  {:>7} patched passes", timed[0].0, timed[0].1.work.passes);
        for ((seconds, outcome), method) in timed[1..].iter().zip(["attribution", "AtP*"]) {
            let ys: Vec<f64> = outcome.rows.iter().map(|r| r.cells[0].estimate.unwrap()).collect();
            // AtP*'s score is the effect's size: it ranks against the exact sizes.
            let xs = if method == "AtP*" { sizes.clone() } else { exact.clone() };
            let recalled = top(&xs).iter().filter(|i| top(&ys).contains(i)).count();
            let spearman = patchbay::report::agreement::spearman(&xs, &ys).unwrap_or(f64::NAN);
            println!(
                "  {method:<12} {seconds:>8.1} s  {:>7} forward-and-backward passes; {:.1}x faster; Spearman {spearman:.3}; top-10 recall {recalled}/10",
                outcome.work.backward_passes,
                timed[0].0 / seconds
            );
        }
    }
    if only.iter().any(|o| *o == "path") {
        let file = tmp.join("path.bay");
        let ioi = IOI.replace("PROMPTS", prompts);
        let path = "path nm = from attn.hook_z layers 0..22 heads all to L23.H3 q";
        std::fs::write(&file, format!("model \"{}\"\n{ioi}{path}\n", model.path.display()))?;
        let exp = patchbay::check::check_file(&file, Some(device.parse().unwrap()))
            .map_err(|d| anyhow::anyhow!("{}", d.iter().map(|d| d.render_terminal()).collect::<String>()))?;
        let mut timed = vec![];
        for executor in [Executor::Fast, Executor::Reference] {
            let start = Instant::now();
            let outcome = run::run(&exp, &RunOptions { executor, ..RunOptions::default() })?;
            timed.push((start.elapsed().as_secs_f64(), outcome));
        }
        let largest = timed[0]
            .1
            .rows
            .iter()
            .zip(&timed[1].1.rows)
            .map(|(a, b)| (a.cells[0].value.unwrap() - b.cells[0].value.unwrap()).abs())
            .fold(0.0, f64::max);
        println!("path on {device}: 207 senders -> L23.H3 q, {prompts} prompts, {} passes", timed[0].1.work.passes);
        println!("  fast path  {:>8.1} s", timed[0].0);
        println!("  reference  {:>8.1} s  (one pass per call)", timed[1].0);
        println!("  speed-up {:.1}x; largest difference {largest:.2e}", timed[1].0 / timed[0].0);
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
