//! The base runs' cache, kept in the memory of the device the segments run on.
//!
//! A patched pass enters layer L with its base run's residual stream there, and in suffix mode
//! reads its base run's keys and values for the positions it does not recompute. Every base
//! run's tensors are stacked into one per layer (right-aligned in one frame of positions) and
//! sent to the device once per variant; a call then names its rows' base runs by index and the
//! device gathers them, so on CUDA no cached activation crosses to the GPU twice.

use std::sync::Arc;

use anyhow::Result;
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor};

use crate::model::checkpoint::Tensor;
use crate::model::Dim;
use crate::onnx::proto::{data_type, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
use crate::onnx::writer::{attr_int, float_of_any_shape, value_info};
use crate::run::segments::run_on_device;
use crate::runtime::{self, Device};

/// What one base run left, handed over to the cache, which frees it layer by layer as it
/// stacks (so the run's tensors and the stacked ones are never all in memory at once): the
/// residual stream entering every layer (`[len, d_model]`), and in suffix mode each layer's
/// keys and values.
pub struct BaseRun {
    pub boundaries: Vec<Arc<Tensor>>,
    pub keys_values: Vec<[Tensor; 2]>,
}

/// The stacked base runs of one variant.
pub struct BaseCache {
    /// Positions of the frame the base runs are right-aligned in: the longest one's.
    pub frame: usize,
    /// Per layer: the residual stream entering it, `[bases, frame, d_model]`.
    pub resid: Vec<DynValue>,
    /// Per layer, in suffix mode: its keys and values, `[bases, frame, kv_heads, d_head]`.
    pub keys_values: Vec<[DynValue; 2]>,
}

/// Device-side operations on the cache: a copy to the device, and the join of cached rows to a
/// running residual stream.
pub struct CacheOps {
    upload: Session,
    join: Session,
    device: Device,
}

impl CacheOps {
    pub fn new(weights_dir: &std::path::Path, device: Device) -> Result<CacheOps> {
        Ok(CacheOps {
            upload: runtime::session_from_proto(&upload_model(), weights_dir, device)?,
            join: runtime::session_from_proto(&join_model(), weights_dir, device)?,
            device,
        })
    }

    /// Stack `bases` per layer (`layers` of them) and send them to the device.
    pub fn stack(&mut self, mut bases: Vec<BaseRun>, layers: usize) -> Result<BaseCache> {
        let frame = bases.iter().filter_map(|b| b.boundaries.first()).map(|t| t.shape[0]).max().unwrap_or(0);
        let (mut resid, mut keys_values) = (vec![], vec![]);
        if bases.is_empty() {
            return Ok(BaseCache { frame, resid, keys_values });
        }
        let empty = || Tensor::new(vec![0], vec![]);
        for l in 0..layers {
            let layer: Vec<Arc<Tensor>> =
                bases.iter_mut().map(|b| std::mem::replace(&mut b.boundaries[l], Arc::new(empty()))).collect();
            resid.push(self.stacked(&layer.iter().map(|t| &**t).collect::<Vec<_>>(), frame)?);
            if bases[0].keys_values.len() > l {
                let mut kv = vec![];
                for which in 0..2 {
                    let layer: Vec<Tensor> =
                        bases.iter_mut().map(|b| std::mem::replace(&mut b.keys_values[l][which], empty())).collect();
                    kv.push(self.stacked(&layer.iter().collect::<Vec<_>>(), frame)?);
                }
                let [k, v]: [DynValue; 2] = kv.try_into().map_err(|_| anyhow::anyhow!("keys and values"))?;
                keys_values.push([k, v]);
            }
        }
        Ok(BaseCache { frame, resid, keys_values })
    }

    /// `tensors` (positions first) right-aligned in `frame` positions, stacked, on the device.
    fn stacked(&mut self, tensors: &[&Tensor], frame: usize) -> Result<DynValue> {
        let rest = &tensors[0].shape[1..];
        let mut data = Vec::with_capacity(tensors.len() * frame * rest.iter().product::<usize>());
        for t in tensors {
            right_aligned(&mut data, t, frame);
        }
        let mut shape = vec![tensors.len() as i64, frame as i64];
        shape.extend(rest.iter().map(|&x| x as i64));
        self.place(OrtTensor::from_array((shape, data))?.into_dyn())
    }

    /// `value` in the device's memory.
    fn place(&mut self, value: DynValue) -> Result<DynValue> {
        match self.device {
            Device::Cpu => Ok(value),
            Device::Cuda => run_on_device(&mut self.upload, &[("x".into(), value.into())], "y", self.device),
        }
    }

    /// `running` (`[rows, span, d_model]`) followed by the cached residual streams of base runs
    /// `rows` over the frame's last `span` positions, left on the device.
    pub fn join(
        &mut self,
        running: DynValue,
        table: &DynValue,
        frame: usize,
        rows: Vec<i64>,
        span: usize,
    ) -> Result<DynValue> {
        let index = |x: i64| OrtTensor::from_array((vec![1i64], vec![x])).map(|t| t.into_dyn());
        let inputs = [
            ("running".to_string(), running.into()),
            ("table".to_string(), table.into()),
            ("rows".to_string(), OrtTensor::from_array((vec![rows.len() as i64], rows))?.into_dyn().into()),
            ("start".to_string(), index((frame - span) as i64)?.into()),
            ("end".to_string(), index(frame as i64)?.into()),
        ];
        run_on_device(&mut self.join, &inputs, "joined", self.device)
    }
}

/// Append `t` (positions first) right-aligned in a frame of `frame` positions, zeros before it.
fn right_aligned(out: &mut Vec<f32>, t: &Tensor, frame: usize) {
    let stride: usize = t.shape[1..].iter().product();
    out.resize(out.len() + (frame - t.shape[0]) * stride, 0.0);
    out.extend_from_slice(&t.data);
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<crate::onnx::proto::AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: format!("patchbay:cache:{output}"),
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

fn model(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: crate::onnx::build::OPSET }],
        producer_name: "patchbay".into(),
        graph: Some(graph),
        ..Default::default()
    }
}

fn dims(names: &[&str]) -> Vec<Dim> {
    names.iter().map(|n| Dim::Symbolic(n.to_string())).collect()
}

/// `y = x`, run to place `x` in the device's memory.
fn upload_model() -> ModelProto {
    model(GraphProto {
        name: "upload".into(),
        node: vec![node("Identity", &["x"], "y", vec![])],
        input: vec![float_of_any_shape("x")],
        output: vec![float_of_any_shape("y")],
        ..Default::default()
    })
}

/// `joined = Concat(running, Slice(Gather(table, rows), start, end, axis 1), axis 0)`.
fn join_model() -> ModelProto {
    let axis1 = TensorProto {
        dims: vec![1],
        data_type: data_type::INT64,
        name: "axis1".into(),
        raw_data: 1i64.to_le_bytes().to_vec(),
        ..Default::default()
    };
    model(GraphProto {
        name: "join".into(),
        node: vec![
            node("Gather", &["table", "rows"], "picked", vec![attr_int("axis", 0)]),
            node("Slice", &["picked", "start", "end", "axis1"], "cut", vec![]),
            node("Concat", &["running", "cut"], "joined", vec![attr_int("axis", 0)]),
        ],
        initializer: vec![axis1],
        input: vec![
            value_info("running", data_type::FLOAT, &dims(&["rows", "span", "d_model"])),
            value_info("table", data_type::FLOAT, &dims(&["bases", "frame", "d_model"])),
            value_info("rows", data_type::INT64, &dims(&["joining"])),
            value_info("start", data_type::INT64, &[Dim::Fixed(1)]),
            value_info("end", data_type::INT64, &[Dim::Fixed(1)]),
        ],
        output: vec![value_info("joined", data_type::FLOAT, &dims(&["all", "span", "d_model"]))],
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_runs_are_right_aligned_in_the_frame() {
        // Two positions of width 3 in a frame of 4: the frame's first two positions are zeros.
        let mut out = vec![];
        right_aligned(&mut out, &Tensor::new(vec![2, 3], (0..6).map(|x| x as f32).collect()), 4);
        assert_eq!(out, [0., 0., 0., 0., 0., 0., 0., 1., 2., 3., 4., 5.]);
    }
}
