//! The tokenizer of a Hugging Face checkpoint folder.
//!
//! transformers 5 takes `tokenizer.json` as written: its post-processor alone decides whether
//! BOS/EOS are added (an `add_bos_token` in `tokenizer_config.json` is ignored on load; checked
//! against transformers 5.24 by `tests/fixtures/hf/make_fixtures.py`). transformers 4 instead
//! rebuilt the post-processor of Llama-family tokenizers from `add_bos_token`/`add_eos_token`.
//! patchbay uses `tokenizer.json` as transformers 5 does, and refuses a folder where the two
//! versions would disagree (the flag says one thing, the post-processor does another), because
//! either choice would silently give some user different token ids than they expect.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::bail_fixable;
use crate::model::TOKENIZER_FILE;

pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// `tokenizer.json` of `dir`, checked against `tokenizer_config.json`'s BOS/EOS flags.
pub fn tokenizer_json(dir: &Path) -> Result<String> {
    let path = dir.join(TOKENIZER_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let config_path = dir.join(TOKENIZER_CONFIG_FILE);
    if !config_path.is_file() {
        return Ok(text);
    }
    let config_text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: Value =
        serde_json::from_str(&config_text).with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let tokenizer: tokenizers::Tokenizer =
        text.parse().map_err(|e| anyhow!("{} is not a valid tokenizer: {e}", path.display()))?;
    for (flag, token, end) in [("add_bos_token", "bos_token", End::Start), ("add_eos_token", "eos_token", End::Finish)]
    {
        let wanted = match &config[flag] {
            Value::Null => continue,
            v => v
                .as_bool()
                .ok_or_else(|| anyhow!("{TOKENIZER_CONFIG_FILE}: `{flag}` should be true or false, found {v}"))?,
        };
        let Some(id) = special_token(&config, token).and_then(|t| tokenizer.token_to_id(&t)) else {
            if wanted {
                bail!("{TOKENIZER_CONFIG_FILE} sets `{flag}: true` but names no {token} that {TOKENIZER_FILE} knows");
            }
            continue;
        };
        let added = adds(&tokenizer, id, end)?;
        if added != wanted {
            bail_fixable!(
                "{TOKENIZER_CONFIG_FILE} sets `{flag}: {wanted}`, but the post-processor of {TOKENIZER_FILE} {} the {token}; \
                 transformers 5 follows {TOKENIZER_FILE}, transformers 4 followed the flag",
                if added { "adds" } else { "does not add" };
                help: "make them agree (remove `{flag}` to keep what {TOKENIZER_FILE} does)"
            );
        }
    }
    Ok(text)
}

#[derive(Clone, Copy)]
enum End {
    Start,
    Finish,
}

/// Whether encoding with special tokens puts token `id` at `end` of a probe text.
fn adds(tokenizer: &tokenizers::Tokenizer, id: u32, end: End) -> Result<bool> {
    let encode = |special: bool| {
        tokenizer.encode("a", special).map(|e| e.get_ids().to_vec()).map_err(|e| anyhow!("cannot tokenise: {e}"))
    };
    let (with, without) = (encode(true)?, encode(false)?);
    let extra = with.len() > without.len();
    Ok(extra
        && match end {
            End::Start => with.first() == Some(&id),
            End::Finish => with.last() == Some(&id),
        })
}

/// A special token's text: a string, or an AddedToken object with `content`.
fn special_token(config: &Value, name: &str) -> Option<String> {
    let v = &config[name];
    v.as_str().or_else(|| v["content"].as_str()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn word_level(with_bos: bool) -> Value {
        let post_processor = if with_bos {
            json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                   {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}})
        } else {
            Value::Null
        };
        json!({
            "version": "1.0",
            "added_tokens": [{"id": 0, "content": "<s>", "special": true, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false}],
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": post_processor,
            "model": {"type": "WordLevel", "vocab": {"<s>": 0, "a": 1, "b": 2, "<unk>": 3}, "unk_token": "<unk>"},
        })
    }

    fn folder(with_bos: bool, config: Option<Value>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_FILE), word_level(with_bos).to_string()).unwrap();
        if let Some(config) = config {
            std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), config.to_string()).unwrap();
        }
        dir
    }

    #[test]
    fn agreeing_flags_and_no_flags_keep_tokenizer_json() {
        for (with_bos, config) in [
            (true, Some(json!({"add_bos_token": true, "bos_token": "<s>"}))),
            (false, Some(json!({"add_bos_token": false, "bos_token": {"content": "<s>"}}))),
            (true, Some(json!({"bos_token": "<s>"}))),
            (false, None),
        ] {
            let dir = folder(with_bos, config);
            let text = tokenizer_json(dir.path()).unwrap();
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), word_level(with_bos));
        }
    }

    #[test]
    fn disagreeing_flag_is_refused_by_name() {
        let dir = folder(false, Some(json!({"add_bos_token": true, "bos_token": "<s>"})));
        let e = tokenizer_json(dir.path()).unwrap_err().to_string();
        assert!(e.contains("add_bos_token: true") && e.contains("does not add"), "{e}");
        let dir = folder(true, Some(json!({"add_bos_token": false, "bos_token": "<s>"})));
        let e = tokenizer_json(dir.path()).unwrap_err().to_string();
        assert!(e.contains("add_bos_token: false") && e.contains("adds the bos_token"), "{e}");
    }

    #[test]
    fn unknown_bos_token_is_an_error() {
        let dir = folder(false, Some(json!({"add_bos_token": true, "bos_token": "<bos>"})));
        let e = tokenizer_json(dir.path()).unwrap_err().to_string();
        assert!(e.contains("add_bos_token: true") && e.contains("bos_token"), "{e}");
    }
}
