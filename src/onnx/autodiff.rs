//! Reverse-mode differentiation of an ONNX graph.
//!
//! [`append_backward`] extends a graph with the nodes that compute, from a seed input
//! `grad.<y>` = dL/dy for one of its tensors `y`, the gradient dL/dx of every tensor x in `wrt`
//! (a vector-Jacobian product, batched like the forward pass). Each operator the graph builder
//! and the engine's surgery emit on a differentiable path has a rule below; any other operator
//! there is an error naming it. The backward nodes read the forward graph's own weights (no
//! transposed copies: a product with a weight's transpose is a `Gemm` with `transB`, or ONNX
//! Runtime's `FusedMatMul` with `transB` for batched operands: one node where `Reshape`, `Gemm`
//! and `Reshape` back took five, which ONNX Runtime sets up faster).
//!
//! Reductions over broadcast axes need each tensor's rank and which of its axes have size 1:
//! `shapes` gives every forward tensor's shape in one probe run whose dynamic axes all exceed 1.

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Result};

use super::proto::{data_type, AttributeProto, ModelProto, NodeProto, TensorProto};
use super::writer::{attr_int, attr_ints, float_of_any_shape};

/// ONNX Runtime's own operators (`FusedMatMul`), in its standard CPU and CUDA builds (not in
/// builds made with `--disable_contrib_ops`).
const ORT_DOMAIN: &str = "com.microsoft";

/// The seed input (`dL/dy`) for differentiating tensor `y`.
pub fn seed_input(y: &str) -> String {
    format!("grad.{y}")
}

/// The output holding dL/dx.
pub fn gradient_output(x: &str) -> String {
    format!("grad.{x}")
}

/// Append the backward pass of `model` from `y` to `wrt`: a new float input
/// [`seed_input`]`(y)` shaped like `y`, and an output [`gradient_output`]`(x)` shaped like x for
/// every x in `wrt`.
///
/// `gates` maps tensors to forward tensors that broadcast against them: such a tensor's gradient
/// is multiplied by its gate before it flows on (to its producer, or out as [`gradient_output`]),
/// so a gate of 0 stops the gradient there without changing the forward pass (AtP*'s GradDrop).
pub fn append_backward(
    model: &mut ModelProto,
    y: &str,
    wrt: &[String],
    shapes: &HashMap<String, Vec<i64>>,
    gates: &HashMap<String, String>,
) -> Result<()> {
    let graph = model.graph.as_mut().ok_or_else(|| anyhow!("ONNX model has no graph"))?;
    let mut shapes = shapes.clone();
    for t in &graph.initializer {
        shapes.entry(t.name.clone()).or_insert_with(|| t.dims.clone());
    }
    // Tensors that depend on a `wrt` tensor and that `y` depends on carry gradients.
    let mut depends: HashSet<&str> = wrt.iter().map(String::as_str).collect();
    for n in &graph.node {
        if n.input.iter().any(|i| depends.contains(i.as_str())) {
            depends.extend(n.output.iter().map(String::as_str));
        }
    }
    let mut affects: HashSet<&str> = [y].into();
    for n in graph.node.iter().rev() {
        if n.output.iter().any(|o| affects.contains(o.as_str())) {
            affects.extend(n.input.iter().map(String::as_str));
        }
    }
    let carries = |t: &str| depends.contains(t) && affects.contains(t);
    if !carries(y) && !wrt.iter().any(|x| x == y) {
        bail!("`{y}` does not depend on any tensor to differentiate for");
    }

    let mut b = Backward { nodes: vec![], initializers: vec![], counter: 0, shapes: &shapes };
    let seed = seed_input(y);
    let mut contributions: HashMap<String, Vec<String>> = HashMap::new();
    contributions.insert(y.to_string(), vec![seed.clone()]);
    for node in graph.node.iter().rev() {
        if !node.output.iter().any(|o| carries(o)) {
            continue;
        }
        let grads: Vec<Option<String>> =
            node.output.iter().map(|o| contributions.get(o).map(|parts| b.total(parts, gates.get(o)))).collect();
        if grads.iter().all(Option::is_none) {
            continue;
        }
        let needed: Vec<bool> = node.input.iter().map(|i| carries(i)).collect();
        for (i, grad) in b.rule(node, &grads, &needed)? {
            contributions.entry(node.input[i].clone()).or_default().push(grad);
        }
    }
    let mut done = HashSet::new();
    for x in wrt.iter().filter(|x| done.insert(x.as_str())) {
        let out = gradient_output(x);
        match contributions.get(x) {
            Some(parts) => {
                let total = b.total(parts, gates.get(x));
                b.nodes.push(node_proto("Identity", &[&total], &out, vec![]));
            }
            None => {
                let shape = b.op("Shape", &[x], vec![]);
                b.nodes.push(node_proto("ConstantOfShape", &[&shape], &out, vec![]));
            }
        }
        graph.output.push(float_of_any_shape(&out));
    }
    graph.input.push(float_of_any_shape(&seed));
    if !model.opset_import.iter().any(|o| o.domain == ORT_DOMAIN) {
        model.opset_import.push(super::proto::OperatorSetIdProto { domain: ORT_DOMAIN.into(), version: 1 });
    }
    graph.node.extend(b.nodes);
    graph.initializer.extend(b.initializers);
    Ok(())
}

struct Backward<'s> {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
    shapes: &'s HashMap<String, Vec<i64>>,
}

pub(super) fn node_proto(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: format!("patchbay:grad:{output}"),
        op_type: op.into(),
        attribute,
        ..Default::default()
    }
}

fn int_attr(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn ints_attr(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
}

fn float_attr(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

impl Backward<'_> {
    fn fresh(&mut self) -> String {
        self.counter += 1;
        format!("grad.t{}", self.counter)
    }

    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh();
        self.nodes.push(node_proto(op, inputs, &out, attrs));
        out
    }

    fn ops_multi(&mut self, op: &str, inputs: &[&str], n: usize, attrs: Vec<AttributeProto>) -> Vec<String> {
        let outputs: Vec<String> = (0..n).map(|_| self.fresh()).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: format!("patchbay:grad:{}", outputs[0]),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    fn const_i64(&mut self, values: &[i64]) -> String {
        let name = self.fresh();
        self.initializers.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: data_type::INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    fn scalar_f32(&mut self, value: f32) -> String {
        let name = self.fresh();
        self.initializers.push(TensorProto {
            dims: vec![],
            data_type: data_type::FLOAT,
            name: name.clone(),
            raw_data: value.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name
    }

    fn sum(&mut self, parts: &[String]) -> String {
        match parts {
            [one] => one.clone(),
            many => {
                let inputs: Vec<&str> = many.iter().map(String::as_str).collect();
                self.op("Sum", &inputs, vec![])
            }
        }
    }

    /// A tensor's gradient: the sum of its contributions, times its gate if it has one.
    fn total(&mut self, parts: &[String], gate: Option<&String>) -> String {
        let sum = self.sum(parts);
        match gate {
            Some(gate) => self.op("Mul", &[&sum, gate], vec![]),
            None => sum,
        }
    }

    fn shape(&self, t: &str) -> Result<&Vec<i64>> {
        self.shapes.get(t).ok_or_else(|| anyhow!("no probed shape for tensor `{t}`"))
    }

    /// `t` (probed shape `t_shape`) summed over the axes `x` broadcast along, so it has x's shape.
    fn unbroadcast(&mut self, t: String, t_shape: &[i64], x: &str) -> Result<String> {
        let x_shape = self.shape(x)?.clone();
        let lead = t_shape.len().checked_sub(x_shape.len()).ok_or_else(|| {
            anyhow!("gradient of `{x}` has rank {} below the tensor's {}", t_shape.len(), x_shape.len())
        })?;
        let mut t = t;
        if lead > 0 {
            let axes = self.const_i64(&(0..lead as i64).collect::<Vec<_>>());
            t = self.op("ReduceSum", &[&t, &axes], vec![attr_int("keepdims", 0)]);
        }
        let axes: Vec<i64> =
            (0..x_shape.len()).filter(|&i| x_shape[i] == 1 && t_shape[lead + i] != 1).map(|i| i as i64).collect();
        if !axes.is_empty() {
            let axes = self.const_i64(&axes);
            t = self.op("ReduceSum", &[&t, &axes], vec![attr_int("keepdims", 1)]);
        }
        Ok(t)
    }

    /// The gradients of `node`'s inputs (those `needed`) from its outputs' (`grads`).
    fn rule(&mut self, node: &NodeProto, grads: &[Option<String>], needed: &[bool]) -> Result<Vec<(usize, String)>> {
        let op = node.op_type.as_str();
        let zero_for_missing = |b: &mut Self, i: usize| -> String {
            match &grads[i] {
                Some(g) => g.clone(),
                None => {
                    let shape = b.op("Shape", &[&node.output[i]], vec![]);
                    b.op("ConstantOfShape", &[&shape], vec![])
                }
            }
        };
        let g = zero_for_missing(self, 0);
        let y = node.output[0].as_str();
        let input = |i: usize| node.input[i].as_str();
        let mut out = vec![];
        match op {
            "Identity" => out.push((0, g)),
            "Cast" => {
                if int_attr(node, "to") != Some(i64::from(data_type::FLOAT)) {
                    bail!("no gradient rule for a Cast to a non-float type (node `{}`)", node.name);
                }
                out.push((0, g));
            }
            "Add" | "Sub" => {
                let y_shape = self.shape(y)?.clone();
                if needed[0] {
                    out.push((0, self.unbroadcast(g.clone(), &y_shape, input(0))?));
                }
                if needed[1] {
                    let g1 = if op == "Sub" { self.op("Neg", &[&g], vec![]) } else { g.clone() };
                    out.push((1, self.unbroadcast(g1, &y_shape, input(1))?));
                }
            }
            "Mul" => {
                let y_shape = self.shape(y)?.clone();
                for (i, other) in [(0, 1), (1, 0)] {
                    if needed[i] {
                        let t = self.op("Mul", &[&g, input(other)], vec![]);
                        out.push((i, self.unbroadcast(t, &y_shape, input(i))?));
                    }
                }
            }
            "Div" => {
                let y_shape = self.shape(y)?.clone();
                if needed[0] {
                    let t = self.op("Div", &[&g, input(1)], vec![]);
                    out.push((0, self.unbroadcast(t, &y_shape, input(0))?));
                }
                if needed[1] {
                    // d(a/b)/db = -y / b
                    let t = self.op("Mul", &[&g, y], vec![]);
                    let t = self.op("Div", &[&t, input(1)], vec![]);
                    let t = self.op("Neg", &[&t], vec![]);
                    out.push((1, self.unbroadcast(t, &y_shape, input(1))?));
                }
            }
            "Neg" => out.push((0, self.op("Neg", &[&g], vec![]))),
            "Sqrt" => {
                let half = self.scalar_f32(0.5);
                let t = self.op("Mul", &[&g, &half], vec![]);
                out.push((0, self.op("Div", &[&t, y], vec![])));
            }
            "Reciprocal" => {
                let t = self.op("Mul", &[&g, y], vec![]);
                let t = self.op("Mul", &[&t, y], vec![]);
                out.push((0, self.op("Neg", &[&t], vec![])));
            }
            "Sigmoid" => {
                let one = self.scalar_f32(1.0);
                let rest = self.op("Sub", &[&one, y], vec![]);
                let t = self.op("Mul", &[&g, y], vec![]);
                out.push((0, self.op("Mul", &[&t, &rest], vec![])));
            }
            "Tanh" => {
                let one = self.scalar_f32(1.0);
                let sq = self.op("Mul", &[y, y], vec![]);
                let rest = self.op("Sub", &[&one, &sq], vec![]);
                out.push((0, self.op("Mul", &[&g, &rest], vec![])));
            }
            "Softmax" => {
                let axis = int_attr(node, "axis").unwrap_or(-1);
                let gy = self.op("Mul", &[&g, y], vec![]);
                let axes = self.const_i64(&[axis]);
                let total = self.op("ReduceSum", &[&gy, &axes], vec![attr_int("keepdims", 1)]);
                let centred = self.op("Sub", &[&g, &total], vec![]);
                out.push((0, self.op("Mul", &[y, &centred], vec![])));
            }
            "ReduceMean" => {
                let x = input(0);
                let rank = self.shape(x)?.len() as i64;
                let axes = match (ints_attr(node, "axes"), node.input.get(1)) {
                    (Some(axes), _) => axes,
                    (None, Some(_)) => {
                        bail!("no gradient rule for ReduceMean with axes as an input (node `{}`)", node.name)
                    }
                    (None, None) => (0..rank).collect(),
                };
                let axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + rank } else { a }).collect();
                let mut g = g;
                if int_attr(node, "keepdims") == Some(0) {
                    let a = self.const_i64(&axes);
                    g = self.op("Unsqueeze", &[&g, &a], vec![]);
                }
                let shape = self.op("Shape", &[x], vec![]);
                let spread = self.op("Expand", &[&g, &shape], vec![]);
                let picked = self.const_i64(&axes);
                let sizes = self.op("Gather", &[&shape, &picked], vec![attr_int("axis", 0)]);
                let count = self.op("ReduceProd", &[&sizes], vec![attr_int("keepdims", 0)]);
                let count = self.op("Cast", &[&count], vec![attr_int("to", i64::from(data_type::FLOAT))]);
                out.push((0, self.op("Div", &[&spread, &count], vec![])));
            }
            "MatMul" => self.matmul(node, g, needed, &mut out)?,
            "Gemm" => {
                if float_attr(node, "alpha").is_some_and(|a| a != 1.0) || int_attr(node, "transA") == Some(1) {
                    bail!("no gradient rule for a Gemm with alpha != 1 or transA (node `{}`)", node.name);
                }
                let trans_b = int_attr(node, "transB").unwrap_or(0);
                if needed[0] {
                    out.push((0, self.op("Gemm", &[&g, input(1)], vec![attr_int("transB", 1 - trans_b)])));
                }
                if needed[1] {
                    let t = match trans_b {
                        1 => self.op("Gemm", &[&g, input(0)], vec![attr_int("transA", 1)]),
                        _ => self.op("Gemm", &[input(0), &g], vec![attr_int("transA", 1)]),
                    };
                    out.push((1, t));
                }
                if needed.get(2).copied().unwrap_or(false) {
                    let beta = float_attr(node, "beta").unwrap_or(1.0);
                    let scale = self.scalar_f32(beta);
                    let t = self.op("Mul", &[&g, &scale], vec![]);
                    let y_shape = self.shape(y)?.clone();
                    out.push((2, self.unbroadcast(t, &y_shape, input(2))?));
                }
            }
            "Reshape" => {
                let shape = self.op("Shape", &[input(0)], vec![]);
                out.push((0, self.op("Reshape", &[&g, &shape], vec![])));
            }
            "Transpose" => {
                let rank = self.shape(input(0))?.len();
                let perm = ints_attr(node, "perm").unwrap_or_else(|| (0..rank as i64).rev().collect());
                let mut inverse = vec![0i64; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p as usize] = i as i64;
                }
                out.push((0, self.op("Transpose", &[&g], vec![attr_ints("perm", &inverse)])));
            }
            "Unsqueeze" => out.push((0, self.op("Squeeze", &[&g, input(1)], vec![]))),
            "Squeeze" => match node.input.get(1) {
                Some(axes) => out.push((0, self.op("Unsqueeze", &[&g, axes], vec![]))),
                None => {
                    let shape = self.op("Shape", &[input(0)], vec![]);
                    out.push((0, self.op("Reshape", &[&g, &shape], vec![])));
                }
            },
            "Split" => {
                let axis = int_attr(node, "axis").unwrap_or(0);
                let parts: Vec<String> = (0..node.output.len()).map(|i| zero_for_missing(self, i)).collect();
                let inputs: Vec<&str> = parts.iter().map(String::as_str).collect();
                out.push((0, self.op("Concat", &inputs, vec![attr_int("axis", axis)])));
            }
            "Concat" => {
                let axis = int_attr(node, "axis").unwrap_or(0);
                let picked = self.const_i64(&[axis]);
                let sizes: Vec<String> = node
                    .input
                    .iter()
                    .map(|x| {
                        let shape = self.op("Shape", &[x], vec![]);
                        self.op("Gather", &[&shape, &picked], vec![attr_int("axis", 0)])
                    })
                    .collect();
                let size_refs: Vec<&str> = sizes.iter().map(String::as_str).collect();
                let split = self.op("Concat", &size_refs, vec![attr_int("axis", 0)]);
                let parts = self.ops_multi("Split", &[&g, &split], node.input.len(), vec![attr_int("axis", axis)]);
                out.extend(parts.into_iter().enumerate().filter(|(i, _)| needed[*i]));
            }
            "Where" => {
                let y_shape = self.shape(y)?.clone();
                let zero = self.scalar_f32(0.0);
                if needed[1] {
                    let t = self.op("Where", &[input(0), &g, &zero], vec![]);
                    out.push((1, self.unbroadcast(t, &y_shape, input(1))?));
                }
                if needed[2] {
                    let t = self.op("Where", &[input(0), &zero, &g], vec![]);
                    out.push((2, self.unbroadcast(t, &y_shape, input(2))?));
                }
            }
            "Gather" => {
                if needed[0] {
                    out.push((0, self.gather(node, g)?));
                }
            }
            "LayerNormalization" => {
                if needed[0] {
                    out.push((0, self.layer_norm(node, g)?));
                }
                if needed.iter().skip(1).any(|&n| n) {
                    bail!("no gradient rule for LayerNormalization's scale or bias (node `{}`)", node.name);
                }
            }
            other => bail!("no gradient rule for ONNX operator `{other}` (node `{}`)", node.name),
        }
        out.retain(|(i, _)| needed[*i]);
        Ok(out)
    }

    /// `y = a @ b` with numpy broadcasting over the leading axes.
    fn matmul(&mut self, node: &NodeProto, g: String, needed: &[bool], out: &mut Vec<(usize, String)>) -> Result<()> {
        let (a, b, y) = (node.input[0].as_str(), node.input[1].as_str(), node.output[0].as_str());
        let (a_shape, b_shape, y_shape) = (self.shape(a)?.clone(), self.shape(b)?.clone(), self.shape(y)?.clone());
        if a_shape.len() < 2 || b_shape.len() < 2 {
            bail!("no gradient rule for a MatMul of a vector (node `{}`)", node.name);
        }
        let swap = |rank: usize| -> Vec<i64> {
            let mut perm: Vec<i64> = (0..rank as i64).collect();
            perm.swap(rank - 1, rank - 2);
            perm
        };
        let batch = &y_shape[..y_shape.len() - 2];
        if needed[0] {
            // dA = dY @ B^T; a weight `[k, n]` transposed by the product, never copied.
            let t = if b_shape.len() == 2 {
                let t = self.op("FusedMatMul", &[&g, b], vec![attr_int("transB", 1)]);
                self.nodes.last_mut().expect("just pushed").domain = ORT_DOMAIN.into();
                t
            } else {
                let bt = self.op("Transpose", &[b], vec![attr_ints("perm", &swap(b_shape.len()))]);
                self.op("MatMul", &[&g, &bt], vec![])
            };
            let t_shape = [batch, &a_shape[a_shape.len() - 2..]].concat();
            out.push((0, self.unbroadcast(t, &t_shape, a)?));
        }
        if needed[1] {
            let at = self.op("Transpose", &[a], vec![attr_ints("perm", &swap(a_shape.len()))]);
            let t = self.op("MatMul", &[&at, &g], vec![]);
            let t_shape = [batch, &b_shape[b_shape.len() - 2..]].concat();
            out.push((1, self.unbroadcast(t, &t_shape, b)?));
        }
        Ok(())
    }

    /// `y = Gather(data, indices, axis)` with indices of rank 0 or 1: the gradient scattered
    /// (added) back into zeros shaped like `data`.
    fn gather(&mut self, node: &NodeProto, g: String) -> Result<String> {
        let (data, indices, y) = (node.input[0].as_str(), node.input[1].as_str(), node.output[0].as_str());
        let rank = self.shape(data)?.len() as i64;
        let axis = int_attr(node, "axis").unwrap_or(0);
        let axis = if axis < 0 { axis + rank } else { axis };
        let index_rank = self.shape(indices)?.len();
        let updates = match index_rank {
            1 => g,
            0 => {
                let a = self.const_i64(&[axis]);
                self.op("Unsqueeze", &[&g, &a], vec![])
            }
            r => bail!("no gradient rule for Gather with indices of rank {r} (node `{}`, output `{y}`)", node.name),
        };
        let mut along: Vec<i64> = vec![1; rank as usize];
        along[axis as usize] = -1;
        let along = self.const_i64(&along);
        let index = self.op("Reshape", &[indices, &along], vec![]);
        let updates_shape = self.op("Shape", &[&updates], vec![]);
        let index = self.op("Expand", &[&index, &updates_shape], vec![]);
        let data_shape = self.op("Shape", &[data], vec![]);
        let zeros = self.op("ConstantOfShape", &[&data_shape], vec![]);
        Ok(self.op(
            "ScatterElements",
            &[&zeros, &index, &updates],
            vec![attr_int("axis", axis), super::writer::attr_string("reduction", "add")],
        ))
    }

    /// LayerNormalization over the last axis: dx = (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)) / σ, ĝ = g · scale.
    fn layer_norm(&mut self, node: &NodeProto, g: String) -> Result<String> {
        let x = node.input[0].as_str();
        let rank = self.shape(x)?.len() as i64;
        let axis = int_attr(node, "axis").unwrap_or(-1);
        if axis != -1 && axis != rank - 1 {
            bail!("no gradient rule for LayerNormalization over axis {axis} (node `{}`)", node.name);
        }
        let eps = float_attr(node, "epsilon").unwrap_or(1e-5);
        let last = vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)];
        let mean = self.op("ReduceMean", &[x], last.clone());
        let centred = self.op("Sub", &[x, &mean], vec![]);
        let sq = self.op("Mul", &[&centred, &centred], vec![]);
        let var = self.op("ReduceMean", &[&sq], last.clone());
        let eps = self.scalar_f32(eps);
        let var = self.op("Add", &[&var, &eps], vec![]);
        let std = self.op("Sqrt", &[&var], vec![]);
        let rstd = self.op("Reciprocal", &[&std], vec![]);
        let xhat = self.op("Mul", &[&centred, &rstd], vec![]);
        let gh = self.op("Mul", &[&g, &node.input[1]], vec![]);
        let mean_gh = self.op("ReduceMean", &[&gh], last.clone());
        let gx = self.op("Mul", &[&gh, &xhat], vec![]);
        let mean_gx = self.op("ReduceMean", &[&gx], last);
        let t = self.op("Mul", &[&xhat, &mean_gx], vec![]);
        let t = self.op("Add", &[&t, &mean_gh], vec![]);
        let t = self.op("Sub", &[&gh, &t], vec![]);
        Ok(self.op("Mul", &[&t, &rstd], vec![]))
    }
}
