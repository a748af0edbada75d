//! Making a graph's backward pass optional: its nodes go into `If` branches on a bool input, so
//! that a run without gradients computes the forward pass only.

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, Result};

use super::autodiff::node_proto;
use super::proto::{data_type, ModelProto, NodeProto, TensorProto};

/// How many `If` nodes hold the backward pass. ONNX Runtime plans each branch's memory on its
/// own, and its planner's time grows faster than a graph: on SmolLM2's gradient graph one
/// branch took 3.2 s to set up, four 1.7 s (with weight prepacking); AtP on W1 took 4.9 s with
/// one branch, 3.4 s with four, and no less with eight (README, "Attribution patching against
/// exact patching").
const BACKWARD_BRANCHES: usize = 4;

/// Put the backward nodes (every node after the first `forward_nodes`) in the branches of
/// [`BACKWARD_BRANCHES`] `If` nodes on a new scalar bool input `run`, in order, so that a run
/// with `run` false computes the forward pass only (ONNX Runtime otherwise executes every node
/// of a graph). Each `If` outputs what later ones or the graph read; the gradient outputs keep
/// their names and, without the backward pass, are empty.
pub fn make_backward_optional(model: &mut ModelProto, forward_nodes: usize, run: &str) -> Result<()> {
    use super::proto::GraphProto;
    use super::writer::{attr_graph, of_any_shape, value_info};
    let graph = model.graph.as_mut().ok_or_else(|| anyhow!("ONNX model has no graph"))?;
    let types = element_types(graph);
    let outputs: HashSet<String> =
        graph.output.iter().map(|o| o.name.clone()).filter(|o| o.starts_with("grad.")).collect();
    let backward: Vec<NodeProto> = graph.node.split_off(forward_nodes);
    let size = backward.len().div_ceil(BACKWARD_BRANCHES).max(1);
    let chunks: Vec<Vec<NodeProto>> = backward.chunks(size).map(<[NodeProto]>::to_vec).collect();
    // What each branch's successors read.
    let mut read_later: Vec<HashSet<String>> = vec![outputs.clone(); chunks.len()];
    for i in (0..chunks.len().saturating_sub(1)).rev() {
        let next: HashSet<String> = chunks[i + 1].iter().flat_map(|n| n.input.iter().cloned()).collect();
        read_later[i] = read_later[i + 1].union(&next).cloned().collect();
    }
    let mut empties: Vec<i32> = vec![];
    for (i, mut nodes) in chunks.into_iter().enumerate() {
        let crossing: Vec<String> =
            nodes.iter().flat_map(|n| n.output.iter()).filter(|o| read_later[i].contains(*o)).cloned().collect();
        let inner = |o: &str| format!("{o}.computed");
        for node in &mut nodes {
            for name in node.input.iter_mut().chain(node.output.iter_mut()) {
                if crossing.contains(name) {
                    *name = inner(name);
                }
            }
        }
        let elem = |o: &String| types.get(o).copied().unwrap_or(data_type::FLOAT);
        let empty = |t: i32| format!("grad.none.{t}");
        for o in &crossing {
            if !empties.contains(&elem(o)) {
                empties.push(elem(o));
            }
        }
        let branch = |name: &str, node: Vec<NodeProto>, suffix: &dyn Fn(&str) -> String| GraphProto {
            name: name.into(),
            node,
            output: crossing.iter().map(|o| of_any_shape(&suffix(o), elem(o))).collect(),
            ..Default::default()
        };
        let computed = branch(&format!("backward_{i}"), nodes, &inner);
        let skipped_name = |o: &str| format!("{o}.skipped");
        let skipped_nodes =
            crossing.iter().map(|o| node_proto("Identity", &[&empty(elem(o))], &skipped_name(o), vec![])).collect();
        let skipped = branch(&format!("no_backward_{i}"), skipped_nodes, &skipped_name);
        graph.node.push(NodeProto {
            input: vec![run.into()],
            output: crossing.clone(),
            name: format!("patchbay:backward:{i}"),
            op_type: "If".into(),
            attribute: vec![attr_graph("then_branch", computed), attr_graph("else_branch", skipped)],
            ..Default::default()
        });
    }
    for t in empties {
        graph.initializer.push(TensorProto {
            dims: vec![0],
            data_type: t,
            name: format!("grad.none.{t}"),
            ..Default::default()
        });
    }
    graph.input.push(value_info(run, data_type::BOOL, &[]));
    Ok(())
}

/// The element type (a `data_type`) of every tensor of `g`, propagated through its nodes (the
/// operators the graph builder and this module emit).
pub fn element_types(g: &super::proto::GraphProto) -> HashMap<String, i32> {
    let mut types: HashMap<String, i32> = HashMap::new();
    for i in &g.input {
        let t = i.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).map_or(0, |t| t.elem_type);
        types.insert(i.name.clone(), t);
    }
    for t in &g.initializer {
        types.insert(t.name.clone(), t.data_type);
    }
    for n in &g.node {
        let input = |i: usize| n.input.get(i).and_then(|x| types.get(x)).copied().unwrap_or(0);
        let t = match n.op_type.as_str() {
            "Shape" | "Size" | "NonZero" => data_type::INT64,
            "Cast" => n.attribute.iter().find(|a| a.name == "to").map_or(0, |a| a.i as i32),
            "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Not" => data_type::BOOL,
            "Where" => input(1),
            "ConstantOfShape" => data_type::FLOAT,
            _ => input(0),
        };
        for o in &n.output {
            types.insert(o.clone(), t);
        }
    }
    types
}
