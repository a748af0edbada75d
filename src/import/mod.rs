//! `patchbay import`: checkpoints (GGUF, Hugging Face safetensors folders) -> model directory.

pub mod checkpoint;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod quant;
pub mod safetensors;
