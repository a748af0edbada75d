//! Import and forward-pass timings on the demo model (SmolLM2-135M), with achieved GFLOP/s.
//!
//! Run: `cargo bench --bench forward`. Fetches ONNX Runtime and the demo model on first use.

use std::time::Instant;

use patchbay::demo;
use patchbay::model::ModelConfig;
use patchbay::runtime::{self, Batch, Device};

/// Multiply-adds per token of one forward pass at sequence length `pos`: projections, MLP,
/// attention scores and mixing, and the unembedding (which the graph computes at every position).
fn macs_per_token(c: &ModelConfig, pos: usize) -> f64 {
    let (d, dh) = (c.d_model as f64, c.d_head as f64);
    let proj = d * dh * (2.0 * c.n_heads as f64 + 2.0 * c.n_kv_heads as f64);
    let mlp = 3.0 * d * c.d_mlp as f64;
    let attn = 2.0 * c.n_heads as f64 * dh * pos as f64;
    c.n_layers as f64 * (proj + mlp + attn) + d * c.vocab_size as f64
}

fn main() -> anyhow::Result<()> {
    runtime::ensure(true)?;
    let model = demo::ensure_demo_model(true)?;
    let c = model.manifest.config.clone();

    let gguf = demo::demo_gguf()?;
    let tmp = std::env::temp_dir().join(format!("patchbay-bench-{}", std::process::id()));
    let start = Instant::now();
    patchbay::import::import(&patchbay::import::ImportOptions {
        source: gguf,
        out: tmp.join("model"),
        force: false,
        quiet: true,
    })?;
    println!("import SmolLM2-135M Q4_1 GGUF -> ONNX: {:.2} s", start.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&tmp)?;

    let start = Instant::now();
    let mut session = runtime::session(&model.onnx_path(), Device::Cpu)?;
    println!("session load: {:.2} s", start.elapsed().as_secs_f64());

    for (batch, pos) in [(1, 10), (1, 14), (48, 14), (64, 32)] {
        let sequences: Vec<Vec<u32>> =
            (0..batch).map(|b| (0..pos).map(|p| (100 + 7 * b + p) as u32).collect()).collect();
        let input = Batch::new(&sequences);
        runtime::run(&mut session, &input, &["logits"])?; // warm-up
        let reps = 5;
        let start = Instant::now();
        for _ in 0..reps {
            runtime::run(&mut session, &input, &["logits"])?;
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        let gflop = 2.0 * macs_per_token(&c, pos) * (batch * pos) as f64 / 1e9;
        println!(
            "forward batch {batch:>2} x {pos:>2} tokens: {:>7.1} ms  ({gflop:.1} GFLOP, {:.0} GFLOP/s)",
            secs * 1e3,
            gflop / secs
        );
    }
    Ok(())
}
