//! The graph the engine runs: the model directory's own `model.onnx`, changed by surgery so that
//! any hook can be overwritten per batch row, only the final position is unembedded, and
//! (optionally) hooks are exposed as outputs.
//!
//! Patching: for every patchable hook `H`, consumers of `H` read
//! `Where(patch_mask.H, patch_value.H, H)` instead, with `patch_mask.H` (bool) and
//! `patch_value.H` (f32) new graph inputs that broadcast against `H`. A call that does not patch
//! `H` feeds a single `false` and a single `0`, so the selection is a no-op on the real tensor.
//! `Where` selects, so a patched value is copied bit for bit (no arithmetic on it).

use anyhow::{anyhow, bail, Result};

use crate::model::{Dim, Manifest};
use crate::onnx::proto::{data_type, ModelProto, NodeProto, TypeProto, TypeProtoTensor, ValueInfoProto};
use crate::onnx::surgery;

pub const LAST_LOGITS: &str = "patchbay.last_logits";
/// The final residual stream at the last position, which the unembedding reads.
pub const LAST_RESID: &str = "patchbay.last_resid";

/// The tensor a captured hook is read from, itself a graph output (an intermediate tensor made an
/// output is handed over without a copy). A patched hook is captured after its patch: what the
/// rest of the graph saw.
pub fn capture_output(manifest: &Manifest, patchable: &[String], hook: &str) -> Result<String> {
    if patchable.iter().any(|h| h == hook) {
        return Ok(patched(hook));
    }
    Ok(manifest.hooks.get(hook).ok_or_else(|| anyhow!("the manifest has no hook `{hook}`"))?.tensor.clone())
}

/// The value of a patchable hook after its patch.
fn patched(hook: &str) -> String {
    format!("patchbay.patched.{hook}")
}

pub fn mask_input(hook: &str) -> String {
    format!("patch_mask.{hook}")
}

pub fn value_input(hook: &str) -> String {
    format!("patch_value.{hook}")
}

/// Which positions a graph unembeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unembed {
    /// The final position only, the one the metrics read.
    LastPosition,
    /// Every position, as peer libraries' forward passes do (for benchmarks).
    EveryPosition,
}

/// Build the engine's graph from `model.onnx`.
///
/// - `patchable`: hooks that get `patch_mask`/`patch_value` inputs;
/// - `captured`: hooks exposed as outputs (their values after patching);
/// - the logits as `LAST_LOGITS`: `[batch, 1, vocab]`, or `[batch, pos, vocab]` when `unembed`
///   is every position.
pub fn build(
    model: ModelProto,
    manifest: &Manifest,
    patchable: &[String],
    captured: &[String],
    unembed: Unembed,
) -> Result<ModelProto> {
    let mut model = model;
    let graph = model.graph.as_mut().ok_or_else(|| anyhow!("ONNX model has no graph"))?;

    let n_layers = manifest.config.n_layers;
    let final_resid = &manifest
        .hooks
        .get(&format!("blocks.{}.hook_resid_post", n_layers.saturating_sub(1)))
        .ok_or_else(|| anyhow!("the manifest maps no final `hook_resid_post`"))?
        .tensor;
    // Unembed only the last position: everything after the last residual stream acts per
    // position (final norm, unembedding), so slicing before it changes nothing else.
    if unembed == Unembed::LastPosition {
        let last_resid = LAST_RESID.to_string();
        rewire(graph, final_resid, &last_resid);
        graph.initializer.push(crate::onnx::proto::TensorProto {
            dims: vec![1],
            data_type: data_type::INT64,
            name: "patchbay.last_index".into(),
            raw_data: (-1i64).to_le_bytes().to_vec(),
            ..Default::default()
        });
        graph.node.push(node("Gather", &[final_resid, "patchbay.last_index"], &last_resid, Some(1)));
    }
    graph.output.retain(|o| o.name != manifest.logits);
    graph.output.push(tensor_info(LAST_LOGITS, data_type::FLOAT, &[]));
    graph.node.push(node("Identity", &[&manifest.logits], LAST_LOGITS, None));

    for hook in patchable {
        let spec = manifest.hooks.get(hook).ok_or_else(|| anyhow!("the manifest has no hook `{hook}`"))?;
        let tensor = &spec.tensor;
        let patched = patched(hook);
        rewire(graph, tensor, &patched);
        let (mask, value) = (mask_input(hook), value_input(hook));
        graph.input.push(tensor_info(&mask, data_type::BOOL, &spec.shape));
        graph.input.push(tensor_info(&value, data_type::FLOAT, &spec.shape));
        graph.node.push(node("Where", &[&mask, &value, tensor], &patched, None));
    }
    for hook in captured {
        let name = capture_output(manifest, patchable, hook)?;
        // Two hooks may name one tensor.
        if !graph.output.iter().any(|o| o.name == name) {
            graph.output.push(tensor_info(&name, data_type::FLOAT, &[]));
        }
    }
    // Nodes must stay topologically sorted: move every node after the producers of its inputs.
    sort_topologically(graph)?;
    Ok(model)
}

pub fn load(
    manifest: &Manifest,
    dir: &std::path::Path,
    patchable: &[String],
    captured: &[String],
    unembed: Unembed,
) -> Result<ModelProto> {
    let model = surgery::load(&dir.join(crate::model::ONNX_FILE))?;
    build(model, manifest, patchable, captured, unembed)
}

/// Every consumer of `from` reads `to` instead (graph outputs keep `from`).
fn rewire(graph: &mut crate::onnx::proto::GraphProto, from: &str, to: &str) {
    for n in &mut graph.node {
        for input in &mut n.input {
            if input == from {
                *input = to.to_string();
            }
        }
    }
}

fn node(op: &str, inputs: &[&str], output: &str, axis: Option<i64>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: format!("patchbay:{op}:{output}"),
        op_type: op.into(),
        attribute: axis.map(|a| crate::onnx::writer::attr_int("axis", a)).into_iter().collect(),
        ..Default::default()
    }
}

/// A tensor value-info; an empty `shape` leaves the shape open. Input axes are all symbolic,
/// so a call may feed size 1 on any of them (broadcasting).
fn tensor_info(name: &str, elem_type: i32, shape: &[Dim]) -> ValueInfoProto {
    let dims: Vec<Dim> = (0..shape.len()).map(|i| Dim::Symbolic(format!("{name}.d{i}"))).collect();
    let mut info = crate::onnx::writer::value_info(name, elem_type, &dims);
    if shape.is_empty() {
        info.r#type = Some(TypeProto { tensor_type: Some(TypeProtoTensor { elem_type, shape: None }) });
    }
    info
}

pub(crate) fn sort_topologically(graph: &mut crate::onnx::proto::GraphProto) -> Result<()> {
    use std::collections::HashSet;
    let mut available: HashSet<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    available.extend(graph.initializer.iter().map(|t| t.name.clone()));
    available.insert(String::new()); // optional inputs
    let mut pending: Vec<NodeProto> = std::mem::take(&mut graph.node);
    let mut sorted = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = Vec::with_capacity(pending.len());
        for n in pending {
            if n.input.iter().all(|i| available.contains(i)) {
                available.extend(n.output.iter().cloned());
                sorted.push(n);
            } else {
                rest.push(n);
            }
        }
        pending = rest;
        if pending.len() == before {
            bail!("the patched graph has a cycle or an undefined input at `{}`", pending[0].name);
        }
    }
    graph.node = sorted;
    Ok(())
}
