//! The `patchbay` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use patchbay::ir::experiment::Experiment;
use patchbay::model::ModelDir;
use patchbay::report::page;
use patchbay::runtime::{self, Device};
use patchbay::{cache, cluster, demo, import, predict};

#[derive(Parser)]
#[command(name = "patchbay", version, about = "Compile and run declarative activation-patching experiments")]
struct Cli {
    /// No progress bars (for CI logs).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch ONNX Runtime and the SmolLM2-135M demo model (first use only), import it, and run it.
    Demo {
        #[arg(long, default_value = "cpu")]
        device: Device,
    },
    /// Import a GGUF file or a Hugging Face checkpoint folder into a model directory.
    Import {
        /// A `.gguf` file, or a folder with config.json, *.safetensors and tokenizer.json.
        source: PathBuf,
        /// The model directory to write [default: <models folder>/<source name>].
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Replace a different model already in the output directory.
        #[arg(long)]
        force: bool,
    },
    /// Print the most likely next tokens of a prompt.
    Predict {
        /// A model directory, or the name of a model in the models folder.
        #[arg(long)]
        model: String,
        prompt: String,
        #[arg(long, short = 'k', default_value_t = 5)]
        top_k: usize,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[arg(long, default_value = "cpu")]
        device: Device,
    },
    /// Parse and check experiment files against their model (no model run).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Override the device the experiment names.
        #[arg(long)]
        device: Option<Device>,
    },
    /// Print the compiled execution plan of an experiment, or a cluster job running it in shards.
    Plan {
        file: PathBuf,
        #[arg(long)]
        device: Option<Device>,
        /// Print a bash script submitting N shards as a Slurm job array, and the merge after them.
        #[arg(long, value_name = "N", conflicts_with = "kubernetes")]
        slurm: Option<usize>,
        /// Print a Kubernetes manifest: an Indexed Job of N shards, and a merge Job.
        #[arg(long, value_name = "N")]
        kubernetes: Option<usize>,
        /// The `run --memory` budget the shards and the merge use, in GiB.
        #[arg(long, default_value_t = 1.0)]
        memory: f64,
        /// CPUs per shard.
        #[arg(long, default_value_t = 4)]
        cpus: usize,
    },
    /// Run experiments: every variant and patch, the expectations, the output files. Exit code 0
    /// when every expectation holds, 1 when one fails (results are still written), 2 on an error.
    Run {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        device: Option<Device>,
        /// Memory budget of one ONNX Runtime call, in GiB (decides how many passes are batched).
        #[arg(long, default_value_t = 1.0)]
        memory: f64,
        /// Use the reference executor (one plain forward pass per component and prompt; slow).
        #[arg(long)]
        reference: bool,
        /// Compute only shard K of N (1-based) of the patched passes into the run folder; a run
        /// without --shard merges the shards once all are done.
        #[arg(long, value_name = "K/N")]
        shard: Option<patchbay::run::shard::Shard>,
    },
    /// Show a run folder's progress (`<output>.run`, or the output CSV): per shard, and an ETA.
    /// Exit code 0 once every shard is done, 1 before.
    Status { folder: PathBuf },
    /// Render a result CSV (and the provenance sidecar beside it) as a self-contained HTML page.
    Report {
        /// The `output` CSV of `patchbay run`.
        results: PathBuf,
        /// The folder to write to [default: the CSV's folder].
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Write `<stem>.md` and the SVG files it links instead of the HTML page.
        #[arg(long)]
        markdown: bool,
        /// Replace files that are not patchbay reports.
        #[arg(long)]
        force: bool,
    },
    /// Show the ONNX Runtime found, its execution providers, and the models available.
    Doctor,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
}

fn main() -> ExitCode {
    // Die quietly when stdout is closed (`patchbay plan x.bay | head`), like other Unix tools,
    // instead of panicking in println!.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Demo { device } => demo(device, cli.quiet),
        Command::Import { source, out, force } => {
            let out = out.unwrap_or_else(|| {
                let stem = source.file_stem().unwrap_or_default().to_string_lossy().to_lowercase();
                cache::models_dir().join(stem)
            });
            let opts = import::ImportOptions { source, out: out.clone(), force, quiet: cli.quiet };
            match import::import(&opts)? {
                import::Outcome::Imported => println!("imported {}", out.display()),
                import::Outcome::UpToDate => println!("{} is up to date", out.display()),
            }
            Ok(true)
        }
        Command::Predict { model, prompt, top_k, format, device } => {
            runtime::ensure(false)?;
            let dir = ModelDir::open(&cache::resolve_model(&model, &std::env::current_dir()?))?;
            let prediction = predict::predict(&dir, &prompt, top_k, device)?;
            match format {
                Format::Table => print_table(&prompt, &prediction),
                Format::Csv => print_csv(&prediction)?,
            }
            Ok(true)
        }
        Command::Check { files, device } => {
            let mut all_ok = true;
            for file in &files {
                match checked(file, device) {
                    Some(exp) => println!("ok: {} ({})", file.display(), exp_summary(&exp)),
                    None => all_ok = false,
                }
            }
            Ok(all_ok)
        }
        Command::Plan { file, device, slurm, kubernetes, memory, cpus } => {
            let Some(exp) = checked(&file, device) else { return Ok(false) };
            let plan = patchbay::plan::plan(&exp);
            match (slurm, kubernetes) {
                (Some(n), _) => {
                    check_memory(memory)?;
                    print!("{}", cluster::slurm(&cluster::Job::new(&exp, &plan, &file, n, memory, cpus)?))
                }
                (_, Some(n)) => {
                    check_memory(memory)?;
                    let job = cluster::Job::new(&exp, &plan, &file, n, memory, cpus)?;
                    print!("{}", cluster::kubernetes(&job, &exp.model.dir, &cache::cache_dir())?)
                }
                _ => print!("{plan}"),
            }
            Ok(true)
        }
        Command::Run { files, device, memory, reference, shard } => {
            check_memory(memory)?;
            on_interrupt_say_how_to_resume();
            let options = patchbay::run::RunOptions {
                executor: if reference { patchbay::run::Executor::Reference } else { patchbay::run::Executor::Fast },
                memory_bytes: (memory * (1u64 << 30) as f64) as u64,
                quiet: cli.quiet,
                shard,
            };
            run_files(&files, device, &options)
        }
        Command::Status { folder } => {
            let (text, all_done) = patchbay::run::shard::status(&folder)?;
            print!("{text}");
            Ok(all_done)
        }
        Command::Report { results, out, markdown, force } => {
            let kind = if markdown { page::Kind::Markdown } else { page::Kind::Html };
            println!("{}", page::report_csv(&results, out.as_deref(), kind, force)?.display());
            Ok(true)
        }
        Command::Doctor => doctor(),
    }
}

fn check_memory(memory: f64) -> anyhow::Result<()> {
    if !(memory.is_finite() && memory > 0.0) {
        patchbay::bail_fixable!(
            "--memory {memory}: the memory budget of one ONNX Runtime call must be a positive number of GiB";
            help: "leave it out for the default of 1 GiB, or give e.g. `--memory 0.5`"
        );
    }
    Ok(())
}

/// Ctrl-C during `run`: completed batches are checkpointed; say so, and how to go on.
fn on_interrupt_say_how_to_resume() {
    #[cfg(unix)]
    {
        extern "C" fn handler(_: libc::c_int) {
            const MESSAGE: &[u8] =
                b"\ninterrupted: completed batches are saved beside the output; run the same command again to resume\n";
            // SAFETY: write(2) and _exit(2) are async-signal-safe.
            unsafe {
                libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
                libc::_exit(130);
            }
        }
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(libc::SIGINT, handler as *const () as libc::sighandler_t);
        }
    }
}

fn run_files(files: &[PathBuf], device: Option<Device>, options: &patchbay::run::RunOptions) -> anyhow::Result<bool> {
    let mut all_hold = true;
    for file in files {
        let Some(exp) = checked(file, device) else {
            anyhow::bail!("{} does not check; nothing was run", file.display());
        };
        let report = patchbay::report::run_and_write(&exp, options)?;
        if let Some(shard) = report.outcome.shard {
            println!(
                "{}: shard {shard} done in {:.1} s ({} patched passes computed); merge with `patchbay run {}` once every shard is done",
                file.display(),
                report.outcome.seconds,
                report.outcome.work.passes - report.outcome.work.restored_passes,
                file.display()
            );
            continue;
        }
        print!("{}", patchbay::report::summary::summary(&report.outcome, &report.written));
        all_hold &= report.outcome.verdicts.iter().all(|v| v.holds);
    }
    Ok(all_hold)
}

/// Parse and check one file, printing its diagnostics (warnings too) to stderr; `None` when it
/// has errors.
fn checked(file: &Path, device: Option<Device>) -> Option<Experiment> {
    match patchbay::check::check_file(file, device) {
        Ok(exp) => {
            for w in &exp.warnings {
                eprint!("{}", w.render_terminal());
            }
            Some(exp)
        }
        Err(diags) => {
            for d in &diags {
                eprint!("{}", d.render_terminal());
            }
            eprintln!("error: {} has {} error(s)", file.display(), diags.iter().filter(|d| d.is_error()).count());
            None
        }
    }
}

fn exp_summary(exp: &Experiment) -> String {
    let n_prompts: usize = exp.datasets.iter().map(|d| d.prompts.len()).sum();
    format!(
        "{} dataset(s), {n_prompts} prompt(s), {} corruption(s), {} patch target(s), {} metric(s), {} expectation(s)",
        exp.datasets.len(),
        exp.corruptions.len(),
        exp.patches.len(),
        exp.metrics.len(),
        exp.expectations.len()
    )
}

fn print_table(prompt: &str, prediction: &predict::Prediction) {
    println!("{prompt:?} ({} tokens)", prediction.tokens.len());
    println!("  {:>4}  {:<20} {:>8}  {:>10}", "rank", "token", "id", "prob");
    for (rank, c) in prediction.candidates.iter().enumerate() {
        println!("  {:>4}  {:<20} {:>8}  {:>10.4}", rank + 1, format!("{:?}", c.token), c.token_id, c.probability);
    }
}

fn print_csv(prediction: &predict::Prediction) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(std::io::stdout());
    w.write_record(["rank", "token_id", "token", "probability", "logit"])?;
    for (rank, c) in prediction.candidates.iter().enumerate() {
        w.write_record([
            (rank + 1).to_string(),
            c.token_id.to_string(),
            c.token.clone(),
            format!("{:.6}", c.probability),
            c.logit.to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// `examples/demo.bay`, with the shared pools spliced in so it runs from the cache folder.
const DEMO_EXPERIMENT: &str = include_str!("../examples/demo.bay");
const DEMO_NAMES: &str = include_str!("../examples/shared/names.bay");

fn demo(device: Device, quiet: bool) -> anyhow::Result<bool> {
    runtime::ensure(true)?;
    let model = demo::ensure_demo_model(quiet)?;
    for prompt in demo::DEMO_PROMPTS {
        print_table(prompt, &predict::predict(&model, prompt, 5, device)?);
    }
    println!("\nmodel directory: {}", model.path.display());
    // The main job: an activation-patching sweep, written where the demo keeps its files.
    let file = cache::cache_dir().join("demo").join("demo.bay");
    std::fs::create_dir_all(file.parent().expect("has a parent"))?;
    std::fs::write(&file, DEMO_EXPERIMENT.replace("include \"shared/names.bay\"", DEMO_NAMES))?;
    println!("\nrunning the demo study (examples/demo.bay: 270 heads x 8 IOI prompts, three corruptions, two metrics)");
    let exp = patchbay::check::check_file(&file, Some(device)).map_err(|d| {
        anyhow::anyhow!(
            "the demo experiment does not check: {}",
            d.iter().map(|d| d.render_plain()).collect::<String>()
        )
    })?;
    let report = patchbay::report::run_and_write(&exp, &patchbay::run::RunOptions { quiet, ..Default::default() })?;
    print!("{}", patchbay::report::summary::summary(&report.outcome, &report.written));
    if let Some(page) = &exp.outputs.report {
        println!("\nthe report: {}", page.display());
    }
    println!("next: `patchbay run examples/ioi.bay` runs the full methodology comparison");
    Ok(report.outcome.verdicts.iter().all(|v| v.holds))
}

fn doctor() -> anyhow::Result<bool> {
    let mut healthy = true;
    match runtime::ensure(false) {
        Ok(rt) => {
            let version = runtime::version(&rt.library).unwrap_or_else(|| "version unknown".into());
            println!("ONNX Runtime {version}: {} (found via {})", rt.library.display(), rt.found_via);
            println!("  build: {}", runtime::build_info());
            println!("  execution providers: {}", runtime::available_providers().join(", "));
        }
        Err(e) => {
            healthy = false;
            println!("ONNX Runtime: not usable\n  {e:#}");
        }
    }
    let models = cache::models_dir();
    println!("models folder: {}", models.display());
    let mut found = 0;
    if let Ok(entries) = std::fs::read_dir(&models) {
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
        dirs.sort();
        for dir in dirs {
            if let Ok(m) = ModelDir::open(&dir) {
                let c = &m.manifest.config;
                println!(
                    "  {:<24} {} {} layers, d_model {}, {} heads, vocab {} (from {})",
                    m.manifest.name,
                    c.architecture.name(),
                    c.n_layers,
                    c.d_model,
                    c.n_heads,
                    c.vocab_size,
                    m.manifest.source.format
                );
                found += 1;
            }
        }
    }
    if found == 0 {
        println!("  (none; `patchbay demo` fetches SmolLM2-135M, `patchbay import` adds your own)");
    }
    Ok(healthy)
}
