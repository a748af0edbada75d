//! The labels and help of each [`CheckError`].

use std::path::Path;

use super::{CheckError, Decimal, ReadFailure, Retokenised};
use crate::diag::{did_you_mean, Span};

const MODEL_HELP: &str = "run `patchbay demo` to fetch the demo model or `patchbay import ...`";
const SEED_HELP: &str =
    "a seed is a whole number from 0 to 9223372036854775807 that makes random draws repeatable, e.g. `seed 1`";

impl CheckError {
    /// The label on the error's span.
    pub(super) fn label(&self) -> String {
        use CheckError::*;
        match self {
            DuplicateDefinition { .. } => "defined again here".into(),
            UnknownName { what, name, .. } => format!("no {what} named `{name}`"),
            UnknownDevice { name } => format!("no device named `{name}`"),
            UnknownSweepAxis { name } => format!("no sweep axis named `{name}`"),
            DuplicateSweepValue { .. } | DuplicateReplacement { .. } | DuplicateHook { .. } => "again here".into(),
            NoModel { .. } => "expected a `model` statement".into(),
            MissingModel { dir, .. } => format!("no model directory at {}", dir.display()),
            BadManifest { .. } | BadTokenizer { .. } => "this model".into(),
            ReportExtension { .. } => "neither .html nor .md".into(),
            BatchOutOfRange | CountOutOfRange | SamplesOutOfRange | EffectThresholdNotFinite => "out of range".into(),
            MissingFile { error, .. } => error.clone(),
            EmptyPool => "empty pool".into(),
            EmptyPoolFile { .. } => "empty file".into(),
            NoTemplate { .. } => "no `template`".into(),
            UnclosedBrace => "no matching `}`".into(),
            BadPlaceholder { name, .. } if name.trim().is_empty() => "no slot name".into(),
            BadPlaceholder { name, .. } if name.contains('{') => "unclosed `{`".into(),
            BadPlaceholder { .. } => "not a slot name".into(),
            SlotRepeatedInTemplate { .. } => "second use".into(),
            SlotWithoutValues { .. } => "no `slot` line for this".into(),
            SlotNotInTemplate { .. } | CorruptionSlotNotInDataset { .. } | PositionNotASlot { .. } => {
                "not a slot of the template".into()
            }
            SlotChain => "this slot is itself `=` another".into(),
            PoolTooSmall { slots, .. } => format!("{slots} distinct slots"),
            EmptySlotPool { .. } | EmptySlot => "in this template".into(),
            SlotWithoutTokens { .. } => "this slot".into(),
            ColumnWithoutFile { .. } => "this dataset has no file".into(),
            NegativeSeed => "negative".into(),
            SeedTooLarge | DecimalTooLarge { .. } => "too large".into(),
            BadCsv { .. } | BadJsonl { .. } => "in this file".into(),
            EmptyFile { .. } => "empty".into(),
            MissingColumn { .. } => "no such column".into(),
            RowMissingColumn { .. } => "missing in that row".into(),
            NoPromptColumn { .. } => "no `prompt: column`".into(),
            NoAnswerColumn { .. } => "no `answer: column`".into(),
            TemplateWithFile { .. } => "template".into(),
            SlotInFileDataset | AnswerInFileDataset => "not in a file dataset".into(),
            SlotNotInPrompt { .. } => "slot column".into(),
            NoAnswer { .. } => "no `answer`".into(),
            MultiTokenAnswer { .. } => "an answer must be a single token".into(),
            MultiTokenSetMember { .. } => "every member of a token set must be a single token".into(),
            NotANumber { .. } => "numeric comparison".into(),
            EmptyTokenSet { .. } => "empty token set".into(),
            NeedsWrongAnswer { .. } => "reads z_r - z_r'".into(),
            NoiseScaleNotPositive | DetectionThresholdNotPositive => "not positive".into(),
            ReplaceChangesTokenCount { .. }
            | CounterfactualChangesTokenCount { .. }
            | ResampleChangesTokenCount { .. } => "this corruption".into(),
            NoPool { .. } => "no pool".into(),
            ResamplePoolTooSmall { .. } => "distinct resampling".into(),
            NoCounterfactual { .. } => "needs `counterfactual: column`".into(),
            AblationUnequalLengths { .. } => "this ablation".into(),
            AblationDirection { .. } => "denoising variants skip it".into(),
            UnknownHook { .. } => "unknown hook".into(),
            MixedLayeredHooks => "mixed".into(),
            MixedHeadCounts { .. } => "heads".into(),
            HookHasNoLayers { .. } => "not selectable".into(),
            HookHasNoHeads { .. } => "no heads to select".into(),
            FixedLayer => "layer given in the name".into(),
            LayerOutOfRange { .. } => "no such layer".into(),
            LayerNumberTooLarge { .. } | HeadNumberTooLarge { .. } => "number too large".into(),
            HeadOutOfRange { .. } | HeadNotPatched { .. } => "no such head".into(),
            EmptyRange { .. } => "start is after end".into(),
            PositionOutOfRange { .. } => "no such token".into(),
            PositionsEachUnequalLengths { .. } => "one patch per token index".into(),
            SummationWithoutWindow => "no `window` here".into(),
            VerifyWithoutEstimate => "no `by attribution` or `by atp*` here".into(),
            VerifyCount { .. } => "not a positive count of a sane size".into(),
            WindowWithoutLayers => "window".into(),
            WindowOutOfRange { .. } => "bad window".into(),
            PathSender { .. } => "not a head or MLP output".into(),
            PathReceiverOutOfRange { .. } => "no such receiver".into(),
            PathReceiverNotAfterSender { .. } => "not after every sender".into(),
            PathGroupedReceiver { .. } => "a shared key/value head".into(),
            NoDataset => "no `dataset`".into(),
            EmptySweep { axis } => format!("no {axis}"),
            NoCorruption => "no corruption".into(),
            PatchNotInSweep { .. } => "not in the sweep".into(),
            MetricNotComputed { .. } => "not computed".into(),
            LayerNotPatched { .. } => "not a patched component".into(),
            NotPatchedPerHead { .. } => "has a head".into(),
            NeedsHead { .. } => "no head".into(),
            PositionNotPatched { .. } => "position".into(),
            NeedsPosition { .. } => "no position".into(),
            TopKTooSmall => "k".into(),
            TopKTooLarge { components, .. } => format!("more than {components}"),
            NoSuchVariant { .. } => "not in the sweep".into(),
        }
    }

    /// Secondary labels (in another file they become related notes).
    pub(super) fn labels(&self) -> Vec<(&Span, String)> {
        match self {
            CheckError::DuplicateDefinition { prev, .. } => vec![(prev, "first defined here".into())],
            CheckError::PoolTooSmall { distinct, pool, .. } => vec![(pool, format!("{distinct} distinct value(s)"))],
            CheckError::MissingColumn { file_span, .. } | CheckError::RowMissingColumn { file_span, .. } => {
                vec![(file_span, "in this file".into())]
            }
            CheckError::TemplateWithFile { file_span } => vec![(file_span, "file".into())],
            CheckError::MetricNotComputed { metric_axis: Some(axis), .. } => {
                vec![(axis, "the sweep computes only these".into())]
            }
            CheckError::TopKTooLarge { components, patch_span, .. } => {
                vec![(patch_span, format!("{components} component(s) per variant"))]
            }
            _ => Vec::new(),
        }
    }

    /// How to fix it.
    pub(super) fn help(&self) -> Option<String> {
        use CheckError::*;
        Some(match self {
            DuplicateDefinition { .. } => "rename one of them, or delete the repeated definition".into(),
            UnknownName { what, name, candidates } => match did_you_mean(name, candidates.iter().map(|s| s.as_str())) {
                Some(s) => format!("did you mean `{s}`?"),
                None if candidates.is_empty() => format!("no {what} is defined"),
                None => format!("defined: {}", candidates.join(", ")),
            },
            UnknownDevice { .. } => "devices are `cpu` and `cuda`".into(),
            UnknownSweepAxis { .. } => {
                "sweep axes: dataset, corruption, direction, patch, metric (windows are listed on the patch)".into()
            }
            DuplicateSweepValue { .. } => "list each value once".into(),
            NoModel { .. } => "add a line like `model \"smollm2-135m\" on cpu` (a model directory or a name in the \
                               models folder); spec/language.md shows a complete experiment"
                .into(),
            MissingModel { .. } | BadManifest { .. } | BadTokenizer { .. } => MODEL_HELP.into(),
            ReportExtension { .. } => "name the report `.html` (a self-contained page) or `.md` (Markdown with SVG files beside it)".into(),
            BatchOutOfRange => "batch caps the patched passes per ONNX Runtime call (default: as many as `--memory` allows), e.g. `batch 64`".into(),
            MissingFile { path, failure, .. } => failure.help(path),
            EmptyPool => "list at least one value: `[\" Mary\", \" John\"]`".into(),
            EmptyPoolFile { path, .. } => {
                format!("write one value per line into {} (blank lines are skipped)", path.display())
            }
            NoTemplate { .. } => "add `template \"When{IO} and{S1} went to the store,{S2} gave a drink to\"`, or \
                                  read prompts from a file with `from \"file.csv\"`"
                .into(),
            UnclosedBrace => "write slots as `{NAME}`, with a name made of letters, digits and `_`".into(),
            BadPlaceholder { declared, .. } => {
                let example = declared.first().map(|s| s.as_str()).unwrap_or("IO");
                let mut help = format!(
                    "write each slot as `{{NAME}}`, e.g. `{{{example}}}`, where NAME is letters, digits and `_` \
                     (`[A-Za-z_][A-Za-z0-9_]*`) and has a `slot NAME ...` line; templates cannot contain other braces"
                );
                if !declared.is_empty() {
                    help.push_str(&format!("; declared slots: {}", declared.join(", ")));
                }
                help
            }
            SlotRepeatedInTemplate { slot } => {
                format!("a slot appears once; for a repeated name declare another slot: `slot {slot}2 = {slot}`")
            }
            SlotWithoutValues { slot, slots } => match did_you_mean(slot, slots.iter().map(|s| s.as_str())) {
                Some(s) => format!("did you mean `{s}`? otherwise declare `slot {slot} from <pool>`"),
                None => format!("declare it: `slot {slot} from <pool>`"),
            },
            SlotNotInTemplate { slot, slots } | CorruptionSlotNotInDataset { slot, slots, .. } => {
                slot_help(slot, slots)
            }
            SlotChain => "point both slots at the slot that draws from a pool".into(),
            PoolTooSmall { .. } | ResamplePoolTooSmall { .. } => "add values to the pool, or drop `distinct`".into(),
            EmptySlotPool { .. } => "give the slot a pool with at least one value".into(),
            EmptySlot => "every slot value must be non-empty text".into(),
            SlotWithoutTokens { .. } => {
                "give the slot a non-empty value that the tokenizer maps to at least one token".into()
            }
            ColumnWithoutFile { dataset } => {
                format!("write `dataset {dataset} from \"prompts.csv\" {{ ... }}` to read prompts from a file")
            }
            CountOutOfRange => "count is the number of prompts; patching cost grows with it (default 32)".into(),
            NegativeSeed | SeedTooLarge => SEED_HELP.into(),
            BadCsv { .. } => "a CSV file needs a header row and the same number of fields on every row (quote fields \
                              with commas)"
                .into(),
            BadJsonl { .. } => {
                "a .jsonl file holds one JSON object per line: {\"prompt\": \"...\", \"answer\": \" Paris\"}".into()
            }
            EmptyFile { jsonl: true, .. } => "add one JSON object per line".into(),
            EmptyFile { jsonl: false, .. } => "add a header row naming the columns, then one row per prompt".into(),
            MissingColumn { column, columns, .. } => match did_you_mean(column, columns.iter().map(|s| s.as_str())) {
                Some(s) => format!("did you mean `{s}`? the columns are: {}", columns.join(", ")),
                None => format!("the columns are: {}", columns.join(", ")),
            },
            RowMissingColumn { file, column, .. } => format!("give every line of `{file}` a `{column}` key"),
            NoPromptColumn { file, columns, .. } | NoAnswerColumn { file, columns, .. } => {
                format!("the columns of `{file}` are: {}", columns.join(", "))
            }
            TemplateWithFile { .. } => return None,
            SlotInFileDataset => "write `slot S: column`, where the column holds text that occurs in the prompt".into(),
            AnswerInFileDataset => "write `answer: column` (and `wrong: column`)".into(),
            SlotNotInPrompt { .. } => "a slot column must hold text that occurs in the prompt".into(),
            NoAnswer { .. } => "name the correct next token: `answer IO` (a slot), `answer \" Paris\"` or `answer \
                                set years where > YY`"
                .into(),
            MultiTokenAnswer { .. } => "metrics read the logit of one next token, so patchbay never silently uses \
                                        the first token of a longer answer: choose single-token values (mind the \
                                        leading space), or declare a token set with `answer set [...]`"
                .into(),
            MultiTokenSetMember { .. } => "remove it from the set, or use values the tokenizer keeps whole".into(),
            NotANumber { .. } => "a filtered token set compares pool values and the slot's value as numbers".into(),
            EmptyTokenSet { .. } => {
                "restrict the slot's pool so that every prompt has at least one token in the set".into()
            }
            NeedsWrongAnswer { .. } => {
                "add `wrong S1` (or `wrong: column`) to the dataset, or use `prob`, `logprob` or `kl`".into()
            }
            DuplicateReplacement { .. } => "replace each slot once, e.g. `replace S2 with IO, S1 with \" John\"`; \
                                            for another choice, define a second corruption"
                .into(),
            NoiseScaleNotPositive => Decimal::NoiseScale.help().into(),
            SamplesOutOfRange => {
                "samples is the number of noise draws per prompt (default 10), e.g. `samples 10`".into()
            }
            DecimalTooLarge { of, .. } => of.help().into(),
            ReplaceChangesTokenCount { tokens, .. } => {
                tokens.help("STR needs replacements with the same number of tokens as the originals")
            }
            CounterfactualChangesTokenCount { tokens, .. } => {
                tokens.help("a counterfactual prompt must have as many tokens as its clean prompt")
            }
            ResampleChangesTokenCount { text, shown, .. } => format!(
                "clean: {text:?}\n  {shown}\nSTR needs pool values with the same number of tokens as the originals"
            ),
            NoPool { .. } => "resampling draws fresh values from the slot's pool; prompt-file slots have none".into(),
            NoCounterfactual { .. } => {
                "counterfactual corruption reads the corrupted prompt from a prompt file's column".into()
            }
            AblationUnequalLengths { .. } => "use pool values with equal token counts, or zero ablation".into(),
            AblationDirection { .. } => "ablations replace a component of the clean run; add `direction: [noise]` \
                                         to the sweep to silence this"
                .into(),
            UnknownHook { model, hooks, suggestion: Some(s), .. } => {
                format!("did you mean `{s}`? hooks of `{model}`: {}", hooks.join(", "))
            }
            UnknownHook { model, hooks, suggestion: None, .. } => {
                format!("hooks of `{model}`: {}", hooks.join(", "))
            }
            DuplicateHook { .. } => "list each hook once in `{...}`".into(),
            MixedLayeredHooks => "a layer-less hook (`hook_embed`) cannot be patched jointly with per-layer hooks: \
                                  give it its own target, e.g. `patch emb = hook_embed` and `patch joint = \
                                  {hook_attn_out, hook_mlp_out}`"
                .into(),
            MixedHeadCounts { .. } => "patch such hooks in separate targets (`hook_k`/`hook_v` have n_kv_heads \
                                       heads, `hook_q`/`hook_z` have n_heads), or drop `heads` to patch all heads \
                                       together"
                .into(),
            HookHasNoLayers { .. } => "drop `layers` for this hook".into(),
            HookHasNoHeads { .. } => {
                "per-head hooks: attn.hook_z, attn.hook_q, attn.hook_k, attn.hook_v, attn.hook_pattern".into()
            }
            FixedLayer => "write the short hook name (`hook_mlp_out`) with `layers ...`".into(),
            LayerOutOfRange { n_layers, .. } => {
                let last = n_layers.saturating_sub(1);
                format!("layers are numbered from 0; write `layers 0..{last}` or `layers all` for every layer")
            }
            LayerNumberTooLarge { n_layers: n, .. } => {
                let last = n.saturating_sub(1);
                format!("the model has {n} layers, numbered 0..{last}; write `layers 0..{last}` or `layers all` for every layer")
            }
            HeadOutOfRange { grouped_query: true, .. } => {
                "keys and values have fewer heads than queries (grouped-query attention)".into()
            }
            HeadOutOfRange { n_heads, .. } => format!("heads are numbered from 0; write `heads all` for all {n_heads}"),
            HeadNumberTooLarge { hook, n_heads: n, .. } => {
                format!(
                    "`{hook}` has {n} heads, numbered 0..{}; write `heads all` for all of them",
                    n.saturating_sub(1)
                )
            }
            EmptyRange { start, end } => format!("ranges are inclusive and ascending: write {end}..{start}"),
            PositionNotASlot { position, slots, .. } => format!(
                "{} positions are slot names, `end`, or token indices (negative from the end)",
                slot_help(position, slots)
            ),
            PositionOutOfRange { n_tokens: n, .. } => format!("indices run 0..{} (or -{n}..-1 from the end)", n - 1),
            PositionsEachUnequalLengths { .. } => {
                "name the positions instead (slot names, `end`), which work for prompts of any length".into()
            }
            SummationWithoutWindow => "add `window [3, 5]` to this patch".into(),
            VerifyWithoutEstimate => "add `by attribution` (or `by atp*`) before `verify`, or drop `verify top k`".into(),
            VerifyCount { .. } => "verify at least one component, e.g. `verify top 20`".into(),
            WindowWithoutLayers => {
                "drop `window` for a layer-less hook, or patch a per-layer hook such as `hook_mlp_out`".into()
            }
            PathSender { .. } => "write `from attn.hook_z layers ... heads ...` or `from hook_mlp_out layers ...`".into(),
            PathReceiverOutOfRange { .. } => {
                "receivers are `logits`, `resid N` (0 < N <= layers; N = layers is the final residual stream), or heads `LN.HM` with `q`, `k` or `v`".into()
            }
            PathReceiverNotAfterSender { .. } => "choose senders in earlier layers (e.g. `layers 0..N-1`) or a later receiver".into(),
            PathGroupedReceiver { .. } => "this is a note; a query receiver (`q`) is per query head".into(),
            WindowOutOfRange { n_layers: n, .. } => format!(
                "a window is a number of layers from 1 to {n}, e.g. `window [1, 3, 5]`; w = 1 is single-layer patching"
            ),
            NoDataset => {
                "add a `dataset name { template \"...\" ... }` or `dataset name from \"prompts.csv\" { ... }`".into()
            }
            EmptySweep { axis } => format!("define a `{axis}` (see spec/language.md)"),
            NoCorruption => "add e.g. `corruption s2_io = replace S2 with IO`".into(),
            PatchNotInSweep { .. } => "add it to the sweep's `patch: [...]` axis".into(),
            MetricNotComputed { metric, computed, .. } => {
                format!("add `{metric}` to the sweep's metric list: metric: [{}, {metric}]", computed.join(", "))
            }
            LayerNotPatched { patch, layers, .. } => format!("`{patch}` patches layers {layers}"),
            HeadNotPatched { patch, heads, .. } => format!("`{patch}` patches heads {heads}"),
            NotPatchedPerHead { .. } => "write the component without `.H`, or add `heads all` to the patch".into(),
            NeedsHead { layer, .. } => format!("e.g. `L{layer}.H0`"),
            PositionNotPatched { .. } => {
                "name one of the patch's `positions`, or drop `@ ...` when positions are patched together".into()
            }
            NeedsPosition { layer, .. } => format!("e.g. `L{layer} @ end`"),
            DetectionThresholdNotPositive => Decimal::DetectionThreshold.help().into(),
            EffectThresholdNotFinite => Decimal::EffectThreshold.help().into(),
            TopKTooSmall => "k is how many of the patch's components rank highest by effect, e.g. `expect top 3 \
                             heads by ld includes L9.H9`"
                .into(),
            TopKTooLarge { patch, components: n, .. } => {
                format!("k must be between 1 and {n}; e.g. `expect top {} {patch} by ...`", (*n).clamp(1, 3))
            }
            NoSuchVariant { axis, value, allowed } => match did_you_mean(value, allowed.iter().map(|s| s.as_str())) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("the sweep has {axis}: {}", allowed.join(", ")),
            },
        })
    }
}

/// "did you mean" among a dataset's slots, or the slots it has.
fn slot_help(slot: &str, slots: &[String]) -> String {
    match did_you_mean(slot, slots.iter().map(|s| s.as_str())) {
        Some(s) => format!("did you mean `{s}`?"),
        None if slots.is_empty() => "the template has no `{SLOT}`s".to_string(),
        None => format!("the template's slots are: {}", slots.join(", ")),
    }
}

impl Decimal {
    fn help(self) -> &'static str {
        match self {
            Decimal::NoiseScale => {
                "the scale multiplies the standard deviation of the token embeddings: a positive number such as \
                 `scale 3` (the default; ROME uses 3)"
            }
            Decimal::DetectionThreshold => {
                "the threshold is a number of standard deviations above 0, e.g. `beyond 2 sd` (the default)"
            }
            Decimal::EffectThreshold => {
                "compare the effect with an ordinary number, e.g. `expect effect mlp L3 @ end by ld > 0.2`"
            }
        }
    }
}

impl ReadFailure {
    fn help(self, path: &Path) -> String {
        let path = path.display();
        match self {
            ReadFailure::Folder => format!("{path} is a folder; name a file"),
            ReadFailure::NotRegular => format!("{path} is not a regular file; name a text file"),
            ReadFailure::TooLarge => format!("split {path} into smaller files, or use its first rows (`count N`)"),
            ReadFailure::NotUtf8 => format!("{path} is not UTF-8 text; save it as UTF-8"),
            ReadFailure::Other => {
                format!("paths are relative to the folder of the file that names them: looked for {path}")
            }
        }
    }
}

impl Retokenised {
    fn help(&self, advice: &str) -> String {
        format!(
            "clean:     {:?}\n  {}\ncorrupted: {:?}\n  {}\n{advice}",
            self.clean, self.clean_tokens, self.corrupted, self.corrupted_tokens
        )
    }
}
