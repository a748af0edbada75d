//! ONNX Runtime: finding the shared library, creating sessions on a device, running graphs.
//!
//! The library is loaded dynamically (no binary downloads are possible where patchbay runs).
//! Search order: `ORT_DYLIB_PATH`; the patchbay cache (`<cache>/pip/onnxruntime-<ver>`); an
//! installed Python `onnxruntime` (or `onnxruntime-gpu`) package. `ensure` may install the PyPI
//! wheel into the cache when nothing is found.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::Context as _;
use ort::ep::ExecutionProvider as _;
use ort::session::Session;

use crate::{bail_fixable, cache, fetch, fixable};

/// The ONNX Runtime release patchbay is built against (ort 2.0.0-rc.15 -> API 1.31).
pub const ORT_VERSION: &str = "1.31.1";

/// Where ONNX Runtime executes: the CPU, or the CUDA execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device `{other}`; expected `cpu` or `cuda`")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The loaded library and where it came from.
pub struct Runtime {
    pub library: PathBuf,
    pub found_via: String,
    env: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Load ONNX Runtime once per process. With `install`, fetch the PyPI wheel into the cache when
/// no library is found (the demo path); otherwise that is an error saying how to fix it.
pub fn ensure(install: bool) -> anyhow::Result<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    // One thread installs and loads; the others wait for it rather than racing.
    static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _loading = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let (library, found_via) = match locate() {
        Ok(found) => found,
        Err(looked) if install => {
            eprintln!("ONNX Runtime not found ({looked}); installing onnxruntime=={ORT_VERSION} from PyPI into the patchbay cache");
            let dir =
                fetch::pip_install(&format!("onnxruntime=={ORT_VERSION}"), &format!("onnxruntime-{ORT_VERSION}"))?;
            let lib = library_in_package(&dir.join("onnxruntime")).with_context(|| {
                format!("the onnxruntime wheel installed in {} has no libonnxruntime", dir.display())
            })?;
            (lib, "the patchbay cache (just installed)".to_string())
        }
        Err(looked) => bail_fixable!(
            "cannot find the ONNX Runtime shared library ({looked})";
            help: "run `patchbay demo` once (it installs onnxruntime=={ORT_VERSION} into {}), or `pip install onnxruntime=={ORT_VERSION}`, or set ORT_DYLIB_PATH to libonnxruntime.so",
            cache::cache_dir().display()
        ),
    };
    reuse_freed_memory();
    let env = ort::init_from(&library)
        .map_err(|e| anyhow::anyhow!("cannot load ONNX Runtime from {}: {e}", library.display()))?
        .with_name("patchbay")
        // One thread pool for every session: the engine runs a session per layer segment one
        // after another, and per-session pools would hold (and wake) threads per segment.
        .with_global_thread_pool(ort::environment::GlobalThreadPoolOptions::default())
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start ONNX Runtime from {}: {e}", library.display()))?;
    Ok(RUNTIME.get_or_init(|| Runtime { library, found_via, env }))
}

/// Sessions run without arenas (see [`session_from_proto`]), so every tensor is a fresh
/// allocation; glibc serves those above its (adaptive) mmap threshold with mmap and returns them
/// on free, paying page faults for each one again. Serve tensors up to 16 MiB from the heap and
/// keep up to 32 MiB of freed heap for reuse. Larger limits were faster by a few percent but let
/// fragmentation raise `examples/ioi.bay`'s peak RSS from 1.9 GB to 3.0 GB (1 GiB limits).
fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before ONNX Runtime allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Find the library without installing anything; the error lists the places looked at.
pub fn locate() -> Result<(PathBuf, String), String> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok((path, "ORT_DYLIB_PATH".into()))
        } else {
            Err(format!("ORT_DYLIB_PATH={} is not a file", path.display()))
        };
    }
    let cached = cache::cache_dir().join("pip").join(format!("onnxruntime-{ORT_VERSION}")).join("onnxruntime");
    if let Some(lib) = library_in_package(&cached) {
        return Ok((lib, "the patchbay cache".into()));
    }
    if let Some(lib) = python_package_dir("onnxruntime").and_then(|dir| library_in_package(&dir)) {
        return Ok((lib, "the Python onnxruntime package".into()));
    }
    Err(format!("looked at ORT_DYLIB_PATH (unset), {}, and python3's onnxruntime package", cached.display()))
}

/// `<package>/capi/libonnxruntime.so.<version>` (or the unversioned name).
fn library_in_package(package: &Path) -> Option<PathBuf> {
    let capi = package.join("capi");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&capi)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("libonnxruntime.so")
                || name.starts_with("libonnxruntime.dylib")
                || name == "onnxruntime.dll"
        })
        .collect();
    found.sort();
    found.pop()
}

/// Where python3 would import `module` from, without importing it.
fn python_package_dir(module: &str) -> Option<PathBuf> {
    let script = format!(
        "import importlib.util as u; s = u.find_spec('{module}'); print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')"
    );
    let out = Command::new("python3").args(["-c", &script]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Execution providers this ONNX Runtime build offers (compiled in; usability is checked when a
/// session registers one).
pub fn available_providers() -> Vec<&'static str> {
    let mut out = vec!["CPUExecutionProvider"];
    if ort::ep::CUDA::is_available().unwrap_or(false) {
        out.push("CUDAExecutionProvider");
    }
    out
}

/// The ONNX Runtime release, read from the library's versioned file name
/// (`libonnxruntime.so.1.31.1`); ort checked on load that its API is compatible.
pub fn version(library: &Path) -> Option<String> {
    let name = library.file_name()?.to_string_lossy().into_owned();
    let version = name.split_once(".so.").map(|(_, v)| v.to_string())?;
    version.chars().all(|c| c.is_ascii_digit() || c == '.').then_some(version)
}

/// The ONNX Runtime build string (commit, build type).
pub fn build_info() -> String {
    ort::info().to_string()
}

/// A session for `model` on `device`. CUDA never falls back to the CPU silently.
pub fn session(model: &Path, device: Device) -> anyhow::Result<Session> {
    let rt = ensure(false)?;
    let mut builder =
        Session::builder(&rt.env).map_err(|e| anyhow::anyhow!("cannot create an ONNX Runtime session: {e}"))?;
    if device == Device::Cuda {
        builder = with_cuda(builder, rt)?;
    }
    builder.commit_from_file(model).map_err(|e| {
        fixable!(
            "ONNX Runtime cannot load {}: {e}", model.display();
            help: "the model directory may be damaged or incomplete; re-import it with `patchbay import --force`"
        )
    })
}

fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    rt: &Runtime,
) -> anyhow::Result<ort::session::builder::SessionBuilder> {
    if !ort::ep::CUDA::is_available().unwrap_or(false) {
        bail_fixable!(
            "--device cuda: the ONNX Runtime at {} has no CUDA execution provider", rt.library.display();
            help: "install the GPU build (`pip install onnxruntime-gpu=={ORT_VERSION}`) and set ORT_DYLIB_PATH to its onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}, or run with --device cpu"
        );
    }
    // TF32 matrix products (ONNX Runtime's default on Ampere and later) keep 10 mantissa bits:
    // effects would differ from the CPU's in the third digit. Measurements stay in fp32.
    let cuda = ort::ep::CUDA::default().with_tf32(false).build().error_on_failure();
    builder.with_execution_providers([cuda]).map_err(|e| {
        fixable!(
            "--device cuda: cannot start the CUDA execution provider: {e}";
            help: "check the CUDA driver and libraries (`patchbay doctor`), or run with --device cpu"
        )
    })
}

/// How many runs a session will do, which decides what it prepares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runs {
    /// Many: graph optimisations and weight prepacking (each weight copied into the matrix
    /// kernel's layout once) pay for their set-up.
    Many,
    /// A few large ones, e.g. attribution's gradient session (one forward-and-backward pass per
    /// base run): without prepacking, which would copy every weight twice (for the forward
    /// product and the backward pass's product with its transpose). On SmolLM2, prepacking
    /// took 1.1 s of that session's 1.5 s set-up and saved about 0.35 s over its 96 passes.
    Few,
    /// One small run, e.g. a shape probe: neither optimisations nor prepacking.
    One,
}

/// A session for a graph built in memory (graph surgery) whose external weights live in
/// `weights_dir` (the model directory), for many runs.
pub fn session_from_proto(
    model: &crate::onnx::proto::ModelProto,
    weights_dir: &Path,
    device: Device,
) -> anyhow::Result<Session> {
    session_for_runs(model, weights_dir, device, Runs::Many)
}

/// [`session_from_proto`], prepared for `runs`.
pub fn session_for_runs(
    model: &crate::onnx::proto::ModelProto,
    weights_dir: &Path,
    device: Device,
    runs: Runs,
) -> anyhow::Result<Session> {
    use prost::Message as _;
    let rt = ensure(false)?;
    let mut builder = Session::builder(&rt.env)
        .and_then(|b| {
            b.with_config_entry("session.model_external_initializers_file_folder_path", weights_dir.to_string_lossy())
                .map_err(Into::into)
        })
        .map_err(|e| anyhow::anyhow!("cannot create an ONNX Runtime session: {e}"))?;
    builder = match device {
        Device::Cuda => with_cuda(builder, rt)?,
        // No per-session arena: the engine holds a session per layer segment, and arenas that
        // grow to the largest batch and never shrink would hold that batch's memory 30 times.
        Device::Cpu => builder
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])
            .map_err(|e| anyhow::anyhow!("cannot configure the CPU execution provider: {e}"))?,
    };
    let configured: ort::Result<_> = match runs {
        Runs::Many => Ok(builder),
        Runs::Few => builder.with_config_entry("session.disable_prepacking", "1").map_err(Into::into),
        Runs::One => builder
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
            .map_err(Into::into)
            .and_then(|b| b.with_config_entry("session.disable_prepacking", "1").map_err(Into::into)),
    };
    builder = configured.map_err(|e| anyhow::anyhow!("cannot configure an ONNX Runtime session: {e}"))?;
    builder
        .commit_from_memory(&model.encode_to_vec())
        .map_err(|e| anyhow::anyhow!("ONNX Runtime cannot load the graph for {}: {e}", weights_dir.display()))
}

/// Token sequences for one run: `[batch, pos]`, left-padded so the last position of every
/// row is its final token.
pub struct Batch {
    pub input_ids: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub batch: usize,
    pub pos: usize,
}

impl Batch {
    pub fn new(sequences: &[Vec<u32>]) -> Batch {
        let pos = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut b =
            Batch { input_ids: vec![], position_ids: vec![], attention_mask: vec![], batch: sequences.len(), pos };
        for seq in sequences {
            let pad = pos - seq.len();
            b.input_ids.extend(std::iter::repeat_n(0, pad).chain(seq.iter().map(|&t| t as i64)));
            b.position_ids.extend(std::iter::repeat_n(0, pad).chain(0..seq.len() as i64));
            b.attention_mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, seq.len())));
        }
        b
    }
}

/// Run a session on a batch and return the named outputs as f32 tensors.
pub fn run(
    session: &mut Session,
    batch: &Batch,
    outputs: &[&str],
) -> anyhow::Result<Vec<crate::model::checkpoint::Tensor>> {
    use ort::value::Tensor as OrtTensor;
    let shape = vec![batch.batch as i64, batch.pos as i64];
    let input = |data: &Vec<i64>| OrtTensor::from_array((shape.clone(), data.clone()));
    let inputs = ort::inputs![
        "input_ids" => input(&batch.input_ids)?,
        "position_ids" => input(&batch.position_ids)?,
        "attention_mask" => input(&batch.attention_mask)?,
    ];
    let result = session.run(inputs).map_err(|e| anyhow::anyhow!("ONNX Runtime run failed: {e}"))?;
    outputs
        .iter()
        .map(|&name| {
            let value = result.get(name).ok_or_else(|| anyhow::anyhow!("the graph has no output `{name}`"))?;
            let (shape, data) =
                value.try_extract_tensor::<f32>().map_err(|e| anyhow::anyhow!("output `{name}`: {e}"))?;
            Ok(crate::model::checkpoint::Tensor::new(shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
        })
        .collect()
}
