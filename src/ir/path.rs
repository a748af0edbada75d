//! Path patching's part of the experiment IR: a `path` statement's receiver and what it
//! freezes, and the hooks they name.

/// A `path` statement's receiver and freezing (spec/language.md, "path").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PathSpec {
    pub receiver: Receiver,
    /// Attention heads other than the sender are held at their base values between sender and
    /// receiver.
    pub freeze_heads: bool,
    /// MLPs are held at their base values between sender and receiver.
    pub freeze_mlps: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Receiver {
    /// The logits: the metric of the sender-patched, frozen run itself.
    Logits,
    /// The residual stream entering layer `l` (`l` = the layer count: the final one).
    Resid(usize),
    /// Heads' `q`, `k` or `v` input: `(layer, head)`, heads of that hook (KV heads for `k`
    /// and `v`), in order, without repeats; `kv_heads`: they are a grouped-query model's KV
    /// heads (labelled `L20.KV1`, not as the query heads of that number).
    Heads { input: HeadInput, heads: Vec<(usize, usize)>, kv_heads: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HeadInput {
    Q,
    K,
    V,
}

impl HeadInput {
    pub fn name(self) -> &'static str {
        match self {
            HeadInput::Q => "q",
            HeadInput::K => "k",
            HeadInput::V => "v",
        }
    }
}

impl PathSpec {
    /// The hooks held at their base values in layer `l` (between sender and receiver).
    pub fn frozen_hooks(&self, l: usize) -> Vec<String> {
        let mut hooks = vec![];
        if self.freeze_heads {
            hooks.push(format!("blocks.{l}.attn.hook_z"));
        }
        if self.freeze_mlps {
            hooks.push(format!("blocks.{l}.hook_mlp_out"));
        }
        hooks
    }

    /// The hook each receiver reads, with the head it reads (`None`: all of the hook); none
    /// for the logits.
    pub fn receiver_hooks(&self, n_layers: usize) -> Vec<(String, Option<usize>)> {
        match &self.receiver {
            Receiver::Logits => vec![],
            Receiver::Resid(l) if *l == n_layers => vec![(format!("blocks.{}.hook_resid_post", l - 1), None)],
            Receiver::Resid(l) => vec![(format!("blocks.{l}.hook_resid_pre"), None)],
            Receiver::Heads { input, heads, .. } => {
                heads.iter().map(|&(l, h)| (format!("blocks.{l}.attn.hook_{}", input.name()), Some(h))).collect()
            }
        }
    }

    /// With heads and MLPs frozen, the residual stream the receivers' layer reads (the final
    /// one for the logits): step two moves it by the sender's output change alone, so the fast
    /// path enters there.
    pub fn entry_hook(&self, n_layers: usize) -> Option<String> {
        if !(self.freeze_heads && self.freeze_mlps) {
            return None;
        }
        Some(match self.receiver.layer(n_layers) {
            l if l == n_layers => format!("blocks.{}.hook_resid_post", n_layers - 1),
            l => format!("blocks.{l}.hook_resid_pre"),
        })
    }

    /// Every hook a path run patches or reads: the frozen hooks of every layer, the receivers',
    /// and the entry hook.
    pub fn hooks(&self, n_layers: usize) -> Vec<String> {
        let frozen = (0..n_layers).flat_map(|l| self.frozen_hooks(l));
        let receivers = self.receiver_hooks(n_layers).into_iter().map(|(h, _)| h);
        frozen.chain(receivers).chain(self.entry_hook(n_layers)).collect()
    }
}

impl Receiver {
    /// The earliest layer the receiver reads (the layer count for the logits).
    pub fn layer(&self, n_layers: usize) -> usize {
        match self {
            Receiver::Logits => n_layers,
            Receiver::Resid(l) => *l,
            Receiver::Heads { heads, .. } => heads.iter().map(|h| h.0).min().unwrap_or(n_layers),
        }
    }

    /// The latest layer the receiver reads: hooks are frozen up to it, so that a later
    /// receiver's input does not carry the sender's effect through an earlier receiver or the
    /// heads in between.
    pub fn last_layer(&self, n_layers: usize) -> usize {
        match self {
            Receiver::Heads { heads, .. } => heads.iter().map(|h| h.0).max().unwrap_or(n_layers),
            other => other.layer(n_layers),
        }
    }

    /// The receiver as written in a row, e.g. `logits`, `resid 12`, `[L23.H3, L20.H0] q`.
    pub fn label(&self) -> String {
        match self {
            Receiver::Logits => "logits".into(),
            Receiver::Resid(l) => format!("resid {l}"),
            Receiver::Heads { input, heads, kv_heads } => {
                let kind = if *kv_heads { "KV" } else { "H" };
                let list: Vec<String> = heads.iter().map(|(l, h)| format!("L{l}.{kind}{h}")).collect();
                format!("[{}] {}", list.join(", "), input.name())
            }
        }
    }
}
