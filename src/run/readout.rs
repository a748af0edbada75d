//! Computing only what the metrics read: the final position, and of it a few logits.
//!
//! - The metrics read the final position only, so after the last layer's attention (which needs
//!   every position's keys and values) nothing but that position is computed: the last layer's
//!   MLP runs on one position instead of all.
//! - A logit difference reads a few logits (the answers and wrong answers of the dataset), yet a
//!   full unembedding costs `d_model x vocab` multiply-adds per pass: on SmolLM2 as much as ten
//!   transformer layers of one token. When every metric is a logit difference, the unembedding
//!   multiplies by the rows of those tokens only.

use std::collections::HashSet;

use crate::onnx::proto::{data_type, ModelProto, NodeProto, TensorProto};

/// The logits of the final position that a run computed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logits {
    pub values: Vec<f32>,
    /// `None`: `values` covers the whole vocabulary. `Some(tokens)` (sorted): `values[i]` is the
    /// logit of `tokens[i]`, and no other logit was computed.
    pub tokens: Option<std::sync::Arc<[u32]>>,
}

impl Logits {
    pub fn vocabulary(values: Vec<f32>) -> Logits {
        Logits { values, tokens: None }
    }

    /// The logit of token `id`; NaN when the run did not compute it, so a metric that reads
    /// beyond the tokens it declared shows up as a non-finite result, never as a wrong number.
    pub fn get(&self, id: u32) -> f32 {
        match &self.tokens {
            None => self.values.get(id as usize).copied().unwrap_or(f32::NAN),
            Some(tokens) => tokens.binary_search(&id).map_or(f32::NAN, |i| self.values[i]),
        }
    }

    /// The whole vocabulary's logits, when they were computed.
    pub fn full(&self) -> Option<&[f32]> {
        self.tokens.is_none().then_some(&self.values[..])
    }
}

/// Change the last layer's segment `model` so that every reader of `resid_mid` (the residual
/// stream after the attention) reads its final position only. False, leaving the model as it
/// was, when a tensor in `keep_whole` (a patched hook, whose patch covers every position) lies
/// downstream of it, nothing reads it, or the changed graph cannot be ordered.
pub fn last_position_after(model: &mut ModelProto, resid_mid: &str, keep_whole: &[String]) -> bool {
    let mut changed = model.clone();
    let Some(g) = changed.graph.as_mut() else { return false };
    let mut downstream: HashSet<&str> = [resid_mid].into();
    for n in &g.node {
        if n.input.iter().any(|i| downstream.contains(i.as_str())) {
            downstream.extend(n.output.iter().map(String::as_str));
        }
    }
    if keep_whole.iter().any(|t| downstream.contains(t.as_str())) {
        return false;
    }
    let last = format!("{resid_mid}.last");
    let mut readers = 0;
    for input in g.node.iter_mut().flat_map(|n| n.input.iter_mut()).filter(|i| *i == resid_mid) {
        *input = last.clone();
        readers += 1;
    }
    if readers == 0 {
        return false;
    }
    let (start, end, axis) = ("patchbay.last.start", "patchbay.last.end", "patchbay.last.axis");
    for (name, value) in [(start, -1i64), (end, i64::MAX), (axis, 1)] {
        g.initializer.push(TensorProto {
            dims: vec![1],
            data_type: data_type::INT64,
            name: name.into(),
            raw_data: value.to_le_bytes().to_vec(),
            ..Default::default()
        });
    }
    g.node.push(NodeProto {
        input: vec![resid_mid.into(), start.into(), end.into(), axis.into()],
        output: vec![last.clone()],
        name: format!("patchbay:readout:{last}"),
        op_type: "Slice".into(),
        ..Default::default()
    });
    if crate::run::graph::sort_topologically(g).is_err() {
        return false;
    }
    *model = changed;
    true
}

/// Change `model` (the unembedding segment, whose output is `logits`) to multiply by the
/// unembedding rows of `tokens` only. Returns the new output (`[batch, tokens]`, possibly with
/// a unit position axis), or `None`, leaving the model as it was, when the logits do not come
/// from a bias-free MatMul or Gemm with a `[vocab, d]` or `[d, vocab]` weight through reshapes.
pub fn read_tokens(model: &mut ModelProto, logits: &str, tokens: &[u32], vocab: usize) -> Option<String> {
    let mut changed = model.clone();
    let g = changed.graph.as_mut()?;
    let mut name = logits.to_string();
    let product = loop {
        let i = g.node.iter().position(|n| n.output.first() == Some(&name))?;
        match g.node[i].op_type.as_str() {
            "Reshape" | "Identity" => name = g.node[i].input.first()?.clone(),
            "MatMul" | "Gemm" => break i,
            _ => return None,
        }
    };
    let node = &g.node[product];
    let attr = |key: &str| node.attribute.iter().find(|a| a.name == key).map_or(0, |a| a.i);
    let gemm = node.op_type == "Gemm";
    if gemm && (attr("transA") != 0 || node.input.get(2).is_some_and(|c| !c.is_empty())) {
        return None;
    }
    let weight = g.initializer.iter().find(|t| t.name == node.input[1])?;
    let axis = match (gemm && attr("transB") != 0, weight.dims.as_slice()) {
        (true, [v, _]) if *v as usize == vocab => 0,
        (false, [_, v]) if *v as usize == vocab => 1,
        _ => return None,
    };
    let (weight, output) = (node.input[1].clone(), node.output[0].clone());
    let ids = "patchbay.read_tokens";
    let rows = format!("{weight}.read");
    g.initializer.push(TensorProto {
        dims: vec![tokens.len() as i64],
        data_type: data_type::INT64,
        name: ids.into(),
        raw_data: tokens.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect(),
        ..Default::default()
    });
    // Before the product, so the nodes stay in topological order.
    g.node.insert(
        product,
        NodeProto {
            input: vec![weight, ids.into()],
            output: vec![rows.clone()],
            name: format!("patchbay:readout:{rows}"),
            op_type: "Gather".into(),
            attribute: vec![crate::onnx::writer::attr_int("axis", axis)],
            ..Default::default()
        },
    );
    g.node[product + 1].input[1] = rows;
    // The reshapes after the product expect the whole vocabulary: drop everything the new
    // output does not need (ONNX Runtime runs every node of a graph).
    let mut needed: HashSet<String> = [output.clone()].into();
    let mut keep = vec![false; g.node.len()];
    for (i, n) in g.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(n.input.iter().cloned());
        }
    }
    let mut kept = keep.iter();
    g.node.retain(|_| *kept.next().expect("one flag per node"));
    g.initializer.retain(|t| needed.contains(&t.name));
    g.input.retain(|i| needed.contains(&i.name));
    let info = g.output.first()?.clone();
    g.output = vec![crate::onnx::proto::ValueInfoProto { name: output.clone(), ..info }];
    *model = changed;
    Some(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{GraphProto, ValueInfoProto};

    #[test]
    fn logits_of_tokens_read_others_as_nan() {
        let full = Logits::vocabulary(vec![0.5, 1.5, 2.5]);
        assert_eq!((full.get(1), full.full().map(<[f32]>::len)), (1.5, Some(3)));
        assert!(full.get(3).is_nan());
        let read = Logits { values: vec![7.0, 9.0], tokens: Some(vec![2, 40].into()) };
        assert_eq!((read.get(2), read.get(40), read.full()), (7.0, 9.0, None));
        assert!(read.get(3).is_nan());
    }

    /// `x [b, d] -> Gemm(x, W [vocab, d], transB) -> Reshape -> logits`, as the importer builds it.
    fn unembedding(bias: bool) -> ModelProto {
        let node = |op: &str, inputs: &[&str], output: &str| NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            op_type: op.into(),
            attribute: if op == "Gemm" { vec![crate::onnx::writer::attr_int("transB", 1)] } else { vec![] },
            ..Default::default()
        };
        let tensor = |name: &str, dims: Vec<i64>| TensorProto { name: name.into(), dims, ..Default::default() };
        let gemm = if bias { vec!["x", "w", "c"] } else { vec!["x", "w"] };
        ModelProto {
            graph: Some(GraphProto {
                node: vec![node("Gemm", &gemm, "z"), node("Reshape", &["z", "shape"], "logits")],
                initializer: vec![tensor("w", vec![5, 2]), tensor("shape", vec![3]), tensor("c", vec![5])],
                input: vec![ValueInfoProto { name: "x".into(), ..Default::default() }],
                output: vec![ValueInfoProto { name: "logits".into(), ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_unembedding_gathers_the_rows_of_the_tokens_read() {
        let mut model = unembedding(false);
        assert_eq!(read_tokens(&mut model, "logits", &[1, 3], 5).as_deref(), Some("z"));
        let g = model.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Gather", "Gemm"], "the reshape to the vocabulary is gone");
        assert_eq!(g.node[0].input, ["w", "patchbay.read_tokens"]);
        assert_eq!(g.node[1].input[1], g.node[0].output[0]);
        assert_eq!(g.output.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["z"]);
        let ids = g.initializer.iter().find(|t| t.name == "patchbay.read_tokens").unwrap();
        assert_eq!(ids.raw_data, [1i64, 3].iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<_>>());
        // A bias, or a vocabulary the weight does not have, leaves the model whole.
        for (mut model, vocab) in [(unembedding(true), 5), (unembedding(false), 6)] {
            let before = model.clone();
            assert_eq!(read_tokens(&mut model, "logits", &[1], vocab), None);
            assert_eq!(model, before);
        }
    }
}
