//! Builds the ONNX graph of a decoder-only transformer from a [`Checkpoint`], with every hook of
//! [`Manifest::hook_table`] as a named tensor.
//!
//! Inputs (all int64 `[batch, pos]`): `input_ids`, `position_ids`, `attention_mask` (1 = real
//! token, 0 = padding). Output: `logits` `[batch, pos, vocab]`. Attention is causal over the
//! sequence index and masked by `attention_mask`, so left-padded batches work.
//!
//! Hook semantics (TransformerLens): `hook_q`/`hook_k` are before the rotary embedding;
//! `hook_z` is the per-head input of the output projection; `hook_pattern` holds softmax
//! probabilities. `blocks.{L+1}.hook_resid_pre` is an Identity of `blocks.{L}.hook_resid_post`,
//! so a patch can rewire either one.

use indicatif::ProgressBar;

use super::proto::{data_type, ModelProto, OperatorSetIdProto};
use super::writer::{attr_float, attr_int, attr_ints, value_info, ExternalData, Graph};
use crate::model::checkpoint::{optional, required, Checkpoint, Tensor};
use crate::model::{Architecture, Dim, Manifest, ModelConfig};

pub const INPUTS: [&str; 3] = ["input_ids", "position_ids", "attention_mask"];
pub const LOGITS: &str = "logits";
/// Opset 17: LayerNormalization exists, ReduceMean still takes `axes` as an attribute.
pub const OPSET: i64 = 17;
/// Masked attention scores; finite so a fully padded row gives no NaN, and exp() of it is 0.
const MASKED_SCORE: f32 = -1e9;

/// Shared tensors every block reads.
struct Context {
    /// Additive attention bias [batch, 1, q, k].
    attn_bias: String,
    /// RoPE tables gathered at the input positions, [batch, pos, 1, d_head] (llama only).
    rope: Option<(String, String)>,
}

struct Builder<'a> {
    graph: Graph,
    data: &'a mut ExternalData,
    ckpt: &'a dyn Checkpoint,
    config: ModelConfig,
    progress: &'a ProgressBar,
}

/// Build the graph, streaming weights into `data`. `progress` counts weight tensors
/// (see [`weight_count`]).
pub fn build(ckpt: &dyn Checkpoint, data: &mut ExternalData, progress: &ProgressBar) -> anyhow::Result<ModelProto> {
    let config = ckpt.config().clone();
    validate(&config)?;
    let mut b = Builder { graph: Graph::new("patchbay"), data, ckpt, config: config.clone(), progress };
    let graph = &mut b.graph;
    let batch_pos = [Dim::Symbolic("batch".into()), Dim::Symbolic("pos".into())];
    for name in INPUTS {
        graph.proto.input.push(value_info(name, data_type::INT64, &batch_pos));
    }

    let ctx = b.context()?;
    let embed = b.embedding()?;
    let mut resid = b.graph.op_named("Identity", &[&embed], "blocks.0.hook_resid_pre", vec![]);
    for layer in 0..config.n_layers {
        let post = b.block(layer, &resid, &ctx)?;
        resid = if layer + 1 < config.n_layers {
            b.graph.op_named("Identity", &[&post], &format!("blocks.{}.hook_resid_pre", layer + 1), vec![])
        } else {
            post
        };
    }
    b.unembed(&resid)?;

    let vocab = Dim::Fixed(config.vocab_size);
    b.graph.proto.output.push(value_info(
        LOGITS,
        data_type::FLOAT,
        &[batch_pos[0].clone(), batch_pos[1].clone(), vocab],
    ));
    for (name, hook) in Manifest::hook_table(&config) {
        b.graph.proto.value_info.push(value_info(&name, data_type::FLOAT, &hook.shape));
    }
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "patchbay".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(b.graph.proto),
        ..Default::default()
    })
}

/// How many weight tensors [`build`] streams (for a progress bar).
pub fn weight_count(config: &ModelConfig) -> u64 {
    // Optional biases count too: they tick the bar whether present or not.
    let (per_block, global) = match config.architecture {
        Architecture::Llama => (13, 3),
        Architecture::Gpt2 => (16, 5),
    };
    (per_block * config.n_layers + global) as u64
}

fn validate(c: &ModelConfig) -> anyhow::Result<()> {
    crate::model::rope::validate(c.d_head, c.rope_scaling.as_ref())?;
    let ok = c.n_layers > 0
        && c.n_heads > 0
        && c.n_kv_heads > 0
        && c.n_heads.is_multiple_of(c.n_kv_heads)
        && c.d_head > 0
        && c.d_head.is_multiple_of(2)
        && c.d_model > 0
        && c.d_mlp > 0
        && c.vocab_size > 0
        && c.n_ctx > 0;
    if !ok {
        anyhow::bail!(
            "inconsistent model config (need n_heads divisible by n_kv_heads, even d_head, all sizes > 0): {c:?}"
        );
    }
    Ok(())
}

/// The shape `x.shape[..keep_front] ++ middle ++ x.shape[resume..]`, computed in the graph so
/// that dynamic axes (batch, query and key positions) pass through whatever their sizes.
fn reshape_keeping_ends(g: &mut Graph, scope: &str, x: &str, keep_front: i64, middle: &str, resume: i64) -> String {
    let front = g.op(scope, "Shape", &[x], vec![attr_int("start", 0), attr_int("end", keep_front)]);
    let back = g.op(scope, "Shape", &[x], vec![attr_int("start", resume)]);
    g.op(scope, "Concat", &[&front, middle, &back], vec![attr_int("axis", 0)])
}

impl Builder<'_> {
    fn store(&mut self, name: &str, t: &Tensor) -> anyhow::Result<String> {
        let proto = self.data.add(name, &t.shape, &t.data)?;
        self.progress.inc(1);
        Ok(self.graph.initializer(proto))
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<String> {
        let t = required(self.ckpt, name, shape)?;
        self.store(name, &t)
    }

    /// A linear layer's weight `[out, in]`, stored transposed for MatMul.
    fn linear_weight(&mut self, name: &str, out: usize, inp: usize) -> anyhow::Result<String> {
        let t = required(self.ckpt, name, &[out, inp])?;
        // Canonical `[out, in]` becomes MatMul's `[in, out]`.
        self.store(name, &t.transposed())
    }

    fn optional_weight(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<Option<String>> {
        match optional(self.ckpt, name, shape)? {
            Some(t) => Ok(Some(self.store(name, &t)?)),
            None => {
                self.progress.inc(1);
                Ok(None)
            }
        }
    }

    /// `x @ W^T (+ b)` for a canonical `[out, in]` weight; `output` names the result.
    fn linear(&mut self, scope: &str, x: &str, w: &str, b: Option<&str>, output: Option<&str>) -> String {
        let Some(b) = b else {
            return match output {
                Some(out) => self.graph.op_named("MatMul", &[x, w], out, vec![]),
                None => self.graph.op(scope, "MatMul", &[x, w], vec![]),
            };
        };
        let product = self.graph.op(scope, "MatMul", &[x, w], vec![]);
        match output {
            Some(out) => self.graph.op_named("Add", &[&product, b], out, vec![]),
            None => self.graph.op(scope, "Add", &[&product, b], vec![]),
        }
    }

    fn context(&mut self) -> anyhow::Result<Context> {
        let g = &mut self.graph;
        let s = "mask";
        // Causal over the sequence index: key k is visible from query q when k <= q.
        let shape = g.op(s, "Shape", &["input_ids"], vec![]);
        let one = g.const_i64("const.i64_1", &[1]);
        let seq_len_1d = g.op(s, "Gather", &[&shape, &one], vec![attr_int("axis", 0)]);
        let zero_s = g.scalar_i64("const.scalar_i64_0", 0);
        let one_s = g.scalar_i64("const.scalar_i64_1", 1);
        let axes0 = g.const_i64("const.axes_0", &[0]);
        let seq_len = g.op(s, "Squeeze", &[&seq_len_1d, &axes0], vec![]);
        let idx = g.op(s, "Range", &[&zero_s, &seq_len, &one_s], vec![]);
        let q_idx = g.op(s, "Unsqueeze", &[&idx, &one], vec![]);
        let k_idx = g.op(s, "Unsqueeze", &[&idx, &axes0], vec![]);
        let causal = g.op(s, "LessOrEqual", &[&k_idx, &q_idx], vec![]);
        // Padding: keys whose attention_mask is 0 are invisible. [batch, 1, 1, k]
        let key_ok = g.op(s, "Cast", &["attention_mask"], vec![attr_int("to", 9)]);
        let axes12 = g.const_i64("const.axes_1_2", &[1, 2]);
        let key_ok = g.op(s, "Unsqueeze", &[&key_ok, &axes12], vec![]);
        let allowed = g.op(s, "And", &[&causal, &key_ok], vec![]);
        let zero_f = g.scalar_f32("const.f32_0", 0.0);
        let masked = g.scalar_f32("const.f32_masked", MASKED_SCORE);
        let attn_bias = g.op(s, "Where", &[&allowed, &zero_f, &masked], vec![]);

        let rope = match self.config.architecture {
            Architecture::Gpt2 => None,
            Architecture::Llama => Some(self.rope_tables()?),
        };
        Ok(Context { attn_bias, rope })
    }

    /// cos/sin of HF's rotate-half RoPE, tabulated for positions 0..n_ctx and gathered at the
    /// input positions: [batch, pos, 1, d_head].
    fn rope_tables(&mut self) -> anyhow::Result<(String, String)> {
        let c = &self.config;
        let inv_freq = c
            .rope_inv_freq()
            .ok_or_else(|| anyhow::anyhow!("a {} model needs a RoPE base frequency", c.architecture.name()))?;
        let half = c.d_head / 2;
        let mut cos = Vec::with_capacity(c.n_ctx * c.d_head);
        let mut sin = Vec::with_capacity(c.n_ctx * c.d_head);
        for pos in 0..c.n_ctx {
            for i in 0..c.d_head {
                // f32 like transformers, so the tables match its own as closely as possible.
                let angle = pos as f32 * inv_freq[i % half];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = [c.n_ctx, c.d_head];
        let cos = self.data.add("rope.cos", &shape, &cos)?;
        let sin = self.data.add("rope.sin", &shape, &sin)?;
        let g = &mut self.graph;
        let cos = g.initializer(cos);
        let sin = g.initializer(sin);
        let axis2 = g.const_i64("const.axes_2", &[2]);
        let cos = g.op("rope", "Gather", &[&cos, "position_ids"], vec![]);
        let sin = g.op("rope", "Gather", &[&sin, "position_ids"], vec![]);
        let cos = g.op("rope", "Unsqueeze", &[&cos, &axis2], vec![]);
        let sin = g.op("rope", "Unsqueeze", &[&sin, &axis2], vec![]);
        Ok((cos, sin))
    }

    fn embedding(&mut self) -> anyhow::Result<String> {
        let c = self.config.clone();
        let w_e = self.weight("embed.W_E", &[c.vocab_size, c.d_model])?;
        let embed = self.graph.op_named("Gather", &[&w_e, "input_ids"], "hook_embed", vec![]);
        if c.architecture == Architecture::Gpt2 {
            let w_pos = self.weight("pos_embed.W_pos", &[c.n_ctx, c.d_model])?;
            let pos = self.graph.op_named("Gather", &[&w_pos, "position_ids"], "hook_pos_embed", vec![]);
            return Ok(self.graph.op("embed", "Add", &[&embed, &pos], vec![]));
        }
        Ok(embed)
    }

    fn norm(&mut self, scope: &str, x: &str, prefix: &str) -> anyhow::Result<String> {
        let d = self.config.d_model;
        let eps = self.config.norm_eps;
        let w = self.weight(&format!("{prefix}.w"), &[d])?;
        match self.config.architecture {
            Architecture::Gpt2 => {
                let b = self.weight(&format!("{prefix}.b"), &[d])?;
                let attrs = vec![attr_int("axis", -1), attr_float("epsilon", eps)];
                Ok(self.graph.op(scope, "LayerNormalization", &[x, &w, &b], attrs))
            }
            Architecture::Llama => {
                // RMSNorm: x / sqrt(mean(x^2) + eps) * w
                let g = &mut self.graph;
                let sq = g.op(scope, "Mul", &[x, x], vec![]);
                let ms = g.op(scope, "ReduceMean", &[&sq], vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)]);
                let eps = g.scalar_f32(&format!("const.eps_{eps}"), eps);
                let ms = g.op(scope, "Add", &[&ms, &eps], vec![]);
                let rms = g.op(scope, "Sqrt", &[&ms], vec![]);
                let inv = g.op(scope, "Reciprocal", &[&rms], vec![]);
                let normed = g.op(scope, "Mul", &[x, &inv], vec![]);
                Ok(g.op(scope, "Mul", &[&normed, &w], vec![]))
            }
        }
    }

    fn block(&mut self, layer: usize, resid_pre: &str, ctx: &Context) -> anyhow::Result<String> {
        let c = self.config.clone();
        let (h, kv, dh) = (c.n_heads as i64, c.n_kv_heads as i64, c.d_head as i64);
        let group = h / kv;
        let p = format!("blocks.{layer}");
        let s = format!("{p}.attn");
        let gpt2 = c.architecture == Architecture::Gpt2;

        // Attention.
        let x = self.norm(&s, resid_pre, &format!("{p}.ln1"))?;
        let heads = |me: &mut Self, which: &str, n: usize| -> anyhow::Result<String> {
            let w = me.linear_weight(&format!("{s}.W_{which}"), n * c.d_head, c.d_model)?;
            let b = if gpt2 {
                Some(me.weight(&format!("{s}.b_{which}"), &[n * c.d_head])?)
            } else {
                me.optional_weight(&format!("{s}.b_{which}"), &[n * c.d_head])?
            };
            let flat = me.linear(&s, &x, &w, b.as_deref(), None);
            let shape = me.graph.const_i64(&format!("const.shape_heads_{n}_{dh}"), &[0, 0, n as i64, dh]);
            let hook = format!("{s}.hook_{}", which.to_lowercase());
            Ok(me.graph.op_named("Reshape", &[&flat, &shape], &hook, vec![]))
        };
        let q = heads(self, "Q", c.n_heads)?;
        let k = heads(self, "K", c.n_kv_heads)?;
        let v = heads(self, "V", c.n_kv_heads)?;
        let (q, k) = match &ctx.rope {
            Some((cos, sin)) => (self.rotary(&s, &q, cos, sin), self.rotary(&s, &k, cos, sin)),
            None => (q, k),
        };
        let g = &mut self.graph;
        let perm = vec![attr_ints("perm", &[0, 2, 1, 3])];
        // Grouped-query attention without copying K/V: view Q as [batch, kv, group, pos, d_head]
        // and let MatMul broadcast K/V over the group axis (head h reads kv head h / group).
        let q = g.op(&s, "Transpose", &[&q], perm.clone());
        let grouped = g.const_i64(&format!("const.shape_grouped_{kv}_{group}_{dh}"), &[0, kv, group, -1, dh]);
        let q = g.op(&s, "Reshape", &[&q, &grouped], vec![]);
        let axis2 = g.const_i64("const.axes_2", &[2]);
        let k = g.op(&s, "Transpose", &[&k], vec![attr_ints("perm", &[0, 2, 3, 1])]);
        let k = g.op(&s, "Unsqueeze", &[&k, &axis2], vec![]);
        let v = g.op(&s, "Transpose", &[&v], perm.clone());
        let v = g.op(&s, "Unsqueeze", &[&v, &axis2], vec![]);
        let scores = g.op(&s, "MatMul", &[&q, &k], vec![]);
        let scale = g.scalar_f32(&format!("const.attn_scale_{dh}"), 1.0 / (c.d_head as f32).sqrt());
        let scores = g.op(&s, "Mul", &[&scores, &scale], vec![]);
        let heads_axis = g.const_i64(&format!("const.heads_{h}"), &[h]);
        let by_head = reshape_keeping_ends(g, &s, &scores, 1, &heads_axis, 3);
        let scores = g.op(&s, "Reshape", &[&scores, &by_head], vec![]);
        let scores = g.op(&s, "Add", &[&scores, &ctx.attn_bias], vec![]);
        let pattern = g.op_named("Softmax", &[&scores], &format!("{s}.hook_pattern"), vec![attr_int("axis", -1)]);
        let groups_axes = g.const_i64(&format!("const.groups_{kv}_{group}"), &[kv, group]);
        let grouped_pattern = reshape_keeping_ends(g, &s, &pattern, 1, &groups_axes, 2);
        let pattern5 = g.op(&s, "Reshape", &[&pattern, &grouped_pattern], vec![]);
        let z = g.op(&s, "MatMul", &[&pattern5, &v], vec![]);
        let by_head = g.const_i64(&format!("const.shape_z_{h}_{dh}"), &[0, h, -1, dh]);
        let z = g.op(&s, "Reshape", &[&z, &by_head], vec![]);
        let z = g.op_named("Transpose", &[&z], &format!("{s}.hook_z"), perm);
        let flat = g.const_i64(&format!("const.shape_flat_{}", h * dh), &[0, 0, h * dh]);
        let z_flat = g.op(&s, "Reshape", &[&z, &flat], vec![]);
        let w_o = self.linear_weight(&format!("{s}.W_O"), c.d_model, c.n_heads * c.d_head)?;
        let b_o = if gpt2 {
            Some(self.weight(&format!("{s}.b_O"), &[c.d_model])?)
        } else {
            self.optional_weight(&format!("{s}.b_O"), &[c.d_model])?
        };
        let attn_out = self.linear(&s, &z_flat, &w_o, b_o.as_deref(), Some(&format!("{p}.hook_attn_out")));
        let resid_mid = self.graph.op_named("Add", &[resid_pre, &attn_out], &format!("{p}.hook_resid_mid"), vec![]);

        // MLP.
        let m = format!("{p}.mlp");
        let x = self.norm(&m, &resid_mid, &format!("{p}.ln2"))?;
        let post_name = format!("{m}.hook_post");
        let w_in = self.linear_weight(&format!("{m}.W_in"), c.d_mlp, c.d_model)?;
        let post = if gpt2 {
            let b_in = self.weight(&format!("{m}.b_in"), &[c.d_mlp])?;
            let pre = self.linear(&m, &x, &w_in, Some(&b_in), None);
            self.gelu_tanh(&m, &pre, &post_name)
        } else {
            let w_gate = self.linear_weight(&format!("{m}.W_gate"), c.d_mlp, c.d_model)?;
            let gate = self.linear(&m, &x, &w_gate, None, None);
            let up = self.linear(&m, &x, &w_in, None, None);
            let g = &mut self.graph;
            let sig = g.op(&m, "Sigmoid", &[&gate], vec![]);
            let silu = g.op(&m, "Mul", &[&gate, &sig], vec![]);
            g.op_named("Mul", &[&silu, &up], &post_name, vec![])
        };
        let w_out = self.linear_weight(&format!("{m}.W_out"), c.d_model, c.d_mlp)?;
        let b_out = if gpt2 { Some(self.weight(&format!("{m}.b_out"), &[c.d_model])?) } else { None };
        let mlp_out = self.linear(&m, &post, &w_out, b_out.as_deref(), Some(&format!("{p}.hook_mlp_out")));
        Ok(self.graph.op_named("Add", &[&resid_mid, &mlp_out], &format!("{p}.hook_resid_post"), vec![]))
    }

    /// x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] over the last axis.
    fn rotary(&mut self, scope: &str, x: &str, cos: &str, sin: &str) -> String {
        let g = &mut self.graph;
        let halves = g.op_multi(scope, "Split", &[x], 2, vec![attr_int("axis", -1)]);
        let neg = g.op(scope, "Neg", &[&halves[1]], vec![]);
        let rotated = g.op(scope, "Concat", &[&neg, &halves[0]], vec![attr_int("axis", -1)]);
        let a = g.op(scope, "Mul", &[x, cos], vec![]);
        let b = g.op(scope, "Mul", &[&rotated, sin], vec![]);
        g.op(scope, "Add", &[&a, &b], vec![])
    }

    /// GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    fn gelu_tanh(&mut self, scope: &str, x: &str, output: &str) -> String {
        let g = &mut self.graph;
        let cube = g.op(scope, "Mul", &[x, x], vec![]);
        let cube = g.op(scope, "Mul", &[&cube, x], vec![]);
        let k = g.scalar_f32("const.gelu_k", 0.044715);
        let cube = g.op(scope, "Mul", &[&cube, &k], vec![]);
        let inner = g.op(scope, "Add", &[x, &cube], vec![]);
        let c = g.scalar_f32("const.gelu_c", (2.0f64 / std::f64::consts::PI).sqrt() as f32);
        let inner = g.op(scope, "Mul", &[&inner, &c], vec![]);
        let t = g.op(scope, "Tanh", &[&inner], vec![]);
        let one = g.scalar_f32("const.f32_1", 1.0);
        let t = g.op(scope, "Add", &[&t, &one], vec![]);
        let half = g.scalar_f32("const.f32_half", 0.5);
        let hx = g.op(scope, "Mul", &[x, &half], vec![]);
        g.op_named("Mul", &[&hx, &t], output, vec![])
    }

    /// Final norm, then logits = x @ W_U^T with Gemm(transB) so a tied W_U is the stored
    /// embedding itself rather than a transposed copy.
    fn unembed(&mut self, resid: &str) -> anyhow::Result<String> {
        let c = self.config.clone();
        let x = self.norm("unembed", resid, "ln_final")?;
        let w_u = if c.tied_embeddings {
            self.progress.inc(1);
            "embed.W_E".to_string()
        } else {
            self.weight("unembed.W_U", &[c.vocab_size, c.d_model])?
        };
        let g = &mut self.graph;
        let rows = g.const_i64(&format!("const.shape_rows_{}", c.d_model), &[-1, c.d_model as i64]);
        let x2 = g.op("unembed", "Reshape", &[&x, &rows], vec![]);
        let logits2 = g.op("unembed", "Gemm", &[&x2, &w_u], vec![attr_int("transB", 1)]);
        // Back to [batch, pos, vocab], reading batch and pos from the normed residual stream
        // itself, so a graph cut to fewer positions (the engine unembeds only the last) works.
        let shape = g.op("unembed", "Shape", &[&x], vec![attr_int("start", 0), attr_int("end", 2)]);
        let vocab = g.const_i64(&format!("const.vocab_{}", c.vocab_size), &[c.vocab_size as i64]);
        let out_shape = g.op("unembed", "Concat", &[&shape, &vocab], vec![attr_int("axis", 0)]);
        Ok(g.op_named("Reshape", &[&logits2, &out_shape], LOGITS, vec![]))
    }
}
