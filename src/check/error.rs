//! Every diagnostic the checker reports, in one place: one [`CheckError`] variant per distinct
//! error, each with one code ([`CheckError::code`]), one message ([`CheckError::message`]), and
//! its labels and help (in `help.rs`). [`CheckError::diagnostic`] is the one conversion into a
//! [`Diagnostic`]. A leaf: it imports no other check module.

mod help;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Span};

/// A problem found while checking, with the data its message needs; where it is (its span) is
/// given when it becomes a [`Diagnostic`] ([`CheckError::at`]). Codes and what each means:
/// spec/language.md, "Diagnostic codes".
#[derive(Debug, Clone)]
pub enum CheckError {
    // Names and definitions.
    DuplicateDefinition { what: &'static str, name: String, prev: Span },
    UnknownName { what: &'static str, name: String, candidates: Vec<String> },
    UnknownDevice { name: String },
    UnknownSweepAxis { name: String },
    DuplicateSweepValue { value: String },
    // Model, tokenizer and batch.
    NoModel { path: String, empty: bool },
    MissingModel { reference: String, dir: PathBuf },
    BadManifest { error: String },
    BadTokenizer { error: String },
    BatchOutOfRange,
    ReportExtension { file: String },
    // Files and pools.
    MissingFile { file: String, error: String, path: PathBuf, failure: ReadFailure },
    EmptyPool,
    EmptyPoolFile { file: String, path: PathBuf },
    // Template datasets.
    NoTemplate { dataset: String },
    UnclosedBrace,
    BadPlaceholder { name: String, placeholder: String, declared: Vec<String> },
    SlotRepeatedInTemplate { slot: String },
    SlotWithoutValues { slot: String, slots: Vec<String> },
    SlotNotInTemplate { slot: String, slots: Vec<String> },
    SlotChain,
    PoolTooSmall { distinct: usize, slots: usize, pool: Span },
    EmptySlotPool { slot: String },
    EmptySlot,
    SlotWithoutTokens { which: String, slot: String, value: String, prompt: String },
    ColumnWithoutFile { dataset: String },
    CountOutOfRange,
    NegativeSeed,
    SeedTooLarge,
    // Prompt-file datasets.
    BadCsv { file: String, error: String },
    BadJsonl { file: String, line: usize, error: String },
    EmptyFile { file: String, jsonl: bool },
    MissingColumn { file: String, column: String, columns: Vec<String>, file_span: Span },
    RowMissingColumn { file: String, row: usize, column: String, file_span: Span },
    NoPromptColumn { dataset: String, file: String, columns: Vec<String> },
    NoAnswerColumn { dataset: String, file: String, columns: Vec<String> },
    TemplateWithFile { file_span: Span },
    SlotInFileDataset,
    AnswerInFileDataset,
    SlotNotInPrompt { row: usize, column: String, value: String, prompt: String },
    // Answers and token sets.
    NoAnswer { dataset: String },
    MultiTokenAnswer { text: String, n_tokens: usize, shown: String },
    MultiTokenSetMember { value: String, n_tokens: usize, shown: String },
    NotANumber { value: String, reference: String },
    EmptyTokenSet { prompt: usize, filter: Option<(&'static str, String)> },
    NeedsWrongAnswer { metric: &'static str, dataset: String },
    // Corruptions.
    DuplicateReplacement { slot: String },
    NoiseScaleNotPositive,
    SamplesOutOfRange,
    DecimalTooLarge { literal: String, of: Decimal },
    CorruptionSlotNotInDataset { slot: String, dataset: String, slots: Vec<String> },
    ReplaceChangesTokenCount { corruption: String, tokens: Retokenised },
    CounterfactualChangesTokenCount { dataset: String, tokens: Retokenised },
    ResampleChangesTokenCount { corruption: String, prompt: usize, text: String, len: usize, shown: String },
    NoPool { slot: String },
    ResamplePoolTooSmall { distinct: usize, slots: usize },
    NoCounterfactual { dataset: String },
    AblationUnequalLengths { kind: &'static str, dataset: String, min: usize, max: usize },
    AblationDirection { corruption: String },
    // Patch targets.
    UnknownHook { hook: String, model: String, hooks: Vec<String>, suggestion: Option<String> },
    DuplicateHook { hook: String },
    MixedLayeredHooks,
    MixedHeadCounts { first: String, heads: usize, other: String, other_heads: Option<usize> },
    HookHasNoLayers { hook: String },
    HookHasNoHeads { hook: String },
    FixedLayer,
    LayerOutOfRange { layer: i64, n_layers: usize },
    LayerNumberTooLarge { literal: String, n_layers: usize },
    HeadOutOfRange { head: i64, hook: String, n_heads: usize, grouped_query: bool },
    HeadNumberTooLarge { literal: String, hook: String, n_heads: usize },
    EmptyRange { start: i64, end: i64 },
    PositionNotASlot { position: String, dataset: String, slots: Vec<String> },
    PositionOutOfRange { position: String, dataset: String, n_tokens: i64 },
    PositionsEachUnequalLengths { dataset: String, min: usize, max: usize },
    SummationWithoutWindow,
    VerifyWithoutEstimate,
    VerifyCount { count: String },
    WindowWithoutLayers,
    WindowOutOfRange { window: String, n_layers: usize },
    PathSender { hook: String },
    PathReceiverOutOfRange { receiver: String, reason: String },
    PathReceiverNotAfterSender { receiver_layer: usize, sender_layer: usize },
    PathGroupedReceiver { receiver: String, input: String, kv_head: usize, query_heads: Vec<usize> },
    // Metrics, the sweep and expectations.
    NoDataset,
    EmptySweep { axis: &'static str },
    NoCorruption,
    PatchNotInSweep { patch: String },
    MetricNotComputed { metric: String, computed: Vec<String>, metric_axis: Option<Span> },
    LayerNotPatched { patch: String, layer: i64, layers: String },
    HeadNotPatched { patch: String, head: i64, heads: String },
    NotPatchedPerHead { patch: String },
    NeedsHead { patch: String, layer: i64 },
    PositionNotPatched { patch: String, position: String },
    NeedsPosition { patch: String, layer: i64 },
    DetectionThresholdNotPositive,
    EffectThresholdNotFinite,
    TopKTooSmall,
    TopKTooLarge { k: String, patch: String, components: usize, patch_span: Span },
    NoSuchVariant { axis: String, value: String, allowed: Vec<String> },
}

/// Where a decimal number is used (for the help of a range error on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decimal {
    NoiseScale,
    DetectionThreshold,
    EffectThreshold,
}

/// Why a file could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFailure {
    Folder,
    NotRegular,
    TooLarge,
    NotUtf8,
    Other,
}

/// A clean prompt and its corrupted version, both tokenised (shown when STR changes the count).
#[derive(Debug, Clone)]
pub struct Retokenised {
    pub clean: String,
    pub clean_len: usize,
    pub clean_tokens: String,
    pub corrupted: String,
    pub corrupted_len: usize,
    pub corrupted_tokens: String,
}

/// Whether an integer literal did not fit (the parser saturates it to i64::MIN/MAX).
pub fn overflowed(v: i64, span: &Span) -> bool {
    (v == i64::MAX || v == i64::MIN) && span.text().trim().parse::<i64>().is_err()
}

impl ReadFailure {
    pub fn of(path: &Path, e: &std::io::Error) -> ReadFailure {
        match e.kind() {
            _ if path.is_dir() => ReadFailure::Folder,
            std::io::ErrorKind::InvalidInput => ReadFailure::NotRegular,
            std::io::ErrorKind::FileTooLarge => ReadFailure::TooLarge,
            std::io::ErrorKind::InvalidData => ReadFailure::NotUtf8,
            _ => ReadFailure::Other,
        }
    }
}

impl CheckError {
    /// "unknown X `name`", with a "did you mean" among `candidates`.
    pub fn unknown<'a>(what: &'static str, name: &str, candidates: impl IntoIterator<Item = &'a str>) -> CheckError {
        let candidates = candidates.into_iter().map(str::to_string).collect();
        CheckError::UnknownName { what, name: name.to_string(), candidates }
    }

    /// "X `name` is defined twice", the first definition at `prev`.
    pub fn duplicate(what: &'static str, name: &str, prev: &Span) -> CheckError {
        CheckError::DuplicateDefinition { what, name: name.to_string(), prev: prev.clone() }
    }

    /// Layer `layer`, written at `span`, of a model with `n_layers` layers: out of range, or a
    /// literal too large for a number.
    pub fn layer_out_of_range(span: &Span, layer: i64, n_layers: usize) -> CheckError {
        if overflowed(layer, span) {
            return CheckError::LayerNumberTooLarge { literal: span.text().trim().to_string(), n_layers };
        }
        CheckError::LayerOutOfRange { layer, n_layers }
    }

    /// A seed that is negative or does not fit in 64 bits; None for a good seed.
    pub fn bad_seed(seed: i64, span: &Span) -> Option<CheckError> {
        if seed < 0 {
            Some(CheckError::NegativeSeed)
        } else {
            overflowed(seed, span).then_some(CheckError::SeedTooLarge)
        }
    }

    /// A decimal number out of range for its use; a literal too large for a float says so.
    pub fn decimal(value: f64, span: &Span, of: Decimal) -> CheckError {
        if value.is_infinite() {
            return CheckError::DecimalTooLarge { literal: span.text().trim().to_string(), of };
        }
        match of {
            Decimal::NoiseScale => CheckError::NoiseScaleNotPositive,
            Decimal::DetectionThreshold => CheckError::DetectionThresholdNotPositive,
            Decimal::EffectThreshold => CheckError::EffectThresholdNotFinite,
        }
    }

    /// A file that could not be read.
    pub fn missing_file(file: &str, path: &Path, e: &std::io::Error) -> CheckError {
        let failure = ReadFailure::of(path, e);
        CheckError::MissingFile { file: file.to_string(), error: e.to_string(), path: path.to_path_buf(), failure }
    }

    /// The diagnostic at `span`.
    pub fn at(self, span: &Span) -> Diagnostic {
        self.diagnostic(Some(span))
    }

    /// The one conversion into a [`Diagnostic`] (without a span: a bare one, with no label).
    pub fn diagnostic(self, span: Option<&Span>) -> Diagnostic {
        let mut d = match span {
            Some(span) => Diagnostic::error(self.code(), self.message(), span, self.label()),
            None => Diagnostic::bare(self.code(), self.message()),
        };
        if self.is_warning() {
            d = d.warning();
        }
        for (span, label) in self.labels() {
            d = d.with_label(span, label);
        }
        match self.help() {
            Some(help) => d.help(help),
            None => d,
        }
    }

    /// Warnings do not stop the experiment.
    pub fn is_warning(&self) -> bool {
        matches!(self, CheckError::AblationDirection { .. } | CheckError::PathGroupedReceiver { .. })
    }

    /// The error's code: one per variant, listed in spec/language.md ("Diagnostic codes").
    pub fn code(&self) -> &'static str {
        use CheckError::*;
        match self {
            DuplicateDefinition { .. } => "patchbay::duplicate_definition",
            UnknownName { .. } => "patchbay::unknown_name",
            UnknownDevice { .. } => "patchbay::unknown_device",
            UnknownSweepAxis { .. } => "patchbay::unknown_sweep_axis",
            DuplicateSweepValue { .. } => "patchbay::duplicate_sweep_value",
            NoModel { .. } => "patchbay::no_model",
            MissingModel { .. } => "patchbay::missing_model",
            BadManifest { .. } => "patchbay::bad_manifest",
            BadTokenizer { .. } => "patchbay::bad_tokenizer",
            BatchOutOfRange => "patchbay::batch_out_of_range",
            ReportExtension { .. } => "patchbay::report_extension",
            MissingFile { .. } => "patchbay::missing_file",
            EmptyPool => "patchbay::empty_pool",
            EmptyPoolFile { .. } => "patchbay::empty_pool_file",
            NoTemplate { .. } => "patchbay::no_template",
            UnclosedBrace => "patchbay::unclosed_brace",
            BadPlaceholder { .. } => "patchbay::bad_placeholder",
            SlotRepeatedInTemplate { .. } => "patchbay::slot_repeated_in_template",
            SlotWithoutValues { .. } => "patchbay::slot_without_values",
            SlotNotInTemplate { .. } => "patchbay::slot_not_in_template",
            SlotChain => "patchbay::slot_chain",
            PoolTooSmall { .. } => "patchbay::pool_too_small",
            EmptySlotPool { .. } => "patchbay::empty_slot_pool",
            EmptySlot => "patchbay::empty_slot",
            SlotWithoutTokens { .. } => "patchbay::slot_without_tokens",
            ColumnWithoutFile { .. } => "patchbay::column_without_file",
            CountOutOfRange => "patchbay::count_out_of_range",
            NegativeSeed => "patchbay::negative_seed",
            SeedTooLarge => "patchbay::seed_too_large",
            BadCsv { .. } => "patchbay::bad_csv",
            BadJsonl { .. } => "patchbay::bad_jsonl",
            EmptyFile { .. } => "patchbay::empty_file",
            MissingColumn { .. } => "patchbay::missing_column",
            RowMissingColumn { .. } => "patchbay::row_missing_column",
            NoPromptColumn { .. } => "patchbay::no_prompt_column",
            NoAnswerColumn { .. } => "patchbay::no_answer_column",
            TemplateWithFile { .. } => "patchbay::template_with_file",
            SlotInFileDataset => "patchbay::slot_in_file_dataset",
            AnswerInFileDataset => "patchbay::answer_in_file_dataset",
            SlotNotInPrompt { .. } => "patchbay::slot_not_in_prompt",
            NoAnswer { .. } => "patchbay::no_answer",
            MultiTokenAnswer { .. } => "patchbay::multi_token_answer",
            MultiTokenSetMember { .. } => "patchbay::multi_token_set_member",
            NotANumber { .. } => "patchbay::not_a_number",
            EmptyTokenSet { .. } => "patchbay::empty_token_set",
            NeedsWrongAnswer { .. } => "patchbay::needs_wrong_answer",
            DuplicateReplacement { .. } => "patchbay::duplicate_replacement",
            NoiseScaleNotPositive => "patchbay::noise_scale_not_positive",
            SamplesOutOfRange => "patchbay::samples_out_of_range",
            DecimalTooLarge { .. } => "patchbay::decimal_too_large",
            CorruptionSlotNotInDataset { .. } => "patchbay::corruption_slot_not_in_dataset",
            ReplaceChangesTokenCount { .. } => "patchbay::replace_changes_token_count",
            CounterfactualChangesTokenCount { .. } => "patchbay::counterfactual_changes_token_count",
            ResampleChangesTokenCount { .. } => "patchbay::resample_changes_token_count",
            NoPool { .. } => "patchbay::no_pool",
            ResamplePoolTooSmall { .. } => "patchbay::resample_pool_too_small",
            NoCounterfactual { .. } => "patchbay::no_counterfactual",
            AblationUnequalLengths { .. } => "patchbay::ablation_unequal_lengths",
            AblationDirection { .. } => "patchbay::ablation_direction",
            UnknownHook { .. } => "patchbay::unknown_hook",
            DuplicateHook { .. } => "patchbay::duplicate_hook",
            MixedLayeredHooks => "patchbay::mixed_layered_hooks",
            MixedHeadCounts { .. } => "patchbay::mixed_head_counts",
            HookHasNoLayers { .. } => "patchbay::hook_has_no_layers",
            HookHasNoHeads { .. } => "patchbay::hook_has_no_heads",
            FixedLayer => "patchbay::fixed_layer",
            LayerOutOfRange { .. } => "patchbay::layer_out_of_range",
            LayerNumberTooLarge { .. } => "patchbay::layer_number_too_large",
            HeadOutOfRange { .. } => "patchbay::head_out_of_range",
            HeadNumberTooLarge { .. } => "patchbay::head_number_too_large",
            EmptyRange { .. } => "patchbay::empty_range",
            PositionNotASlot { .. } => "patchbay::position_not_a_slot",
            PositionOutOfRange { .. } => "patchbay::position_out_of_range",
            PositionsEachUnequalLengths { .. } => "patchbay::positions_each_unequal_lengths",
            SummationWithoutWindow => "patchbay::summation_without_window",
            VerifyWithoutEstimate => "patchbay::verify_without_estimate",
            VerifyCount { .. } => "patchbay::verify_count",
            WindowWithoutLayers => "patchbay::window_without_layers",
            WindowOutOfRange { .. } => "patchbay::window_out_of_range",
            PathSender { .. } => "patchbay::path_sender",
            PathReceiverOutOfRange { .. } => "patchbay::path_receiver_out_of_range",
            PathReceiverNotAfterSender { .. } => "patchbay::path_receiver_not_after_sender",
            PathGroupedReceiver { .. } => "patchbay::path_grouped_receiver",
            NoDataset => "patchbay::no_dataset",
            EmptySweep { .. } => "patchbay::empty_sweep",
            NoCorruption => "patchbay::no_corruption",
            PatchNotInSweep { .. } => "patchbay::patch_not_in_sweep",
            MetricNotComputed { .. } => "patchbay::metric_not_computed",
            LayerNotPatched { .. } => "patchbay::layer_not_patched",
            HeadNotPatched { .. } => "patchbay::head_not_patched",
            NotPatchedPerHead { .. } => "patchbay::not_patched_per_head",
            NeedsHead { .. } => "patchbay::needs_head",
            PositionNotPatched { .. } => "patchbay::position_not_patched",
            NeedsPosition { .. } => "patchbay::needs_position",
            DetectionThresholdNotPositive => "patchbay::detection_threshold_not_positive",
            EffectThresholdNotFinite => "patchbay::effect_threshold_not_finite",
            TopKTooSmall => "patchbay::top_k_too_small",
            TopKTooLarge { .. } => "patchbay::top_k_too_large",
            NoSuchVariant { .. } => "patchbay::no_such_variant",
        }
    }

    /// What went wrong, in one sentence.
    pub fn message(&self) -> String {
        use CheckError::*;
        match self {
            DuplicateDefinition { what, name, .. } => format!("{what} `{name}` is defined twice"),
            UnknownName { what, name, .. } => format!("unknown {what} `{name}`"),
            UnknownDevice { name } => format!("unknown device `{name}`"),
            UnknownSweepAxis { name } => format!("unknown sweep axis `{name}`"),
            DuplicateSweepValue { value } => format!("`{value}` is listed twice"),
            NoModel { path, empty: true } => format!("{path} has no statements, so it names no model"),
            NoModel { path, empty: false } => format!("{path} names no model"),
            MissingModel { reference, .. } => format!("model `{reference}` not found"),
            BadManifest { error } => format!("cannot read the model's manifest: {error}"),
            BadTokenizer { error } => format!("cannot load the model's tokenizer: {error}"),
            BatchOutOfRange => "batch must be between 1 and 4096".into(),
            ReportExtension { file } => format!("cannot tell which report to write to `{file}`"),
            MissingFile { file, .. } => format!("cannot read `{file}`"),
            EmptyPool => "the pool `[]` has no values".into(),
            EmptyPoolFile { file, .. } => format!("pool file `{file}` has no values"),
            NoTemplate { dataset } => format!("dataset `{dataset}` has no template"),
            UnclosedBrace => "unclosed `{` in the template".into(),
            BadPlaceholder { name, placeholder, .. } if name.trim().is_empty() => {
                format!("empty slot placeholder `{placeholder}` in the template")
            }
            BadPlaceholder { name, placeholder, .. } if name.contains('{') => {
                format!("`{placeholder}` is not a slot placeholder: a `{{` is not closed before the next `{{`")
            }
            BadPlaceholder { name, placeholder, .. } => {
                format!("`{placeholder}` is not a slot placeholder: `{name}` is not a valid slot name")
            }
            SlotRepeatedInTemplate { slot } => format!("slot `{slot}` appears twice in the template"),
            SlotWithoutValues { slot, .. } => format!("the template uses slot `{slot}`, which has no values"),
            SlotNotInTemplate { slot, .. } => format!("slot `{slot}` is not in the template"),
            SlotChain => "a slot can only equal a slot that has its own values".into(),
            PoolTooSmall { distinct, slots, .. } => {
                format!("the pool has {distinct} distinct value(s) but {slots} slots must differ")
            }
            EmptySlotPool { slot } => format!("slot `{slot}` has no values to draw from"),
            EmptySlot => "a slot value produced no tokens".into(),
            SlotWithoutTokens { which, slot, value, prompt } => {
                format!("{which}: slot `{slot}` (value `{value}`) covers no token of the prompt `{prompt}`")
            }
            ColumnWithoutFile { .. } => "a column mapping needs a prompt file".into(),
            CountOutOfRange => "count must be between 1 and 100000".into(),
            NegativeSeed => "a seed must be 0 or more".into(),
            SeedTooLarge => "the seed is too large: seeds are 0..9223372036854775807".into(),
            BadCsv { file, error } => format!("`{file}` is not valid CSV: {error}"),
            BadJsonl { file, line, error } => format!("line {line} of `{file}` is not a JSON object: {error}"),
            EmptyFile { file, .. } => format!("`{file}` has no rows"),
            MissingColumn { file, column, .. } => format!("`{file}` has no column `{column}`"),
            RowMissingColumn { file, row, column, .. } => format!("row {row} of `{file}` has no `{column}`"),
            NoPromptColumn { dataset, .. } => format!("dataset `{dataset}` names no prompt column"),
            NoAnswerColumn { dataset, .. } | NoAnswer { dataset } => format!("dataset `{dataset}` has no answer"),
            TemplateWithFile { .. } => "a dataset reads a file or fills a template, not both".into(),
            SlotInFileDataset => "a prompt file names its slots by column".into(),
            AnswerInFileDataset => "a prompt file gives answers by column".into(),
            SlotNotInPrompt { row, column, value, prompt } => {
                format!("row {row}: the `{column}` value `{value}` does not occur in the prompt `{prompt}`")
            }
            MultiTokenAnswer { text, n_tokens, shown } => {
                format!("the answer `{text}` is {n_tokens} tokens, not one: {shown}")
            }
            MultiTokenSetMember { value, n_tokens, shown } => {
                format!("the token-set member `{value}` is {n_tokens} tokens, not one: {shown}")
            }
            NotANumber { value, reference } => format!("cannot compare `{value}` with `{reference}` as numbers"),
            EmptyTokenSet { prompt, filter: Some((op, value)) } => {
                format!("the token set is empty for prompt {prompt} (no value {op} {value})")
            }
            EmptyTokenSet { prompt, filter: None } => format!("the token set is empty for prompt {prompt}"),
            NeedsWrongAnswer { metric, dataset } => {
                format!("{metric} needs a wrong answer r', but dataset `{dataset}` has none")
            }
            DuplicateReplacement { slot } => format!("slot `{slot}` is replaced twice"),
            NoiseScaleNotPositive => "the noise scale must be a positive number".into(),
            SamplesOutOfRange => "samples must be between 1 and 10000".into(),
            DecimalTooLarge { literal, .. } => {
                format!("the number `{literal}` is out of range (too large for a 64-bit float)")
            }
            CorruptionSlotNotInDataset { slot, dataset, .. } => {
                format!("slot `{slot}` is not a slot of dataset `{dataset}`")
            }
            ReplaceChangesTokenCount { corruption, tokens } => tokens.message(&format!("`{corruption}`")),
            CounterfactualChangesTokenCount { dataset, tokens } => {
                tokens.message(&format!("the counterfactual prompt of `{dataset}`"))
            }
            ResampleChangesTokenCount { corruption, prompt, len, .. } => {
                format!("`{corruption}`: no resampled values keep prompt {prompt}'s token count ({len} tokens)")
            }
            NoPool { slot } => format!("slot `{slot}` has no pool to resample from"),
            ResamplePoolTooSmall { distinct, slots } => {
                format!("the pools have {distinct} distinct value(s) but {slots} slots must differ")
            }
            NoCounterfactual { dataset } => format!("dataset `{dataset}` has no counterfactual column"),
            AblationUnequalLengths { kind, dataset, min, max } => {
                format!("{kind} ablation needs prompts of one token count; `{dataset}` has {min}..{max}")
            }
            AblationDirection { corruption } => {
                format!("`{corruption}` is an ablation: it only runs in the noise direction")
            }
            UnknownHook { hook, .. } => format!("hook `{hook}` is not in the model's manifest"),
            DuplicateHook { hook } => format!("hook `{hook}` is listed twice"),
            MixedLayeredHooks => "hooks patched jointly must all have layers, or none".into(),
            MixedHeadCounts { first, heads, other, other_heads } => format!(
                "hooks patched jointly per head must have the same heads: `{first}` has {heads}, `{other}` has {}",
                other_heads.map(|n| n.to_string()).unwrap_or_else(|| "no head axis".into())
            ),
            HookHasNoLayers { hook } => format!("hook `{hook}` has no layers"),
            HookHasNoHeads { hook } => format!("hook `{hook}` has no head axis"),
            FixedLayer => "a hook written with its layer (`blocks.3.hook_mlp_out`) fixes the layer".into(),
            LayerOutOfRange { layer, n_layers: n } => {
                format!("layer {layer} is out of range: the model has {n} layers (0..{})", n.saturating_sub(1))
            }
            LayerNumberTooLarge { literal, n_layers: n } => {
                format!("the layer number `{literal}` is too large: valid layers are 0..{}", n.saturating_sub(1))
            }
            HeadOutOfRange { head, hook, n_heads: n, .. } => {
                format!("head {head} is out of range: `{hook}` has {n} heads (0..{})", n.saturating_sub(1))
            }
            HeadNumberTooLarge { literal, n_heads: n, .. } => {
                format!("the head number `{literal}` is too large: valid heads are 0..{}", n.saturating_sub(1))
            }
            EmptyRange { start, end } => format!("the range {start}..{end} is empty"),
            PositionNotASlot { position, dataset, .. } => {
                format!("position `{position}` is not a slot of dataset `{dataset}`")
            }
            PositionOutOfRange { position, dataset, n_tokens } => {
                format!("position {position} is outside the shortest prompt of `{dataset}` ({n_tokens} tokens)")
            }
            PositionsEachUnequalLengths { dataset, min, max } => {
                format!("`positions each` needs prompts of one token count; `{dataset}` has {min}..{max}")
            }
            SummationWithoutWindow => "the summation baseline compares against sliding windows".into(),
            VerifyWithoutEstimate => "`verify top k` checks estimates, but this target is patched exactly".into(),
            VerifyCount { count } => format!("`verify top {count}` is not a count of components to verify"),
            WindowWithoutLayers => "a sliding window needs a hook with layers".into(),
            WindowOutOfRange { window, n_layers } => {
                format!("window {window} is out of range: windows span 1..{n_layers} layers")
            }
            PathSender { hook } => {
                format!("`{hook}` cannot send along a path: senders are head outputs (`attn.hook_z`) or MLP outputs (`hook_mlp_out`)")
            }
            PathReceiverOutOfRange { receiver, reason } => format!("receiver `{receiver}`: {reason}"),
            PathReceiverNotAfterSender { receiver_layer, sender_layer } => format!(
                "a receiver at layer {receiver_layer} is not after sender layer {sender_layer}: a path runs from earlier layers to later ones"
            ),
            PathGroupedReceiver { receiver, input, kv_head, query_heads } => format!(
                "`{receiver} {input}` receives through KV head {kv_head}, shared by query heads {}: the path reaches all of them",
                query_heads.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", ")
            ),
            NoDataset => "the experiment has no dataset".into(),
            EmptySweep { axis } => format!("the experiment has no {axis} to run"),
            NoCorruption => "the experiment has no corruption to run".into(),
            PatchNotInSweep { patch } => format!("patch `{patch}` is not run by the sweep"),
            MetricNotComputed { metric, .. } => {
                format!("the expectation reads metric `{metric}`, which the sweep does not compute")
            }
            LayerNotPatched { patch, layer, .. } => format!("`{patch}` does not patch layer {layer}"),
            HeadNotPatched { patch, head, .. } => format!("`{patch}` does not patch head {head}"),
            NotPatchedPerHead { patch } => format!("`{patch}` is not patched per head"),
            NeedsHead { patch, .. } => format!("`{patch}` is patched per head: name the head"),
            PositionNotPatched { patch, position } => format!("`{patch}` does not patch position `{position}`"),
            NeedsPosition { patch, .. } => format!("`{patch}` is patched per position: name one"),
            DetectionThresholdNotPositive => "the detection threshold must be positive".into(),
            EffectThresholdNotFinite => "the effect threshold is not a finite number".into(),
            TopKTooSmall => "top k needs k >= 1".into(),
            TopKTooLarge { k, patch, components, .. } => {
                format!("top {k}, but patch `{patch}` has only {components} component(s) to rank")
            }
            NoSuchVariant { axis, value, .. } => format!("no variant has {axis} = {value}"),
        }
    }
}

impl Retokenised {
    fn message(&self, what: &str) -> String {
        format!(
            "{what} changes the token count ({} -> {} tokens), so positions no longer align",
            self.clean_len, self.corrupted_len
        )
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

#[cfg(test)]
mod tests {
    /// The codes of `CheckError::code`, from its source.
    fn codes() -> Vec<&'static str> {
        let source = include_str!("error.rs");
        let start = source.find("pub fn code(&self)").unwrap();
        let body = &source[start..start + source[start..].find("\n    }\n").unwrap()];
        body.split('"').filter(|s| s.starts_with("patchbay::")).collect()
    }

    #[test]
    fn codes_are_distinct() {
        let codes = codes();
        assert!(codes.len() > 80, "{codes:?}");
        let mut sorted = codes.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len(), "a code is used by two variants");
    }

    #[test]
    fn codes_are_documented() {
        let spec = include_str!("../../spec/language.md");
        let table = &spec[spec.find("## Diagnostic codes").expect("spec has a Diagnostic codes section")..];
        for code in codes() {
            assert!(table.contains(&format!("| `{code}` |")), "{code} is not in spec/language.md");
        }
    }
}
