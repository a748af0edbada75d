//! `patchbay import`: checkpoints (GGUF, Hugging Face safetensors folders) -> model directory.
//!
//! The directory is written to a staging folder beside the target and moved into place only
//! when complete, so a failed import leaves nothing behind and never damages an existing model.

pub mod gguf;
pub mod hf_config;
pub mod hf_tokenizer;
pub mod quant;
pub mod safetensors;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::bail_fixable;
use crate::model::checkpoint::Checkpoint;
use crate::model::{Manifest, Source, MANIFEST_FILE, MANIFEST_FORMAT, ONNX_DATA_FILE, ONNX_FILE, TOKENIZER_FILE};
use crate::onnx;

pub struct ImportOptions {
    /// A `.gguf` file or a Hugging Face checkpoint folder.
    pub source: PathBuf,
    /// The model directory to create.
    pub out: PathBuf,
    /// Replace a different model already in `out`.
    pub force: bool,
    pub quiet: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Imported,
    /// `out` already holds this very import (same source bytes, same patchbay).
    UpToDate,
}

/// Open a checkpoint by sniffing what `source` is.
pub fn open_checkpoint(source: &Path) -> anyhow::Result<Box<dyn Checkpoint>> {
    if source.is_dir() {
        if source.join("config.json").is_file() {
            return Ok(Box::new(safetensors::HfCheckpoint::open(source)?));
        }
        bail_fixable!(
            "{} is a folder without config.json", source.display();
            help: "pass a .gguf file or a Hugging Face checkpoint folder (config.json + *.safetensors + tokenizer.json)"
        );
    }
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    if file.read_exact(&mut magic).is_ok() && &magic == b"GGUF" {
        return Ok(Box::new(gguf::GgufCheckpoint::open(source)?));
    }
    bail_fixable!(
        "{} is neither a GGUF file (no GGUF magic) nor a checkpoint folder", source.display();
        help: "pass a .gguf file or a Hugging Face checkpoint folder"
    )
}

pub fn import(opts: &ImportOptions) -> anyhow::Result<Outcome> {
    let ckpt = open_checkpoint(&opts.source)?;
    let sha256 = hash_source(&opts.source)?;
    let name = opts.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());

    if opts.out.exists() {
        match Manifest::load(&opts.out) {
            Ok(existing)
                if existing.source.sha256 == sha256
                    && existing.source.patchbay_version == env!("CARGO_PKG_VERSION")
                    && !opts.force =>
            {
                return Ok(Outcome::UpToDate);
            }
            Ok(existing) if !opts.force => bail_fixable!(
                "{} already holds a different model (`{}`, imported from {} with sha256 {}…)",
                opts.out.display(),
                existing.name,
                existing.source.path,
                &existing.source.sha256[..12];
                help: "choose another output directory, or pass --force to replace it"
            ),
            Err(_) if !opts.force && std::fs::read_dir(&opts.out).map(|mut d| d.next().is_some()).unwrap_or(true) => {
                bail_fixable!(
                    "{} exists and is not an empty folder or a patchbay model directory", opts.out.display();
                    help: "choose another output directory, or pass --force to replace it"
                )
            }
            _ => {}
        }
    }

    let parent = opts.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = crate::cache::staging_dir(parent, &format!(".{name}"));
    std::fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let written = write_model_dir(ckpt.as_ref(), &staging, &name, &opts.source, sha256, opts.quiet);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    replace_dir(&staging, &opts.out)?;
    Ok(Outcome::Imported)
}

fn write_model_dir(
    ckpt: &dyn Checkpoint,
    dir: &Path,
    name: &str,
    source: &Path,
    sha256: String,
    quiet: bool,
) -> anyhow::Result<()> {
    let config = ckpt.config().clone();

    // Tokenizer first: it is cheap, and a model without one is useless.
    let tokenizer = ckpt.tokenizer_json()?;
    let parsed: tokenizers::Tokenizer =
        tokenizer.parse().map_err(|e| anyhow::anyhow!("the checkpoint's tokenizer is not valid: {e}"))?;
    let tokenizer_vocab = parsed.get_vocab_size(true);
    if tokenizer_vocab > config.vocab_size {
        bail!(
            "the tokenizer has {tokenizer_vocab} tokens but the model's embedding has only {} rows",
            config.vocab_size
        );
    }
    std::fs::write(dir.join(TOKENIZER_FILE), tokenizer)?;

    let progress = if quiet { ProgressBar::hidden() } else { ProgressBar::new(onnx::build::weight_count(&config)) };
    progress.set_style(
        ProgressStyle::with_template("importing {msg} [{bar:40}] {pos}/{len} tensors ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    progress.set_message(name.to_string());
    let mut data = onnx::writer::ExternalData::create(&dir.join(ONNX_DATA_FILE))?;
    let model = onnx::build::build(ckpt, &mut data, &progress)?;
    let unused = ckpt.unused_tensors();
    if !unused.is_empty() {
        bail_fixable!(
            "the checkpoint holds {} tensor(s) that patchbay's {} graph does not use: {}",
            unused.len(),
            config.architecture.name(),
            unused.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            help: "the model computes something patchbay does not implement (an extra bias or norm, rotary \
                   factors, ...); importing it without them would give wrong numbers"
        );
    }
    data.finish()?;
    std::fs::write(dir.join(ONNX_FILE), model.encode_to_vec())?;
    progress.finish_and_clear();

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: name.to_string(),
        config: config.clone(),
        source: Source {
            path: source.display().to_string(),
            format: ckpt.format().to_string(),
            sha256,
            patchbay_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        inputs: onnx::build::INPUTS.iter().map(|s| s.to_string()).collect(),
        logits: onnx::build::LOGITS.to_string(),
        hooks: Manifest::hook_table(&config),
    };
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_string_pretty(&manifest)? + "\n")?;
    Ok(())
}

/// Move `staging` to `out`, replacing whatever `out` held only once the new one is complete.
fn replace_dir(staging: &Path, out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let old = staging.with_extension("old");
        std::fs::rename(out, &old).with_context(|| format!("cannot move {} aside", out.display()))?;
        std::fs::rename(staging, out).with_context(|| format!("cannot move the new model into {}", out.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(staging, out).with_context(|| format!("cannot move the new model into {}", out.display()))?;
    }
    Ok(())
}

/// sha256 of the source: the file, or a folder's config, tokenizer and weight files in name order.
fn hash_source(source: &Path) -> anyhow::Result<String> {
    let mut files = vec![];
    if source.is_dir() {
        for entry in std::fs::read_dir(source)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name.ends_with(".safetensors") || name.ends_with(".json") {
                files.push(path);
            }
        }
        files.sort();
    } else {
        files.push(source.to_path_buf());
    }
    let mut hasher = Sha256::new();
    for path in files {
        let mut file = std::fs::File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}
