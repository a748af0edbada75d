//! Forward passes through ONNX Runtime: batches of token sequences, each with its own
//! activation patches, returning the final position's logits and (optionally) hook values.
//!
//! Every activation here is one prompt's, without the batch axis and unpadded (`pos` = the
//! prompt's length). Batches are left-padded, so activations are right-aligned into them.

use anyhow::{anyhow, Result};
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor};

use crate::model::checkpoint::Tensor;
use crate::model::{Dim, ModelDir};
use crate::run::graph;
use crate::run::readout::Logits;
use crate::runtime::{self, Batch, Device};

/// A patch of one hook in one pass: `value` where `mask` is set, the run's own value elsewhere.
/// Both have the hook's unpadded shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HookPatch {
    pub hook: usize,
    pub value: Vec<f32>,
    pub mask: Vec<bool>,
}

/// One forward pass: the tokens and the hooks overwritten in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pass {
    pub ids: Vec<u32>,
    pub patches: Vec<HookPatch>,
}

/// What a pass returns.
pub struct Output {
    /// Logits at the final position.
    pub logits: Logits,
    /// The captured hooks (after patching), unpadded, in the engine's `captured` order.
    pub captures: Vec<Tensor>,
    /// The residual stream between layers (see [`crate::run::segments`]); empty from the
    /// full-graph engine.
    pub boundaries: Vec<std::sync::Arc<Tensor>>,
}

pub struct Engine {
    patch_session: Session,
    capture_session: Session,
    /// Hooks a pass may patch, with their manifest shapes.
    pub patchable: Vec<(String, Vec<Dim>)>,
    /// Hooks a capturing pass returns.
    pub captured: Vec<(String, Vec<Dim>)>,
    /// The graph output each captured hook is read from.
    capture_outputs: Vec<String>,
    pub n_layers: usize,
}

impl Engine {
    pub fn new(
        dir: &ModelDir,
        patchable: &[String],
        captured: &[String],
        unembed: graph::Unembed,
        device: Device,
    ) -> Result<Engine> {
        let shape = |h: &String| -> Result<(String, Vec<Dim>)> {
            let hook = dir.manifest.hooks.get(h).ok_or_else(|| anyhow!("the model has no hook `{h}`"))?;
            Ok((h.clone(), hook.shape.clone()))
        };
        let patch_graph = graph::load(&dir.manifest, &dir.path, patchable, &[], unembed)?;
        let capture_graph = graph::load(&dir.manifest, &dir.path, patchable, captured, unembed)?;
        Ok(Engine {
            patch_session: runtime::session_from_proto(&patch_graph, &dir.path, device)?,
            capture_session: runtime::session_from_proto(&capture_graph, &dir.path, device)?,
            patchable: patchable.iter().map(shape).collect::<Result<_>>()?,
            captured: captured.iter().map(shape).collect::<Result<_>>()?,
            capture_outputs: captured
                .iter()
                .map(|h| graph::capture_output(&dir.manifest, patchable, h))
                .collect::<Result<_>>()?,
            n_layers: dir.manifest.config.n_layers,
        })
    }

    /// Run `passes` as one batch.
    pub fn run(&mut self, passes: &[Pass], capture: bool) -> Result<Vec<Output>> {
        let (batch, inputs) = inputs(&self.patchable, passes)?;
        let b = batch.batch;
        let session = if capture { &mut self.capture_session } else { &mut self.patch_session };
        let result = session.run(inputs).map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
        let extract = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let value = result.get(name).ok_or_else(|| anyhow!("the graph has no output `{name}`"))?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| anyhow!("output `{name}`: {e}"))?;
            Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
        };
        let (logit_shape, logits) = extract(graph::LAST_LOGITS)?;
        let vocab = *logit_shape.last().expect("logits have a vocabulary axis");
        // The final position's: the last `vocab` values of each row (rows are left-padded).
        let row_len: usize = logit_shape[1..].iter().product();
        let mut outputs: Vec<Output> = (0..b)
            .map(|row| Output {
                logits: Logits::vocabulary(logits[(row + 1) * row_len - vocab..(row + 1) * row_len].to_vec()),
                captures: vec![],
                boundaries: vec![],
            })
            .collect();
        if capture {
            for ((_, dims), output) in self.captured.iter().zip(&self.capture_outputs) {
                let (shape, data) = extract(output)?;
                for (out, tensor) in outputs.iter_mut().zip(unpad(&data, &shape, dims, passes)) {
                    out.captures.push(tensor);
                }
            }
        }
        Ok(outputs)
    }
}

/// A batch of `passes` and the inputs of a patchable full graph for it: the tokens, and every
/// patchable hook's mask and value (a single `false` where no pass patches the hook).
pub(crate) fn inputs(patchable: &[(String, Vec<Dim>)], passes: &[Pass]) -> Result<(Batch, Vec<(String, DynValue)>)> {
    let sequences: Vec<Vec<u32>> = passes.iter().map(|p| p.ids.clone()).collect();
    let batch = Batch::new(&sequences);
    let (b, pos) = (batch.batch, batch.pos);
    let tokens = |data: &Vec<i64>| OrtTensor::from_array((vec![b as i64, pos as i64], data.clone()));
    let mut inputs: Vec<(String, DynValue)> = vec![
        ("input_ids".into(), tokens(&batch.input_ids)?.into_dyn()),
        ("position_ids".into(), tokens(&batch.position_ids)?.into_dyn()),
        ("attention_mask".into(), tokens(&batch.attention_mask)?.into_dyn()),
    ];
    for (index, (hook, dims)) in patchable.iter().enumerate() {
        let (mask, value) = if passes.iter().any(|p| p.patches.iter().any(|x| x.hook == index)) {
            let padded = concrete(dims, Some(b), pos);
            let row_len: usize = padded[1..].iter().product();
            let mut mask = vec![false; b * row_len];
            let mut value = vec![0f32; b * row_len];
            for (row, pass) in passes.iter().enumerate() {
                let own = concrete(dims, None, pass.ids.len());
                for patch in pass.patches.iter().filter(|x| x.hook == index) {
                    let at = row * row_len;
                    align_right(&mut mask[at..at + row_len], &padded[1..], &patch.mask, &own, |d, s| *d = *d || s);
                    align_right(&mut value[at..at + row_len], &padded[1..], &patch.value, &own, |d, s| *d = s);
                }
            }
            let shape: Vec<i64> = padded.iter().map(|&d| d as i64).collect();
            (
                OrtTensor::from_array((shape.clone(), mask))?.into_dyn(),
                OrtTensor::from_array((shape, value))?.into_dyn(),
            )
        } else {
            let ones = vec![1i64; dims.len()];
            (
                OrtTensor::from_array((ones.clone(), vec![false]))?.into_dyn(),
                OrtTensor::from_array((ones, vec![0f32]))?.into_dyn(),
            )
        };
        inputs.push((graph::mask_input(hook), mask));
        inputs.push((graph::value_input(hook), value));
    }
    Ok((batch, inputs))
}

/// `data` (`[batch, ...]`, left-padded rows) cut into each pass's unpadded `dims`.
pub(crate) fn unpad(data: &[f32], shape: &[usize], dims: &[Dim], passes: &[Pass]) -> Vec<Tensor> {
    let row_len: usize = shape[1..].iter().product();
    passes
        .iter()
        .enumerate()
        .map(|(row, pass)| {
            let own = concrete(dims, None, pass.ids.len());
            let mut unpadded = vec![0f32; own.iter().product()];
            crop_right(&mut unpadded, &own, &data[row * row_len..(row + 1) * row_len], &shape[1..]);
            Tensor::new(own, unpadded)
        })
        .collect()
}

/// The sizes of a hook's axes: `batch` -> `batch` (dropped when `None`), other symbolic axes
/// (`pos`, `q_pos`, `k_pos`) -> `pos`.
pub fn concrete(dims: &[Dim], batch: Option<usize>, pos: usize) -> Vec<usize> {
    dims.iter()
        .filter_map(|d| match d {
            Dim::Fixed(n) => Some(*n),
            Dim::Symbolic(s) if s == "batch" => batch,
            Dim::Symbolic(_) => Some(pos),
        })
        .collect()
}

/// Copy `src` (shape `src_shape`) into the trailing corner of `dst` (shape `dst_shape`, no
/// smaller on any axis), combining elements with `put`.
pub(crate) fn align_right<T: Copy, S: Copy>(
    dst: &mut [T],
    dst_shape: &[usize],
    src: &[S],
    src_shape: &[usize],
    put: impl Fn(&mut T, S) + Copy,
) {
    // Equal shapes (most tensors: all prompts of a length) are one flat pass, not a recursion
    // per element.
    if dst_shape == src_shape {
        dst.iter_mut().zip(src).for_each(|(d, &s)| put(d, s));
        return;
    }
    let offset = dst_shape[0] - src_shape[0];
    let (dst_stride, src_stride): (usize, usize) = (dst_shape[1..].iter().product(), src_shape[1..].iter().product());
    for i in 0..src_shape[0] {
        let d = &mut dst[(i + offset) * dst_stride..(i + offset + 1) * dst_stride];
        align_right(d, &dst_shape[1..], &src[i * src_stride..(i + 1) * src_stride], &src_shape[1..], put);
    }
}

/// The inverse of [`align_right`]: the trailing corner of `src` into `dst`.
pub(crate) fn crop_right<T: Copy>(dst: &mut [T], dst_shape: &[usize], src: &[T], src_shape: &[usize]) {
    if dst_shape == src_shape {
        dst.copy_from_slice(&src[..dst.len()]);
        return;
    }
    let offset = src_shape[0] - dst_shape[0];
    let (dst_stride, src_stride): (usize, usize) = (dst_shape[1..].iter().product(), src_shape[1..].iter().product());
    for i in 0..dst_shape[0] {
        let s = &src[(i + offset) * src_stride..(i + offset + 1) * src_stride];
        crop_right(&mut dst[i * dst_stride..(i + 1) * dst_stride], &dst_shape[1..], s, &src_shape[1..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_and_crop_are_inverse() {
        let src: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let mut dst = vec![-1f32; 12];
        align_right(&mut dst, &[4, 3], &src, &[2, 3], |d, s| *d = s);
        assert_eq!(&dst[..6], &[-1.0; 6]);
        assert_eq!(&dst[6..], &src[..]);
        let mut back = vec![0f32; 6];
        crop_right(&mut back, &[2, 3], &dst, &[4, 3]);
        assert_eq!(back, src);
        // Two symbolic axes (attention patterns): both aligned to the end.
        let mut dst = vec![0f32; 9];
        align_right(&mut dst, &[3, 3], &[1.0, 2.0, 3.0, 4.0], &[2, 2], |d, s| *d = s);
        assert_eq!(dst, [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
    }
}
