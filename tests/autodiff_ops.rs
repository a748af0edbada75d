//! Every gradient rule of `onnx::autodiff` on a one-operator graph (a few with two), against
//! central differences through the same graph: for L = sum(seed * y) and a random direction u
//! per input, dL/dx . u from the backward graph against (L(x + eps u) - L(x - eps u)) / 2 eps.
//! The whole-model tests (tests/attribution.rs) reach the rules the models use; these also
//! reach what they do not (Div, a differentiated Sub, Gemm's B and C, Gather with a scalar
//! index, Squeeze without axes, broadcasting on either side).

use std::collections::HashMap;

use ort::value::Tensor as OrtTensor;
use patchbay::onnx::autodiff;
use patchbay::onnx::build::OPSET;
use patchbay::onnx::proto::{data_type, ModelProto, OperatorSetIdProto, TensorProto};
use patchbay::onnx::writer::{attr_float, attr_int, attr_ints, float_of_any_shape, Graph};
use patchbay::runtime::{self, Device};

/// A float input: name, shape, whether to differentiate for it, and the interval its values
/// are drawn from (kept away from 0 where an operator needs it).
struct Input(&'static str, &'static [i64], bool, (f32, f32));

const ANY: (f32, f32) = (-1.0, 1.0);
const POSITIVE: (f32, f32) = (0.5, 1.5);

struct Case {
    name: &'static str,
    inputs: Vec<Input>,
    /// Adds the operator(s) reading the inputs; returns the output to differentiate.
    build: fn(&mut Graph) -> String,
}

fn case(name: &'static str, inputs: Vec<Input>, build: fn(&mut Graph) -> String) -> Case {
    Case { name, inputs, build }
}

fn one(g: &mut Graph, op: &str, inputs: &[&str], attrs: Vec<patchbay::onnx::proto::AttributeProto>) -> String {
    g.op_named(op, inputs, "y", attrs)
}

fn cases() -> Vec<Case> {
    use Input as I;
    let x = || I("x", &[2, 3, 4], true, ANY);
    let positive = || I("x", &[2, 3, 4], true, POSITIVE);
    vec![
        case("Identity", vec![x()], |g| one(g, "Identity", &["x"], vec![])),
        case("Cast", vec![x()], |g| one(g, "Cast", &["x"], vec![attr_int("to", i64::from(data_type::FLOAT))])),
        case("Add, broadcast", vec![x(), I("b", &[4], true, ANY)], |g| one(g, "Add", &["x", "b"], vec![])),
        case("Add, broadcast on the left", vec![I("b", &[3, 1], true, ANY), x()], |g| {
            one(g, "Add", &["b", "x"], vec![])
        }),
        case("Sub", vec![x(), I("b", &[3, 1], true, ANY)], |g| one(g, "Sub", &["x", "b"], vec![])),
        case("Mul", vec![x(), I("b", &[1, 4], true, ANY)], |g| one(g, "Mul", &["x", "b"], vec![])),
        case("Div", vec![x(), I("b", &[4], true, POSITIVE)], |g| one(g, "Div", &["x", "b"], vec![])),
        case("Div, divisor broadcast", vec![I("b", &[3, 1], true, ANY), positive()], |g| {
            one(g, "Div", &["b", "x"], vec![])
        }),
        case("Neg", vec![x()], |g| one(g, "Neg", &["x"], vec![])),
        case("Sqrt", vec![positive()], |g| one(g, "Sqrt", &["x"], vec![])),
        case("Reciprocal", vec![positive()], |g| one(g, "Reciprocal", &["x"], vec![])),
        case("Sigmoid", vec![x()], |g| one(g, "Sigmoid", &["x"], vec![])),
        case("Tanh", vec![x()], |g| one(g, "Tanh", &["x"], vec![])),
        case("Softmax, last axis", vec![x()], |g| one(g, "Softmax", &["x"], vec![attr_int("axis", -1)])),
        case("Softmax, middle axis", vec![x()], |g| one(g, "Softmax", &["x"], vec![attr_int("axis", 1)])),
        case("ReduceMean, kept axis", vec![x()], |g| {
            one(g, "ReduceMean", &["x"], vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)])
        }),
        case("ReduceMean, dropped axes", vec![x()], |g| {
            one(g, "ReduceMean", &["x"], vec![attr_ints("axes", &[0, -1]), attr_int("keepdims", 0)])
        }),
        case("MatMul, weight", vec![x(), I("w", &[4, 5], true, ANY)], |g| one(g, "MatMul", &["x", "w"], vec![])),
        case("MatMul, batched", vec![x(), I("w", &[2, 4, 5], true, ANY)], |g| one(g, "MatMul", &["x", "w"], vec![])),
        case("MatMul, broadcast batch", vec![I("a", &[3, 4], true, ANY), I("w", &[2, 4, 5], true, ANY)], |g| {
            one(g, "MatMul", &["a", "w"], vec![])
        }),
        case(
            "Gemm, transB",
            vec![I("a", &[3, 4], true, ANY), I("b", &[5, 4], true, ANY), I("c", &[5], true, ANY)],
            |g| one(g, "Gemm", &["a", "b", "c"], vec![attr_int("transB", 1)]),
        ),
        case(
            "Gemm, beta",
            vec![I("a", &[3, 4], true, ANY), I("b", &[4, 5], true, ANY), I("c", &[3, 5], true, ANY)],
            |g| one(g, "Gemm", &["a", "b", "c"], vec![attr_float("beta", 0.5)]),
        ),
        case("Reshape", vec![x()], |g| {
            let shape = g.const_i64("shape", &[6, 4]);
            one(g, "Reshape", &["x", &shape], vec![])
        }),
        case("Transpose", vec![x()], |g| one(g, "Transpose", &["x"], vec![attr_ints("perm", &[2, 0, 1])])),
        case("Transpose, default perm", vec![x()], |g| one(g, "Transpose", &["x"], vec![])),
        case("Unsqueeze", vec![x()], |g| {
            let axes = g.const_i64("axes", &[1]);
            one(g, "Unsqueeze", &["x", &axes], vec![])
        }),
        case("Squeeze", vec![I("x", &[2, 1, 4], true, ANY)], |g| {
            let axes = g.const_i64("axes", &[1]);
            one(g, "Squeeze", &["x", &axes], vec![])
        }),
        case("Squeeze, no axes", vec![I("x", &[2, 1, 4], true, ANY)], |g| one(g, "Squeeze", &["x"], vec![])),
        case("Split, then Concat", vec![x()], |g| {
            let split = g.const_i64("split", &[1, 3]);
            let parts = g.op_multi("t", "Split", &["x", &split], 2, vec![attr_int("axis", 2)]);
            one(g, "Concat", &[&parts[1], &parts[0]], vec![attr_int("axis", 2)])
        }),
        case("Concat", vec![x(), I("z", &[2, 2, 4], true, ANY)], |g| {
            one(g, "Concat", &["x", "z"], vec![attr_int("axis", 1)])
        }),
        case("Where", vec![x(), I("z", &[4], true, ANY)], |g| {
            let cond = g.initializer(TensorProto {
                dims: vec![3, 1],
                data_type: data_type::BOOL,
                name: "cond".into(),
                raw_data: vec![1, 0, 1],
                ..Default::default()
            });
            one(g, "Where", &[&cond, "x", "z"], vec![])
        }),
        case("Gather, index vector", vec![x()], |g| {
            let indices = g.const_i64("indices", &[2, 0, 2]);
            one(g, "Gather", &["x", &indices], vec![attr_int("axis", 1)])
        }),
        case("Gather, scalar index", vec![x()], |g| {
            let index = g.scalar_i64("index", 3);
            one(g, "Gather", &["x", &index], vec![attr_int("axis", -1)])
        }),
        case("LayerNormalization", vec![x(), I("scale", &[4], false, POSITIVE), I("bias", &[4], false, ANY)], |g| {
            one(
                g,
                "LayerNormalization",
                &["x", "scale", "bias"],
                vec![attr_int("axis", -1), attr_float("epsilon", 1e-5)],
            )
        }),
    ]
}

/// Deterministic values in [lo, hi).
fn values(seed: u64, n: usize, (lo, hi): (f32, f32)) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((state >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

fn model(g: Graph) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        graph: Some(g.proto),
        ..Default::default()
    }
}

type Outputs = HashMap<String, (Vec<i64>, Vec<f32>)>;

fn run(session: &mut ort::session::Session, feeds: &[(String, Vec<i64>, Vec<f32>)]) -> Outputs {
    let inputs: Vec<(String, ort::value::DynValue)> = feeds
        .iter()
        .map(|(name, shape, data)| {
            (name.clone(), OrtTensor::from_array((shape.clone(), data.clone())).unwrap().into_dyn())
        })
        .collect();
    let result = session.run(inputs).unwrap();
    let mut out = HashMap::new();
    for (name, value) in result.iter() {
        if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
            out.insert(name.to_string(), (shape.iter().copied().collect(), data.to_vec()));
        }
    }
    out
}

#[test]
fn every_rule_matches_central_differences() {
    runtime::ensure(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (c, case) in cases().into_iter().enumerate() {
        let mut g = Graph::new(case.name);
        for input in &case.inputs {
            g.proto.input.push(float_of_any_shape(input.0));
        }
        let y = (case.build)(&mut g);
        g.proto.output.push(float_of_any_shape(&y));
        let forward = model(g);
        // Every tensor's shape, from one run with every node output made a graph output.
        let mut probe = forward.clone();
        let pg = probe.graph.as_mut().unwrap();
        let outputs: Vec<String> = pg.node.iter().flat_map(|n| n.output.clone()).filter(|o| *o != y).collect();
        pg.output.extend(outputs.iter().map(|o| float_of_any_shape(o)));
        let feeds: Vec<(String, Vec<i64>, Vec<f32>)> = case
            .inputs
            .iter()
            .enumerate()
            .map(|(i, Input(name, shape, _, range))| {
                let n = shape.iter().product::<i64>() as usize;
                (name.to_string(), shape.to_vec(), values(c as u64 * 100 + i as u64, n, *range))
            })
            .collect();
        let mut shapes: HashMap<String, Vec<i64>> =
            run(&mut runtime::session_from_proto(&probe, dir.path(), Device::Cpu).unwrap(), &feeds)
                .into_iter()
                .map(|(name, (shape, _))| (name, shape))
                .collect();
        shapes.extend(feeds.iter().map(|(name, shape, _)| (name.clone(), shape.clone())));
        let wrt: Vec<String> = case.inputs.iter().filter(|i| i.2).map(|i| i.0.to_string()).collect();
        let mut backward = forward.clone();
        autodiff::append_backward(&mut backward, &y, &wrt, &shapes, &HashMap::new()).unwrap();
        let mut session = runtime::session_from_proto(&backward, dir.path(), Device::Cpu).unwrap();
        let y_len = shapes[&y].iter().product::<i64>() as usize;
        let seed = values(7 + c as u64, y_len, ANY);
        let mut with_seed = feeds.clone();
        with_seed.push((autodiff::seed_input(&y), shapes[&y].clone(), seed.clone()));
        let analytic = run(&mut session, &with_seed);
        let loss = |session: &mut ort::session::Session, moved: &[(String, Vec<i64>, Vec<f32>)]| -> f64 {
            let out = run(session, moved);
            out[&y].1.iter().zip(&seed).map(|(a, b)| (a * b) as f64).sum()
        };
        for (i, input) in case.inputs.iter().enumerate().filter(|(_, input)| input.2) {
            let (grad_shape, grad) = &analytic[&autodiff::gradient_output(input.0)];
            assert_eq!(grad_shape, &input.1.to_vec(), "{}: d/d{} has the wrong shape", case.name, input.0);
            let u = values(1000 + c as u64 * 10 + i as u64, grad.len(), ANY);
            let dot: f64 = grad.iter().zip(&u).map(|(g, u)| (g * u) as f64).sum();
            let scale: f64 = grad.iter().zip(&u).map(|(g, u)| (g * u).abs() as f64).sum();
            let eps = 1e-2f32;
            let shifted = |sign: f32| {
                let mut moved = with_seed.clone();
                for (v, d) in moved[i].2.iter_mut().zip(&u) {
                    *v += sign * eps * d;
                }
                moved
            };
            let numeric = (loss(&mut session, &shifted(1.0)) - loss(&mut session, &shifted(-1.0))) / (2.0 * eps as f64);
            assert!(scale > 1e-3, "{}: d/d{} is (nearly) zero, the check is vacuous", case.name, input.0);
            assert!(
                (numeric - dot).abs() <= 1e-3 * scale,
                "{}: d/d{}: analytic {dot} vs numeric {numeric} (scale {scale})",
                case.name,
                input.0
            );
        }
    }
}

/// A gate scales the gradient flowing through its tensor exactly once: with a gate of 0.5 on
/// `t` (itself a requested gradient), dL/dt and dL/dx are half the ungated ones.
#[test]
fn a_gate_scales_the_gradient_once() {
    runtime::ensure(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut g = Graph::new("gate");
    for name in ["x", "half"] {
        g.proto.input.push(float_of_any_shape(name));
    }
    let t = g.op_named("Tanh", &["x"], "t", vec![]);
    let y = g.op_named("Mul", &[&t, &t], "y", vec![]);
    g.proto.output.push(float_of_any_shape(&y));
    let forward = model(g);
    let shapes: HashMap<String, Vec<i64>> =
        [("x", vec![2, 3]), ("half", vec![1]), ("t", vec![2, 3]), ("y", vec![2, 3])]
            .map(|(n, s)| (n.to_string(), s))
            .into();
    let wrt = ["x".to_string(), "t".to_string()];
    let feeds = vec![
        ("x".to_string(), vec![2, 3], values(3, 6, ANY)),
        ("half".to_string(), vec![1], vec![0.5]),
        (autodiff::seed_input("y"), vec![2, 3], values(4, 6, ANY)),
    ];
    let gradients = |gates: HashMap<String, String>| {
        let mut backward = forward.clone();
        autodiff::append_backward(&mut backward, "y", &wrt, &shapes, &gates).unwrap();
        let mut session = runtime::session_from_proto(&backward, dir.path(), Device::Cpu).unwrap();
        let out = run(&mut session, &feeds);
        wrt.iter().map(|x| out[&autodiff::gradient_output(x)].1.clone()).collect::<Vec<_>>()
    };
    let plain = gradients(HashMap::new());
    let gated = gradients([("t".to_string(), "half".to_string())].into());
    for (p, g) in plain.iter().zip(&gated) {
        for (a, b) in p.iter().zip(g) {
            assert!((0.5 * a - b).abs() < 1e-6, "{a} gated to {b}");
        }
    }
}
