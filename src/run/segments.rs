//! The fast path's model: the patchable graph ([`graph::build`]) cut at the residual stream
//! between layers into segments (embedding, one per layer, unembedding), one ONNX Runtime
//! session each. Each weight lives in exactly one segment, so the sessions together hold the
//! weights once, but for the last layer's: patched calls run a second session of it that
//! computes its MLP at the final position only (see [`readout::last_position_after`]).
//!
//! A pass that patches nothing before layer L **starts late**: it enters at layer L's segment
//! with the residual stream its base run had there (cached when the base run was made), and
//! skips every earlier layer. In one call, passes join as the call reaches their start layer,
//! so even a pass that recomputes only the last layers rides in a full batch.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor};

use crate::model::checkpoint::Tensor;
use crate::model::{Dim, ModelDir};
use crate::onnx::proto::{data_type, GraphProto, ModelProto};
use crate::run::cache::{BaseCache, BaseRun, CacheOps};
use crate::run::engine::{align_right, concrete, crop_right, HookPatch, Output};
use crate::run::graph;
use crate::run::readout::{self, Logits};
use crate::run::suffix::{make_suffix, prefix_input, suffix_axes, PREFIX_END, PREFIX_ROWS, PREFIX_START};
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
    /// The first position whose activations differ from the base run's (0 for a run of its
    /// own): in suffix mode, earlier positions are not recomputed.
    pub from: usize,
    /// The base run, by its index in the cache ([`Segments::keep_bases`]): its residual stream
    /// entering segment `start`, and its keys and values at the positions before `from`.
    /// `None` for a run of its own (`start` and `from` 0).
    pub base: Option<usize>,
}

struct Segment {
    session: Session,
    /// The last layer's segment for patched calls, computing its MLP at the final position
    /// only (see [`readout::last_position_after`]); capturing calls need every position.
    final_position_only: Option<Session>,
    /// A patched (non-capturing) call asks for the segment's main output only: the captures
    /// (every layer's keys and values) would be copied out for nothing.
    main_output_only: RunOptions<HasSelectedOutputs>,
    /// Graph inputs of the segment among `input_ids`, `position_ids`, `attention_mask`.
    token_inputs: Vec<String>,
    /// Indices (into `patchable`) of the hooks patched in this segment.
    patched: Vec<usize>,
    /// Indices of the hooks captured in this segment, with their output names.
    captured: Vec<(usize, String)>,
    /// The boundary tensor it reads (none for the embedding) and writes (none for the last).
    input: Option<String>,
    output: String,
    /// Suffix mode: the key and value hooks (indices into `captured`) whose prefix is an
    /// input, with that input's name.
    prefix: Option<[(usize, String); 2]>,
}

pub struct Segments {
    segments: Vec<Segment>,
    pub patchable: Vec<(String, Vec<Dim>)>,
    /// Captured hooks: the patchable ones, then every layer's keys and values (the prefix a
    /// suffix pass reads from its base run).
    pub captured: Vec<(String, Vec<Dim>)>,
    /// Whether layer segments compute only the positions from the first changed one on.
    pub suffix: bool,
    /// The tokens the unembedding computes logits for (`None`: the whole vocabulary).
    reads: Option<Arc<[u32]>>,
    d_model: usize,
    device: Device,
    cache_ops: CacheOps,
    /// The base runs of the variant being patched, on the device.
    cache: Option<BaseCache>,
    /// A zero prefix for calls that compute every position (no base run's keys and values).
    no_prefix: [DynValue; 2],
}

/// The segment a hook lives in: 0 for layer-less hooks (embeddings), `L + 1` for `blocks.L.*`.
pub fn segment_of(hook: &str) -> usize {
    hook.strip_prefix("blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|l| l.parse::<usize>().ok())
        .map_or(0, |l| l + 1)
}

impl Segments {
    /// `hooks` are patchable; they and every layer's keys and values are captured. With
    /// `tokens`, every call returns the logits of those tokens only (see [`readout`]), when the
    /// graph's unembedding allows it.
    pub fn new(dir: &ModelDir, hooks: &[String], device: Device, tokens: Option<&[u32]>) -> Result<Segments> {
        let manifest = &dir.manifest;
        let mut captured_names: Vec<String> = hooks.to_vec();
        for l in 0..manifest.config.n_layers {
            for kv in ["hook_k", "hook_v"] {
                let name = format!("blocks.{l}.attn.{kv}");
                if !captured_names.contains(&name) && manifest.hooks.contains_key(&name) {
                    captured_names.push(name);
                }
            }
        }
        let full = graph::load(manifest, &dir.path, hooks, &captured_names, graph::Unembed::LastPosition)?;
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
        let shapes = |names: &[String]| -> Result<Vec<(String, Vec<Dim>)>> {
            names
                .iter()
                .map(|h| Ok((h.clone(), manifest.hooks.get(h).ok_or_else(|| anyhow!("no hook `{h}`"))?.shape.clone())))
                .collect()
        };
        let (patchable, captured) = (shapes(hooks)?, shapes(&captured_names)?);
        let mut reads: Option<Arc<[u32]>> = tokens.map(|t| {
            let mut sorted = t.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            sorted.into()
        });
        let mut parts = vec![];
        for k in 0..=n + 1 {
            let input = (k > 0).then(|| boundaries[k - 1].clone());
            let mut output = if k <= n { boundaries[k].clone() } else { graph::LAST_LOGITS.to_string() };
            let patched: Vec<usize> = (0..hooks.len()).filter(|&i| k <= n && segment_of(&hooks[i]) == k).collect();
            let captures: Vec<(usize, String)> = (0..captured_names.len())
                .filter(|&i| k <= n && segment_of(&captured_names[i]) == k)
                .map(|i| Ok((i, graph::capture_output(manifest, hooks, &captured_names[i])?)))
                .collect::<Result<_>>()?;
            let mut outputs = vec![output.clone()];
            outputs.extend(captures.iter().map(|(_, o)| o.clone()));
            let mut model = extract(&full, input.as_deref(), &outputs, manifest.config.d_model)?;
            if let (true, Some(tokens)) = (k == n + 1, &reads) {
                match readout::read_tokens(&mut model, &output, tokens, manifest.config.vocab_size) {
                    Some(read) => output = read,
                    None => reads = None,
                }
            }
            parts.push((model, input, output, patched, captures));
        }
        // Suffix mode needs every layer segment to be converted; otherwise none is.
        let mut suffix_models = vec![];
        for (k, (model, input, ..)) in parts.iter().enumerate() {
            if (1..=n).contains(&k) {
                let mut m = model.clone();
                if make_suffix(&mut m, manifest, k - 1, input.as_deref().expect("layer segments have inputs")) {
                    suffix_models.push(Some(m));
                    continue;
                }
                suffix_models.clear();
                break;
            }
            suffix_models.push(None);
        }
        let suffix = suffix_models.len() == parts.len();
        let mut segments = vec![];
        for (k, (model, input, output, patched, captures)) in parts.into_iter().enumerate() {
            let model = if suffix { suffix_models[k].take().unwrap_or(model) } else { model };
            let graph_inputs: HashSet<&str> =
                model.graph.as_ref().expect("extract keeps the graph").input.iter().map(|i| i.name.as_str()).collect();
            let token_inputs = crate::onnx::build::INPUTS
                .iter()
                .filter(|i| graph_inputs.contains(*i))
                .map(|s| s.to_string())
                .collect();
            let prefix = (suffix && (1..=n).contains(&k)).then(|| {
                let index = |kv: &str| {
                    let name = format!("blocks.{}.attn.{kv}", k - 1);
                    let i = captured.iter().position(|(h, _)| *h == name).expect("keys and values are captured");
                    (i, prefix_input(&manifest.hooks[&name].tensor))
                };
                [index("hook_k"), index("hook_v")]
            });
            let session = runtime::session_from_proto(&model, &dir.path, device)?;
            // The last layer's weights twice (one layer of n): its MLP on one position, not all.
            let final_position_only = match k == n && n > 0 {
                true => {
                    let resid_mid = graph::capture_output(manifest, hooks, &format!("blocks.{}.hook_resid_mid", n - 1));
                    let keep_whole: Vec<String> =
                        patched.iter().map(|&h| manifest.hooks[&hooks[h]].tensor.clone()).collect();
                    let mut tail = model.clone();
                    match resid_mid {
                        Ok(t) if readout::last_position_after(&mut tail, &t, &keep_whole) => {
                            Some(runtime::session_from_proto(&tail, &dir.path, device)?)
                        }
                        _ => None,
                    }
                }
                false => None,
            };
            let main_output_only = RunOptions::new()
                .map_err(|e| anyhow!("cannot create ONNX Runtime run options: {e}"))?
                .with_outputs(OutputSelector::no_default().with(output.clone()));
            segments.push(Segment {
                session,
                final_position_only,
                main_output_only,
                token_inputs,
                patched,
                captured: captures,
                input,
                output,
                prefix,
            });
        }
        let no_prefix = {
            let (heads, d_head) = (manifest.config.n_kv_heads, manifest.config.d_head);
            let zeros =
                || OrtTensor::from_array((vec![1i64, 1, heads as i64, d_head as i64], vec![0f32; heads * d_head]));
            [zeros()?.into_dyn(), zeros()?.into_dyn()]
        };
        Ok(Segments {
            segments,
            patchable,
            captured,
            suffix,
            reads,
            d_model: manifest.config.d_model,
            device,
            cache_ops: CacheOps::new(&dir.path, device)?,
            cache: None,
            no_prefix,
        })
    }

    /// Keep `bases` (the runs patched passes start from) on the device for the calls that
    /// follow; rows name them by index.
    pub fn keep_bases(&mut self, bases: Vec<BaseRun>) -> Result<()> {
        self.release_bases();
        let layers = self.segments.len() - 2;
        self.cache = Some(self.cache_ops.stack(bases, layers)?);
        Ok(())
    }

    /// Per layer, the indices (into [`Segments::captured`]) of its keys and values, which
    /// suffix segments read from the base runs; empty when segments compute every position.
    pub fn key_value_captures(&self) -> Vec<[usize; 2]> {
        self.segments.iter().filter_map(|s| s.prefix.as_ref().map(|[k, v]| [k.0, v.0])).collect()
    }

    /// Free the kept base runs (before the next variant's are made).
    pub fn release_bases(&mut self) {
        self.cache = None;
    }

    /// The tokens whose logits every call returns; `None` when it returns the whole vocabulary's.
    pub fn tokens_read(&self) -> Option<&[u32]> {
        self.reads.as_deref()
    }

    /// The positions a patched pass of a `len`-token prompt computes when its first changed
    /// position is `from`: from there to the end in suffix mode, else all.
    pub fn positions_computed(&self, len: usize, from: usize) -> usize {
        if self.suffix {
            len - from.min(len.saturating_sub(1))
        } else {
            len
        }
    }

    /// Whether patched calls compute the last layer's MLP at the final position only.
    pub fn final_position_only(&self) -> bool {
        self.segments.iter().any(|s| s.final_position_only.is_some())
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
        if rows.is_empty() {
            return Ok(vec![]);
        }
        // Rows in order of their start: the active rows are always a prefix of this order.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].start);
        let sequences: Vec<Vec<u32>> = order.iter().map(|&i| rows[i].ids.clone()).collect();
        let batch = Batch::new(&sequences);
        let pos = batch.pos;
        let d = self.d_model;
        // Positions computed: from the earliest changed one of any row to the end.
        let span = match capture {
            false => rows.iter().map(|r| self.positions_computed(r.ids.len(), r.from)).max().unwrap_or(pos),
            true => pos,
        };
        let no_captures = if capture { self.captured.len() } else { 0 };
        let mut outputs: Vec<Output> = rows
            .iter()
            .map(|_| Output {
                logits: Logits::default(),
                captures: vec![Tensor::new(vec![0], vec![]); no_captures],
                boundaries: vec![],
            })
            .collect();
        // The residual stream between segments, left where the segment that wrote it ran (on
        // the GPU with CUDA, so it never crosses to the host), but for the embedding's.
        let mut resid = Stream::Host(vec![]);
        let base_of_row: Vec<Option<usize>> = order.iter().map(|&i| rows[i].base).collect();
        if let Some(&i) = order.iter().find(|&&i| rows[i].base.is_none() && (rows[i].start > 0 || span < pos)) {
            return Err(anyhow!(
                "a pass entering at segment {} and computing {span} of {pos} positions has no base run",
                rows[i].start
            ));
        }
        let cache = self.cache.as_ref();
        let cached =
            |what: &str| cache.ok_or_else(|| anyhow!("a pass reads its base run's {what}, but no base runs are kept"));
        let mut active = 0;
        let first = rows.iter().map(|r| r.start).min().unwrap_or(0);
        let n_segments = self.segments.len();
        for k in first..n_segments {
            // Rows starting here join with their base run's residual stream, from the cache.
            let joined = active;
            while active < order.len() && rows[order[active]].start <= k {
                active += 1;
            }
            if k > 0 && active > joined {
                let cache = cached("residual stream")?;
                let running = match std::mem::replace(&mut resid, Stream::Host(vec![])) {
                    Stream::Host(host) => {
                        OrtTensor::from_array((vec![joined as i64, span as i64, d as i64], host))?.into_dyn()
                    }
                    Stream::Device(value) => value,
                };
                let picks = base_of_row[joined..active].iter().map(|b| b.expect("checked above") as i64).collect();
                resid = Stream::Device(self.cache_ops.join(running, &cache.resid[k - 1], cache.frame, picks, span)?);
            }
            let b = active;
            let segment = &mut self.segments[k];
            let mut inputs: Vec<(String, SessionInputValue)> = vec![];
            let tokens = |data: &[i64]| OrtTensor::from_array((vec![b as i64, pos as i64], data[..b * pos].to_vec()));
            for name in &segment.token_inputs {
                let data = match name.as_str() {
                    "input_ids" => &batch.input_ids,
                    "position_ids" => &batch.position_ids,
                    _ => &batch.attention_mask,
                };
                inputs.push((name.clone(), tokens(data)?.into_dyn().into()));
            }
            if let Some(input) = &segment.input {
                let value = match std::mem::replace(&mut resid, Stream::Host(vec![])) {
                    // `span` positions, or one after a final-position-only last layer.
                    Stream::Host(host) => {
                        OrtTensor::from_array((vec![b as i64, (host.len() / (b * d)) as i64, d as i64], host))?
                            .into_dyn()
                    }
                    Stream::Device(value) => value,
                };
                inputs.push((input.clone(), value.into()));
            }
            if let Some([(_, keys), (_, values)]) = &segment.prefix {
                // The positions before the span, from each row's base run (none when the span is
                // every position).
                let (tables, window) = match span < pos {
                    true => {
                        let cache = cached("keys and values")?;
                        (&cache.keys_values[k - 1], [(cache.frame - pos) as i64, (cache.frame - span) as i64])
                    }
                    false => (&self.no_prefix, [0, 0]),
                };
                inputs.push((keys.clone(), (&tables[0]).into()));
                inputs.push((values.clone(), (&tables[1]).into()));
                let picks: Vec<i64> = match span < pos {
                    true => base_of_row[..b].iter().map(|x| x.expect("checked above") as i64).collect(),
                    false => vec![0; b],
                };
                inputs
                    .push((PREFIX_ROWS.to_string(), OrtTensor::from_array((vec![b as i64], picks))?.into_dyn().into()));
                for (name, at) in [(PREFIX_START, window[0]), (PREFIX_END, window[1])] {
                    inputs.push((name.to_string(), OrtTensor::from_array((vec![1i64], vec![at]))?.into_dyn().into()));
                }
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
                    // Positions before the span are not computed (but by the embedding): their part
                    // of the patch is dropped.
                    let axes = if k == 0 { vec![] } else { suffix_axes(&self.patchable[h].0, dims) };
                    let shorten = |mut shape: Vec<usize>| {
                        axes.iter().for_each(|&a| shape[a] = shape[a].min(span));
                        shape
                    };
                    let padded = concrete(dims, Some(b), pos);
                    let padded = [vec![b], shorten(padded[1..].to_vec())].concat();
                    let row_len: usize = padded[1..].iter().product();
                    let mut mask = vec![false; b * row_len];
                    let mut value = vec![0f32; b * row_len];
                    for (slot, patch) in patched_rows {
                        let own = concrete(dims, None, rows[order[slot]].ids.len());
                        let kept = shorten(own.clone());
                        let mut m = vec![false; kept.iter().product()];
                        let mut v = vec![0f32; m.len()];
                        crop_right(&mut m, &kept, &patch.mask, &own);
                        crop_right(&mut v, &kept, &patch.value, &own);
                        let at = slot * row_len;
                        align_right(&mut mask[at..at + row_len], &padded[1..], &m, &kept, |x, s| *x = *x || s);
                        align_right(&mut value[at..at + row_len], &padded[1..], &v, &kept, |x, s| *x = s);
                    }
                    let shape: Vec<i64> = padded.iter().map(|&x| x as i64).collect();
                    (
                        OrtTensor::from_array((shape.clone(), mask))?.into_dyn(),
                        OrtTensor::from_array((shape, value))?.into_dyn(),
                    )
                };
                inputs.push((graph::mask_input(&self.patchable[h].0), mask.into()));
                inputs.push((graph::value_input(&self.patchable[h].0), value.into()));
            }
            // A patched call's stream stays on the device up to the unembedding, but for the
            // embedding's, cut to the span on the host.
            if !capture && k > 0 && k + 1 < n_segments {
                let session = segment.final_position_only.as_mut().unwrap_or(&mut segment.session);
                resid = Stream::Device(run_on_device(session, &inputs, &segment.output, self.device)?);
                continue;
            }
            let result = match (capture, &mut segment.final_position_only) {
                (true, _) => segment.session.run(inputs),
                (false, Some(session)) => session.run_with_options(inputs, &segment.main_output_only),
                (false, None) => segment.session.run_with_options(inputs, &segment.main_output_only),
            }
            .map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
            let extract = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
                let value = result.get(name).ok_or_else(|| anyhow!("the segment has no output `{name}`"))?;
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| anyhow!("output `{name}`: {e}"))?;
                Ok((shape.iter().map(|&x| x as usize).collect(), data.to_vec()))
            };
            let (shape, mut data) = extract(&segment.output)?;
            if k == 0 && span < pos {
                // The embedding computes every position; keep the span.
                data = data.chunks(pos * d).flat_map(|row| row[(pos - span) * d..].iter().copied()).collect();
            }
            if k + 1 == n_segments {
                let width = *shape.last().expect("logits have a vocabulary axis");
                for (slot, &i) in order[..b].iter().enumerate() {
                    let values = data[slot * width..(slot + 1) * width].to_vec();
                    outputs[i].logits = Logits { values, tokens: self.reads.clone() };
                }
                break;
            }
            if capture {
                for &(h, ref name) in &segment.captured {
                    let (shape, data) = extract(name)?;
                    let row_len: usize = shape[1..].iter().product();
                    for (slot, &i) in order[..b].iter().enumerate() {
                        let own = concrete(&self.captured[h].1, None, rows[i].ids.len());
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
            resid = Stream::Host(data);
        }
        Ok(outputs)
    }
}

/// The residual stream handed from one segment to the next.
enum Stream {
    Host(Vec<f32>),
    /// An ONNX Runtime value in the memory of the segments' device.
    Device(DynValue),
}

/// Run `session` on `inputs` and return its `output` left in `device`'s memory.
pub(crate) fn run_on_device(
    session: &mut Session,
    inputs: &[(String, SessionInputValue)],
    output: &str,
    device: Device,
) -> Result<DynValue> {
    let memory = match device {
        Device::Cpu => AllocationDevice::CPU,
        Device::Cuda => AllocationDevice::CUDA,
    };
    let memory = MemoryInfo::new(memory, 0, AllocatorType::Device, MemoryType::Default)
        .map_err(|e| anyhow!("cannot describe {device} memory to ONNX Runtime: {e}"))?;
    let mut binding = session.create_binding().map_err(|e| anyhow!("cannot bind a segment's inputs: {e}"))?;
    for (name, value) in inputs {
        binding.bind_input(name.as_str(), &**value).map_err(|e| anyhow!("cannot bind input `{name}`: {e}"))?;
    }
    binding.bind_output_to_device(output, &memory).map_err(|e| anyhow!("cannot bind output `{output}`: {e}"))?;
    let mut result = session.run_binding(&binding).map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
    result.remove(output).ok_or_else(|| anyhow!("the segment has no output `{output}`"))
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
        graph.output.push(crate::onnx::writer::float_of_any_shape(name));
    }
    Ok(ModelProto { graph: Some(graph), ..model.clone() })
}
