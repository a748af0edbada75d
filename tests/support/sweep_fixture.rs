//! Shared test fixture: a tiny model and an IOI experiment over it; for the sharding tests, a
//! sweep of several variants (two directions, Gaussian noise with samples, two targets, two
//! metrics) which, under a tiny memory budget, runs as many one-pass batches. Included with
//! `#[path]`; not every test file uses every item.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use patchbay::import::{self, ImportOptions};
use patchbay::model::Architecture;
use patchbay::test_support::synth::{self, WeightDtype};

/// `run --memory`: one pass per batch, so there are many checkpoints to stop between.
pub const MEMORY: &str = "0.0000001";

/// The sweep's targets.
const TARGETS: &str =
    "patch heads = attn.hook_z layers all heads all\npatch resid = hook_resid_mid layers all positions each";

/// A tiny Llama model in `<dir>/model` and the sweep over `prompts` IOI prompts in `<dir>/exp.bay`,
/// writing `out/r.csv` and `out/p.csv`.
pub fn setup(dir: &Path, prompts: usize) -> PathBuf {
    setup_with(dir, prompts, TARGETS)
}

/// The same with other `patch` statements.
pub fn setup_with(dir: &Path, prompts: usize, targets: &str) -> PathBuf {
    let body = format!(
        r#"corruption s2_io = replace S2 with IO
corruption gn = noise on S2 samples 2
{targets}
metric ld = logit_diff normalized
metric kl = kl
sweep {{ direction: [denoise, noise] }}
output "out/r.csv"
per_prompt "out/p.csv"
"#
    );
    setup_model(dir, Architecture::Llama, prompts, &body)
}

/// A tiny model of `arch` in `<dir>/model` and `<dir>/exp.bay`: an IOI dataset of `prompts`
/// prompts, then `body`.
pub fn setup_model(dir: &Path, arch: Architecture, prompts: usize, body: &str) -> PathBuf {
    setup_synth(dir, &synth::tiny(arch, 3), prompts, body)
}

/// The same with the model `synth`.
pub fn setup_synth(dir: &Path, synth: &synth::SynthModel, prompts: usize, body: &str) -> PathBuf {
    patchbay::runtime::ensure(true).unwrap();
    let ckpt = dir.join("ckpt");
    synth.write_hf_folder(&ckpt, WeightDtype::F32).unwrap();
    import::import(&ImportOptions { source: ckpt, out: dir.join("model"), force: false, quiet: true }).unwrap();
    let file = dir.join("exp.bay");
    let text = format!(
        r#"model "model"
pool names = [" Mary", " John", " Tom", " Sarah", " Alice", " Bob"]
dataset ioi {{
  template "When{{IO}} and{{S1}} went to the{{PLACE}},{{S2}} gave a{{OBJECT}} to"
  slot IO, S1 from names distinct
  slot S2 = S1
  slot PLACE from [" store", " park"]
  slot OBJECT from [" drink", " book"]
  count {prompts}  seed 1
  answer IO  wrong S1
}}
{body}"#
    );
    std::fs::write(&file, text).unwrap();
    file
}
