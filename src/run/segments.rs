//! The fast path's model: the patchable graph ([`graph::build`]) cut at the residual stream
//! between layers into segments (embedding, one per layer, unembedding), one ONNX Runtime
//! session each. Each weight lives in exactly one segment, so the sessions together hold the
//! weights once.
//!
//! A pass that patches nothing before layer L **starts late**: it enters at layer L's segment
//! with the residual stream its base run had there (cached when the base run was made), and
//! skips every earlier layer. In one call, passes join as the call reaches their start layer,
//! so even a pass that recomputes only the last layers rides in a full batch.

use std::collections::HashSet;

use anyhow::{anyhow, Result};
use ort::session::Session;
use ort::value::Tensor as OrtTensor;

use crate::import::checkpoint::Tensor;
use crate::model::{Dim, ModelDir};
use crate::onnx::proto::{data_type, GraphProto, ModelProto};
use crate::run::engine::{align_right, concrete, crop_right, HookPatch, Output};
use crate::run::graph;
use crate::runtime::{self, Batch, Device};

/// One pass through the segments.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    /// Patches on hooks in segments `start..`; patches before `start` are ignored (their effect
    /// is in `resid`).
    pub patches: Vec<HookPatch>,
    /// The segment the pass enters at (0 = embedding, `L + 1` = layer L).
    pub start: usize,
    /// The residual stream entering segment `start` (`[len, d_model]`), for `start > 0`.
    pub resid: Option<std::sync::Arc<Tensor>>,
}

struct Segment {
    session: Session,
    /// Graph inputs of the segment among `input_ids`, `position_ids`, `attention_mask`.
    token_inputs: Vec<String>,
    /// Indices (into `patchable`) of the hooks patched in this segment.
    patched: Vec<usize>,
    /// Indices of the hooks captured in this segment, with their output names.
    captured: Vec<(usize, String)>,
    /// The boundary tensor it reads (none for the embedding) and writes (none for the last).
    input: Option<String>,
    output: String,
}

pub struct Segments {
    segments: Vec<Segment>,
    pub patchable: Vec<(String, Vec<Dim>)>,
    d_model: usize,
}

/// The segment a hook lives in: 0 for layer-less hooks (embeddings), `L + 1` for `blocks.L.*`.
pub fn segment_of(hook: &str) -> usize {
    hook.strip_prefix("blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|l| l.parse::<usize>().ok())
        .map_or(0, |l| l + 1)
}

impl Segments {
    /// `hooks` are patchable and captured.
    pub fn new(dir: &ModelDir, hooks: &[String], device: Device) -> Result<Segments> {
        let manifest = &dir.manifest;
        let full = graph::load(manifest, &dir.path, hooks, hooks)?;
        let g = full.graph.as_ref().expect("graph::build keeps the graph");
        let n = manifest.config.n_layers;
        let tensor = |hook: String| -> Result<String> {
            Ok(manifest.hooks.get(&hook).ok_or_else(|| anyhow!("the manifest has no hook `{hook}`"))?.tensor.clone())
        };
        // Boundary k is the residual stream entering segment k + 1: resid_pre of layer k, and
        // after the last layer whatever the unembedding reads.
        let mut boundaries: Vec<String> =
            (0..n).map(|l| tensor(format!("blocks.{l}.hook_resid_pre"))).collect::<Result<_>>()?;
        let last = g
            .node
            .iter()
            .find(|node| node.output.iter().any(|o| o == graph::LAST_RESID))
            .map(|node| node.input[0].clone())
            .ok_or_else(|| anyhow!("the patchable graph has no final slice"))?;
        boundaries.push(last);
        let patchable: Vec<(String, Vec<Dim>)> = hooks
            .iter()
            .map(|h| Ok((h.clone(), manifest.hooks.get(h).ok_or_else(|| anyhow!("no hook `{h}`"))?.shape.clone())))
            .collect::<Result<_>>()?;
        let mut segments = vec![];
        for k in 0..=n + 1 {
            let input = (k > 0).then(|| boundaries[k - 1].clone());
            let output = if k <= n { boundaries[k].clone() } else { graph::LAST_LOGITS.to_string() };
            let patched: Vec<usize> = (0..hooks.len()).filter(|&i| k <= n && segment_of(&hooks[i]) == k).collect();
            let captured: Vec<(usize, String)> =
                patched.iter().map(|&i| (i, graph::capture_output(&hooks[i]))).collect();
            let mut outputs = vec![output.clone()];
            outputs.extend(captured.iter().map(|(_, o)| o.clone()));
            let model = extract(&full, input.as_deref(), &outputs, manifest.config.d_model)?;
            let graph_inputs: HashSet<&str> =
                model.graph.as_ref().expect("extract keeps the graph").input.iter().map(|i| i.name.as_str()).collect();
            let token_inputs = crate::onnx::build::INPUTS
                .iter()
                .filter(|i| graph_inputs.contains(*i))
                .map(|s| s.to_string())
                .collect();
            let session = runtime::session_from_proto(&model, &dir.path, device)?;
            segments.push(Segment { session, token_inputs, patched, captured, input, output });
        }
        Ok(Segments { segments, patchable, d_model: manifest.config.d_model })
    }

    /// The number of segments (embedding, layers, unembedding).
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Run `rows` as one call: each enters at its `start` segment.
    pub fn run(&mut self, rows: &[Row], capture: bool) -> Result<Vec<Output>> {
        // Rows in order of their start: the active rows are always a prefix of this order.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].start);
        let sequences: Vec<Vec<u32>> = order.iter().map(|&i| rows[i].ids.clone()).collect();
        let batch = Batch::new(&sequences);
        let pos = batch.pos;
        let d = self.d_model;
        let no_captures = if capture { self.patchable.len() } else { 0 };
        let mut outputs: Vec<Output> = rows
            .iter()
            .map(|_| Output {
                logits: vec![],
                captures: vec![Tensor::new(vec![0], vec![]); no_captures],
                boundaries: vec![],
            })
            .collect();
        let mut resid: Vec<f32> = vec![];
        let mut active = 0;
        let first = rows.iter().map(|r| r.start).min().unwrap_or(0);
        let n_segments = self.segments.len();
        for k in first..n_segments {
            // Rows starting here join with their cached residual stream.
            while active < order.len() && rows[order[active]].start <= k {
                let row = &rows[order[active]];
                if k > 0 {
                    let cached = row
                        .resid
                        .as_ref()
                        .ok_or_else(|| anyhow!("a pass starting at segment {k} has no residual stream"))?;
                    let mut padded = vec![0f32; pos * d];
                    align_right(&mut padded, &[pos, d], &cached.data, &cached.shape, |x, s| *x = s);
                    resid.extend(padded);
                }
                active += 1;
            }
            let b = active;
            let segment = &mut self.segments[k];
            let mut inputs: Vec<(String, ort::value::DynValue)> = vec![];
            let tokens = |data: &[i64]| OrtTensor::from_array((vec![b as i64, pos as i64], data[..b * pos].to_vec()));
            for name in &segment.token_inputs {
                let data = match name.as_str() {
                    "input_ids" => &batch.input_ids,
                    "position_ids" => &batch.position_ids,
                    _ => &batch.attention_mask,
                };
                inputs.push((name.clone(), tokens(data)?.into_dyn()));
            }
            if let Some(input) = &segment.input {
                inputs.push((
                    input.clone(),
                    OrtTensor::from_array((vec![b as i64, pos as i64, d as i64], resid.clone()))?.into_dyn(),
                ));
            }
            for &h in &segment.patched {
                let dims = &self.patchable[h].1;
                let patched_rows: Vec<(usize, &HookPatch)> = order[..b]
                    .iter()
                    .enumerate()
                    .flat_map(|(slot, &i)| rows[i].patches.iter().filter(|p| p.hook == h).map(move |p| (slot, p)))
                    .collect();
                let (mask, value) = if patched_rows.is_empty() {
                    let ones = vec![1i64; dims.len()];
                    (
                        OrtTensor::from_array((ones.clone(), vec![false]))?.into_dyn(),
                        OrtTensor::from_array((ones, vec![0f32]))?.into_dyn(),
                    )
                } else {
                    let padded = concrete(dims, Some(b), pos);
                    let row_len: usize = padded[1..].iter().product();
                    let mut mask = vec![false; b * row_len];
                    let mut value = vec![0f32; b * row_len];
                    for (slot, patch) in patched_rows {
                        let own = concrete(dims, None, rows[order[slot]].ids.len());
                        let at = slot * row_len;
                        align_right(&mut mask[at..at + row_len], &padded[1..], &patch.mask, &own, |x, s| *x = *x || s);
                        align_right(&mut value[at..at + row_len], &padded[1..], &patch.value, &own, |x, s| *x = s);
                    }
                    let shape: Vec<i64> = padded.iter().map(|&x| x as i64).collect();
                    (
                        OrtTensor::from_array((shape.clone(), mask))?.into_dyn(),
                        OrtTensor::from_array((shape, value))?.into_dyn(),
                    )
                };
                inputs.push((graph::mask_input(&self.patchable[h].0), mask));
                inputs.push((graph::value_input(&self.patchable[h].0), value));
            }
            let result = segment.session.run(inputs).map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
            let extract = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
                let value = result.get(name).ok_or_else(|| anyhow!("the segment has no output `{name}`"))?;
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| anyhow!("output `{name}`: {e}"))?;
                Ok((shape.iter().map(|&x| x as usize).collect(), data.to_vec()))
            };
            let (shape, data) = extract(&segment.output)?;
            if k + 1 == n_segments {
                let vocab = *shape.last().expect("logits have a vocabulary axis");
                for (slot, &i) in order[..b].iter().enumerate() {
                    outputs[i].logits = data[slot * vocab..(slot + 1) * vocab].to_vec();
                }
                break;
            }
            if capture {
                for &(h, ref name) in &segment.captured {
                    let (shape, data) = extract(name)?;
                    let row_len: usize = shape[1..].iter().product();
                    for (slot, &i) in order[..b].iter().enumerate() {
                        let own = concrete(&self.patchable[h].1, None, rows[i].ids.len());
                        let mut unpadded = vec![0f32; own.iter().product()];
                        crop_right(&mut unpadded, &own, &data[slot * row_len..(slot + 1) * row_len], &shape[1..]);
                        outputs[i].captures[h] = Tensor::new(own, unpadded);
                    }
                }
                for (slot, &i) in order[..b].iter().enumerate() {
                    let len = rows[i].ids.len();
                    let mut unpadded = vec![0f32; len * d];
                    crop_right(&mut unpadded, &[len, d], &data[slot * pos * d..(slot + 1) * pos * d], &[pos, d]);
                    outputs[i].boundaries.push(std::sync::Arc::new(Tensor::new(vec![len, d], unpadded)));
                }
            }
            resid = data;
        }
        Ok(outputs)
    }
}

/// The part of `model` that computes `outputs` from `input` (a tensor made a graph input, of
/// shape `[batch, pos, d_model]`) and the graph's own inputs. Nodes stay in topological order.
fn extract(model: &ModelProto, input: Option<&str>, outputs: &[String], d_model: usize) -> Result<ModelProto> {
    let g = model.graph.as_ref().ok_or_else(|| anyhow!("ONNX model has no graph"))?;
    let mut needed: HashSet<String> = outputs.iter().cloned().collect();
    let mut keep = vec![false; g.node.len()];
    for (i, node) in g.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o) && Some(o.as_str()) != input) {
            keep[i] = true;
            needed.extend(node.input.iter().filter(|x| Some(x.as_str()) != input).cloned());
        }
    }
    let mut graph = GraphProto {
        name: g.name.clone(),
        node: g.node.iter().zip(&keep).filter(|(_, k)| **k).map(|(n, _)| n.clone()).collect(),
        initializer: g.initializer.iter().filter(|t| needed.contains(&t.name)).cloned().collect(),
        input: g.input.iter().filter(|i| needed.contains(&i.name)).cloned().collect(),
        ..Default::default()
    };
    if let Some(input) = input {
        let dims = [Dim::Symbolic("batch".into()), Dim::Symbolic("pos".into()), Dim::Fixed(d_model)];
        graph.input.push(crate::onnx::writer::value_info(input, data_type::FLOAT, &dims));
    }
    for name in outputs {
        graph.output.push(crate::onnx::proto::ValueInfoProto {
            name: name.clone(),
            r#type: Some(crate::onnx::proto::TypeProto {
                tensor_type: Some(crate::onnx::proto::TypeProtoTensor { elem_type: data_type::FLOAT, shape: None }),
            }),
        });
    }
    Ok(ModelProto { graph: Some(graph), ..model.clone() })
}
