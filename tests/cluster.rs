//! The cluster recipes for real: a one-node Slurm cluster started on this machine runs a sweep
//! as `patchbay plan --slurm 4`'s job array and merge job, with one shard cancelled mid-run and
//! resubmitted, and the merged CSV is byte-identical to one process's; the Kubernetes manifest
//! validates against the Kubernetes schema.
//!
//! The Slurm test installs Debian's `slurm-wlm` and `munge` when they are missing, which needs
//! root (CI runs as root); elsewhere it says it cannot run, and passes only where Slurm is
//! already installed and running it as this user works.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/sweep_fixture.rs"]
mod sweep_fixture;
use sweep_fixture::{setup, MEMORY};

fn patchbay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_patchbay"))
}

fn ok(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{command:?}: {text}");
    text
}

/// The cluster, stopped when dropped (also when the test fails).
struct Cluster {
    script: PathBuf,
    state: PathBuf,
    conf: String,
}

impl Cluster {
    fn start(state: &Path) -> Option<Cluster> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/slurm-cluster.sh");
        let installed = Command::new("sh").args(["-c", "command -v sbatch && command -v slurmctld"]).output();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root && !installed.is_ok_and(|o| o.status.success()) {
            eprintln!("cannot run: Slurm is not installed and installing it needs root");
            return None;
        }
        let out = Command::new("bash").arg(&script).arg("start").arg(state).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the Slurm cluster did not start: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let conf = stdout.lines().last().and_then(|l| l.strip_prefix("export SLURM_CONF=")).expect("SLURM_CONF");
        Some(Cluster { script, state: state.to_path_buf(), conf: conf.trim().to_string() })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", &self.conf);
        command
    }

    /// Wait until no job of ours is queued or running.
    fn drain(&self, within: Duration) {
        let started = Instant::now();
        loop {
            let queue = ok(self.command("squeue").args(["-h", "-o", "%i %T"]));
            if queue.trim().is_empty() {
                return;
            }
            assert!(started.elapsed() < within, "jobs still queued after {within:?}: {queue}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(&self.script).arg("stop").arg(&self.state).output();
    }
}

#[test]
fn a_slurm_job_array_with_a_cancelled_shard_merges_byte_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let file = setup(tmp.path(), 24);
    let out = tmp.path().join("out");
    ok(patchbay().args(["run", "--quiet", "--memory", MEMORY]).arg(&file));
    let expected = (std::fs::read(out.join("r.csv")).unwrap(), std::fs::read(out.join("p.csv")).unwrap());
    std::fs::remove_dir_all(&out).unwrap();

    let Some(cluster) = Cluster::start(&tmp.path().join("slurm")) else { return };
    let script = tmp.path().join("submit.sh");
    let text = ok(patchbay().args(["plan", "--slurm", "4", "--cpus", "1", "--memory", MEMORY]).arg(&file));
    assert!(text.contains("--array=\"$SHARDS\"") && text.contains("--dependency=afterok:"), "{text}");
    std::fs::write(&script, text).unwrap();
    let submit = |shards: &[&str]| {
        let mut command = cluster.command("bash");
        command.arg(&script).args(shards).env("PATCHBAY", env!("CARGO_BIN_EXE_patchbay"));
        let said = ok(&mut command);
        said.split("job array ").nth(1).and_then(|t| t.split(';').next()).expect("the array's job id").to_string()
    };
    let array = submit(&[]);

    // Cancel shard 2 once it has checkpointed a few batches.
    let log = out.join("r.csv.run/variant-0.shard-2.log");
    let started = Instant::now();
    while std::fs::read_to_string(&log).map_or(true, |t| t.matches("end ").count() < 3) {
        assert!(!out.join("r.csv.run/shard-2.done").exists(), "shard 2 finished before it could be cancelled");
        assert!(started.elapsed() < Duration::from_secs(300), "shard 2 checkpointed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(cluster.command("scancel").arg(format!("{array}_2")));
    // The other shards finish; the merge, waiting on every shard, never runs.
    cluster.drain(Duration::from_secs(600));
    for k in [1, 3, 4] {
        assert!(out.join(format!("r.csv.run/shard-{k}.done")).is_file(), "shard {k} not done");
    }
    assert!(!out.join("r.csv.run/shard-2.done").exists());
    assert!(!out.join("r.csv").exists(), "no merge without shard 2");
    let status = patchbay().arg("status").arg(out.join("r.csv.run")).output().unwrap();
    assert_eq!(status.status.code(), Some(1), "status exits 1 while a shard is missing");
    assert!(String::from_utf8_lossy(&status.stdout).contains("3/4 done"));

    // Resubmit shard 2 alone, with a new merge after it.
    submit(&["2"]);
    cluster.drain(Duration::from_secs(600));
    let shard_log = std::fs::read_to_string(out.join("r.csv.slurm/shard-2.out")).unwrap_or_default();
    let merge_log = std::fs::read_to_string(out.join("r.csv.slurm/merge.out")).unwrap_or_default();
    assert!(shard_log.contains("going on from the batches already in"), "shard 2 did not resume: {shard_log}");
    assert!(merge_log.contains("merging the 4 shards"), "{merge_log}");
    assert_eq!(std::fs::read(out.join("r.csv")).unwrap(), expected.0, "merged CSV differs: {merge_log}");
    assert_eq!(std::fs::read(out.join("p.csv")).unwrap(), expected.1);
    assert!(!out.join("r.csv.run").exists(), "the merge removes the run folder");
}

/// The manifest against the Kubernetes API schema (the `kubernetes-validate` package and its
/// dependencies from PyPI, installed into the patchbay cache), CPU and CUDA; a broken manifest
/// fails the same check.
#[test]
fn the_kubernetes_manifest_validates_against_the_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let file = setup(tmp.path(), 2);
    let validator = patchbay::cache::cache_dir().join("pip/kubernetes-validate-1.37.0");
    if !validator.is_dir() {
        let staging = tmp.path().join("validator");
        ok(Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&staging)
            .arg("kubernetes-validate==1.37.0"));
        std::fs::create_dir_all(validator.parent().unwrap()).unwrap();
        // Another test process may have installed it meanwhile; either copy will do.
        let _ = std::fs::rename(&staging, &validator);
    }
    let validate = |manifest: &str| {
        let path = tmp.path().join("job.yaml");
        std::fs::write(&path, manifest).unwrap();
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.31.0"])
            .arg(&path)
            .env("PYTHONPATH", &validator)
            .output()
            .unwrap()
    };
    for device in ["cpu", "cuda"] {
        let manifest = ok(patchbay().args(["plan", "--kubernetes", "3", "--device", device]).arg(&file));
        assert!(manifest.contains("completionMode: Indexed") && manifest.contains("$((JOB_COMPLETION_INDEX + 1))/3"));
        assert_eq!(manifest.contains("nvidia.com/gpu: 1"), device == "cuda");
        let checked = validate(&manifest);
        let said = String::from_utf8_lossy(&checked.stdout).into_owned() + &String::from_utf8_lossy(&checked.stderr);
        assert!(checked.status.success() && said.matches("passed").count() == 2, "{device}: {said}");
        let broken = validate(&manifest.replace("completions: 3", "completions: three"));
        assert!(!broken.status.success(), "a broken manifest passed");
    }
}
