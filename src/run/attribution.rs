//! Gradients of a metric with respect to hooks, for attribution patching: the patchable full
//! graph with its backward pass appended ([`crate::onnx::autodiff`]), in one session whose
//! run returns the final position's logits, the hooks' values and their gradients.
//!
//! The backward pass starts from dM/d(logits) (see [`metric_gradient`]). A logit difference's
//! is the same whatever the logits, so the cached base run's own pass computes it, forward and
//! backward at once. Other metrics' depend on the base run's logits: one forward and backward
//! pass each after the cached base run. A pass without seeds is a forward pass only: it skips
//! the backward nodes, which sit in `If` branches.
//!
//! For a few runs the session does not prepack weights ([`Runs::Few`]; the caller decides, see
//! [`crate::run::estimate::session_runs`]): packing every weight twice (for the forward
//! product and the backward pass's product with its transpose) would cost more than it saves.

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, Result};
use ort::session::Session;
use ort::value::Tensor as OrtTensor;

use crate::ir::experiment::MetricKind;
use crate::model::checkpoint::Tensor;
use crate::model::{Dim, ModelConfig, ModelDir};
use crate::onnx::proto::{data_type, ModelProto};
use crate::onnx::{autodiff, optional};
use crate::run::engine::{self, Pass};
use crate::run::graph;
use crate::run::metrics::{self, Readout};
use crate::runtime::{self, Device, Runs};

pub struct Gradients {
    session: Session,
    /// Hooks a pass may patch (the base runs' own patches, e.g. noised embeddings).
    pub patchable: Vec<(String, Vec<Dim>)>,
    /// Hooks whose values and gradients a run returns.
    pub hooks: Vec<(String, Vec<Dim>)>,
    /// The graph tensor of each hook (after its patch: what the rest of the graph reads).
    tensors: Vec<String>,
    vocab: usize,
    config: ModelConfig,
    /// With GradDrop gates: the number of layers whose residual writes a pass can drop.
    droppable_layers: Option<usize>,
}

/// What one backward pass starts from: dM/d(logits) at the final position (vocabulary-sized),
/// and the layer, if any, whose residual-stream write the gradient does not flow back through
/// (AtP*'s GradDrop; the forward pass is unchanged).
pub struct Seed {
    pub d_logits: Vec<f32>,
    pub dropped_layer: Option<usize>,
}

/// What one pass returns: its logits at the final position, and per hook its value and the
/// gradient of the seeded metric there, both unpadded.
pub struct Run {
    pub logits: Vec<f32>,
    pub values: Vec<Tensor>,
    pub gradients: Vec<Tensor>,
}

impl Gradients {
    /// With `graddrop`, a pass can drop one layer's residual write from its backward pass.
    /// `runs`: how many runs the session will do (it prepacks weights only for many).
    pub fn new(
        dir: &ModelDir,
        patchable: &[String],
        hooks: &[String],
        graddrop: bool,
        runs: Runs,
        device: Device,
    ) -> Result<Gradients> {
        let manifest = &dir.manifest;
        let shape_of = |h: &String| -> Result<(String, Vec<Dim>)> {
            let hook = manifest.hooks.get(h).ok_or_else(|| anyhow!("the model has no hook `{h}`"))?;
            Ok((h.clone(), hook.shape.clone()))
        };
        let tensors: Vec<String> =
            hooks.iter().map(|h| graph::capture_output(manifest, patchable, h)).collect::<Result<_>>()?;
        let mut model = graph::load(manifest, &dir.path, patchable, hooks, graph::Unembed::LastPosition)?;
        let patchable_names = patchable;
        let patchable: Vec<(String, Vec<Dim>)> = patchable.iter().map(shape_of).collect::<Result<_>>()?;
        let shapes = probe_shapes(&model, dir, &patchable, device)?;
        let gates = if graddrop { add_layer_gates(&mut model, manifest, patchable_names)? } else { HashMap::new() };
        let forward_nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
        autodiff::append_backward(&mut model, graph::LAST_LOGITS, &tensors, &shapes, &gates)?;
        optional::make_backward_optional(&mut model, forward_nodes, RUN_BACKWARD_INPUT)?;
        Ok(Gradients {
            session: runtime::session_for_runs(&model, &dir.path, device, runs)?,
            patchable,
            hooks: hooks.iter().map(shape_of).collect::<Result<_>>()?,
            tensors,
            vocab: manifest.config.vocab_size,
            config: manifest.config.clone(),
            droppable_layers: graddrop.then_some(manifest.config.n_layers),
        })
    }

    /// The layers a pass can drop from its backward pass (GradDrop), if the session has gates.
    pub fn droppable_layers(&self) -> Option<usize> {
        self.droppable_layers
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// One forward and backward pass of `passes`, each from its seed (one per pass); without
    /// seeds, a forward pass (no gradients).
    pub fn run(&mut self, passes: &[Pass], seeds: Option<&[Seed]>) -> Result<Vec<Run>> {
        let (batch, mut inputs) = engine::inputs(&self.patchable, passes)?;
        let seed: Vec<f32> = match seeds {
            Some(seeds) => seeds.iter().flat_map(|s| s.d_logits.iter().copied()).collect(),
            None => vec![0.0; batch.batch * self.vocab],
        };
        if seed.len() != batch.batch * self.vocab {
            return Err(anyhow!("seeds of {} logits for {} passes", seed.len(), passes.len()));
        }
        let seed = OrtTensor::from_array((vec![batch.batch as i64, 1, self.vocab as i64], seed))?.into_dyn();
        inputs.push((autodiff::seed_input(graph::LAST_LOGITS), seed));
        let backward = OrtTensor::from_array((Vec::<i64>::new(), vec![seeds.is_some()]))?.into_dyn();
        inputs.push((RUN_BACKWARD_INPUT.to_string(), backward));
        let dropped = |p: usize| seeds.and_then(|s| s[p].dropped_layer);
        match self.droppable_layers {
            Some(layers) => {
                let keep: Vec<f32> = (0..passes.len())
                    .flat_map(|p| (0..layers).map(move |l| if dropped(p) == Some(l) { 0.0 } else { 1.0 }))
                    .collect();
                let keep = OrtTensor::from_array((vec![passes.len() as i64, layers as i64], keep))?.into_dyn();
                inputs.push((KEEP_INPUT.to_string(), keep));
            }
            None if (0..passes.len()).any(|p| dropped(p).is_some()) => {
                return Err(anyhow!("a pass drops a layer's gradient, but the session has no GradDrop gates"))
            }
            None => {}
        }
        let result = self.session.run(inputs).map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
        let extract = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let value = result.get(name).ok_or_else(|| anyhow!("the graph has no output `{name}`"))?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| anyhow!("output `{name}`: {e}"))?;
            Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
        };
        let (_, logits) = extract(graph::LAST_LOGITS)?;
        let mut runs: Vec<Run> =
            logits.chunks(self.vocab).map(|l| Run { logits: l.to_vec(), values: vec![], gradients: vec![] }).collect();
        for ((_, dims), tensor) in self.hooks.iter().zip(&self.tensors) {
            let (shape, data) = extract(tensor)?;
            for (run, t) in runs.iter_mut().zip(engine::unpad(&data, &shape, dims, passes)) {
                run.values.push(t);
            }
            if seeds.is_some() {
                let (shape, data) = extract(&autodiff::gradient_output(tensor))?;
                for (run, t) in runs.iter_mut().zip(engine::unpad(&data, &shape, dims, passes)) {
                    run.gradients.push(t);
                }
            }
        }
        Ok(runs)
    }
}

/// The scalar bool input saying whether a run computes the backward pass at all.
const RUN_BACKWARD_INPUT: &str = "backward.run";

/// The `[batch, layers]` input saying, per pass, which layers' residual writes the gradient
/// flows back through (1) or not (0).
const KEEP_INPUT: &str = "graddrop.keep";

/// A gate per layer on its residual-stream writes (attention and MLP outputs, as the residual
/// adds read them): row b of [`KEEP_INPUT`]'s column l, shaped `[batch, 1, 1]`.
fn add_layer_gates(
    model: &mut ModelProto,
    manifest: &crate::model::Manifest,
    patchable: &[String],
) -> Result<HashMap<String, String>> {
    use crate::onnx::writer::{attr_int, float_of_any_shape, Graph};
    let mut gates = HashMap::new();
    let mut g = Graph::new("graddrop");
    let axes = g.const_i64("graddrop.axes", &[1, 2]);
    for l in 0..manifest.config.n_layers {
        let index = g.scalar_i64(&format!("graddrop.layer{l}"), l as i64);
        let column = g.op("graddrop", "Gather", &[KEEP_INPUT, &index], vec![attr_int("axis", 1)]);
        let gate = g.op_named("Unsqueeze", &[&column, &axes], &format!("graddrop.gate{l}"), vec![]);
        for hook in ["hook_attn_out", "hook_mlp_out"] {
            gates.insert(graph::capture_output(manifest, patchable, &format!("blocks.{l}.{hook}"))?, gate.clone());
        }
    }
    let m = model.graph.as_mut().ok_or_else(|| anyhow!("ONNX model has no graph"))?;
    m.input.push(float_of_any_shape(KEEP_INPUT));
    m.node.extend(g.proto.node);
    m.initializer.extend(g.proto.initializer);
    Ok(gates)
}

/// Whether a metric's dM/d(logits) is the same whatever the logits (a logit difference's), so
/// it is known before the run it is taken at.
pub fn constant_gradient(kind: MetricKind) -> bool {
    kind == MetricKind::LogitDiff
}

/// dM/d(logits) of a logit difference over a vocabulary of `vocab`: +1 at the answers, -1 at
/// the wrong answers.
pub fn logit_diff_gradient(vocab: usize, r: &Readout) -> Vec<f64> {
    let mut d = vec![0.0; vocab];
    r.answer.iter().for_each(|&i| d[i as usize] += 1.0);
    r.wrong
        .as_deref()
        .expect("the checker requires `wrong` for this metric")
        .iter()
        .for_each(|&i| d[i as usize] -= 1.0);
    d
}

/// dM/d(logits) of a metric at the final position, in f64 (see [`metrics::value`]); `logits`
/// are the whole vocabulary's.
pub fn metric_gradient(kind: MetricKind, logits: &[f32], r: &Readout) -> Vec<f64> {
    // The probabilities, which every metric but a logit difference's gradient reads.
    let p: Vec<f64> = match kind {
        MetricKind::LogitDiff => vec![],
        _ => metrics::log_probs(logits).iter().map(|lp| lp.exp()).collect(),
    };
    let wrong = || r.wrong.as_deref().expect("the checker requires `wrong` for this metric");
    // d P(set) / dz_j = p_j [j in set] - P(set) p_j
    let d_prob = |ids: &[u32]| -> Vec<f64> {
        let set: f64 = ids.iter().map(|&i| p[i as usize]).sum();
        let mut d: Vec<f64> = p.iter().map(|&pj| -set * pj).collect();
        for &i in ids {
            d[i as usize] += p[i as usize];
        }
        d
    };
    match kind {
        MetricKind::LogitDiff => logit_diff_gradient(logits.len(), r),
        MetricKind::Prob => d_prob(&r.answer),
        MetricKind::ProbDiff => d_prob(&r.answer).iter().zip(d_prob(wrong())).map(|(a, b)| a - b).collect(),
        // d log P(set) / dz_j = p_j [j in set] / P(set) - p_j
        MetricKind::LogProb => {
            let set: f64 = r.answer.iter().map(|&i| p[i as usize]).sum();
            let mut d: Vec<f64> = p.iter().map(|&pj| -pj).collect();
            for &i in &r.answer {
                d[i as usize] += p[i as usize] / set;
            }
            d
        }
        // M = sum_i P_clean,i log q_i + const: dM/dz_j = P_clean,j - q_j sum_i P_clean,i
        MetricKind::Kl => {
            let clean: Vec<f64> = r.clean_log_probs.iter().map(|lp| lp.exp()).collect();
            let mass: f64 = clean.iter().sum();
            clean.iter().zip(&p).map(|(c, q)| c - q * mass).collect()
        }
    }
}

/// Every float tensor's shape in one run of `model` on a probe batch (2 prompts of 3 tokens,
/// so no dynamic axis has size 1): what the backward pass needs to undo broadcasting.
fn probe_shapes(
    model: &ModelProto,
    dir: &ModelDir,
    patchable: &[(String, Vec<Dim>)],
    device: Device,
) -> Result<HashMap<String, Vec<i64>>> {
    let g = model.graph.as_ref().ok_or_else(|| anyhow!("ONNX model has no graph"))?;
    let floats: HashSet<String> =
        optional::element_types(g).into_iter().filter(|(_, t)| *t == data_type::FLOAT).map(|(name, _)| name).collect();
    let mut probe = model.clone();
    let pg = probe.graph.as_mut().expect("cloned with its graph");
    let existing: HashSet<String> = pg.output.iter().map(|o| o.name.clone()).collect();
    for n in &g.node {
        for o in n.output.iter().filter(|o| floats.contains(o.as_str()) && !existing.contains(*o)) {
            pg.output.push(crate::onnx::writer::float_of_any_shape(o));
        }
    }
    let mut session = runtime::session_for_runs(&probe, &dir.path, device, Runs::One)?;
    let passes: Vec<Pass> = (0..2).map(|_| Pass { ids: vec![0, 1, 2], patches: vec![] }).collect();
    let (_, inputs) = engine::inputs(patchable, &passes)?;
    let result = session.run(inputs).map_err(|e| anyhow!("ONNX Runtime run failed (shape probe): {e}"))?;
    let mut shapes = HashMap::new();
    for (name, value) in result.iter() {
        if let Ok((shape, _)) = value.try_extract_tensor::<f32>() {
            shapes.insert(name.to_string(), shape.iter().copied().collect());
        }
    }
    Ok(shapes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric kind's gradient against central differences of [`metrics::value`].
    #[test]
    fn metric_gradients_match_finite_differences() {
        let logits: Vec<f32> = (0..7).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.4).collect();
        let clean = metrics::log_probs(&[0.3, -0.2, 0.5, 0.0, 0.1, -0.4, 0.2]);
        let r = Readout { answer: vec![2, 4], wrong: Some(vec![1]), clean_log_probs: &clean };
        let value = |kind, z: &[f32]| {
            metrics::value(kind, &crate::run::readout::Logits::vocabulary(z.to_vec()), &metrics::log_probs(z), &r)
        };
        for (name, kind) in MetricKind::ALL {
            let analytic = metric_gradient(kind, &logits, &r);
            for j in 0..logits.len() {
                let eps = 1e-3f32;
                let moved = |d: f32| {
                    let mut z = logits.clone();
                    z[j] += d;
                    value(kind, &z)
                };
                let numeric = (moved(eps) - moved(-eps)) / (2.0 * eps as f64);
                assert!(
                    (numeric - analytic[j]).abs() < 1e-3 * (1.0 + analytic[j].abs()),
                    "{name} logit {j}: {} vs {numeric}",
                    analytic[j]
                );
            }
        }
    }
}
