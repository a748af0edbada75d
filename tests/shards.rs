//! `patchbay run --shard K/N` on a tiny model, with local processes as the cluster: the merged
//! results are byte-identical to one process's, whatever happened to the shards on the way
//! (killed, rerun, missing, of another plan).

use std::path::Path;
use std::process::{Command, Output, Stdio};

#[path = "support/sweep_fixture.rs"]
mod sweep_fixture;
use sweep_fixture::{setup, setup_with, MEMORY};

fn patchbay(args: &[&str], file: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_patchbay"));
    command.args(["run", "--quiet", "--memory", MEMORY]).args(args).arg(file);
    command
}

fn run(args: &[&str], file: &Path) -> Output {
    patchbay(args, file).output().unwrap()
}

fn ok(out: Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    text
}

/// What `patchbay status` prints, and whether it says every shard is done (exit code 0, not 1).
fn status(dir: &Path) -> (String, bool) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_patchbay")).arg("status").arg(dir.join("out/r.csv.run")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{text}{}", String::from_utf8_lossy(&out.stderr));
    (text, out.status.success())
}

/// The results of one process, then the outputs removed.
fn single_process(dir: &Path, file: &Path) -> (Vec<u8>, Vec<u8>) {
    ok(run(&[], file));
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let expected = (read("out/r.csv"), read("out/p.csv"));
    for f in ["out/r.csv", "out/p.csv", "out/r.provenance.json"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    expected
}

fn merged(dir: &Path, file: &Path) -> (Vec<u8>, Vec<u8>) {
    let text = ok(run(&[], file));
    assert!(text.contains("merging the"), "{text}");
    assert!(!dir.join("out/r.csv.run").exists(), "the merge removes the run folder");
    (std::fs::read(dir.join("out/r.csv")).unwrap(), std::fs::read(dir.join("out/p.csv")).unwrap())
}

#[test]
fn concurrent_local_shards_merge_to_the_bytes_of_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let file = setup(tmp.path(), 4);
    let expected = single_process(tmp.path(), &file);
    let children: Vec<_> = (1..=3)
        .map(|k| patchbay(&["--shard", &format!("{k}/3")], &file).stdout(Stdio::piped()).spawn().unwrap())
        .collect();
    let mut computed = 0;
    for child in children {
        let text = ok(child.wait_with_output().unwrap());
        assert!(text.contains("done"), "{text}");
        computed +=
            text.split(" patched passes computed").next().unwrap().rsplit('(').next().unwrap().parse::<u64>().unwrap();
    }
    assert!(!tmp.path().join("out/r.csv").exists(), "shards write no outputs");
    let (shown, all_done) = status(tmp.path());
    assert!(all_done && shown.contains("all shards done"), "{shown}");
    assert_eq!(merged(tmp.path(), &file), expected);
    // Every patched pass was computed by exactly one shard.
    let provenance = std::fs::read_to_string(tmp.path().join("out/r.provenance.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&provenance).unwrap();
    assert_eq!(Some(computed), json["counts"]["patched_passes_run"].as_u64(), "{provenance}");
    assert_eq!(Some(computed), json["patched_passes_restored"].as_u64(), "{provenance}");
}

#[test]
fn a_killed_shard_resumes_and_a_shard_run_twice_is_harmless() {
    let tmp = tempfile::tempdir().unwrap();
    let file = setup(tmp.path(), 12);
    let expected = single_process(tmp.path(), &file);
    ok(run(&["--shard", "1/2"], &file));
    // Run twice: nothing is computed again.
    let again = ok(run(&["--shard", "1/2"], &file));
    assert!(again.contains("(0 patched passes computed)"), "{again}");

    // kill -9 shard 2 after a few batches.
    let mut child = patchbay(&["--shard", "2/2"], &file).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let log = tmp.path().join("out/r.csv.run/variant-0.shard-2.log");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(true, |t| t.matches("end ").count() < 3) {
        assert!(child.try_wait().unwrap().is_none(), "the shard finished before it could be killed");
        assert!(started.elapsed().as_secs() < 60, "no checkpoint written");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (shown, all_done) = status(tmp.path());
    assert!(!all_done && shown.contains("shard 1/2: done") && shown.contains("1/2 done"), "{shown}");
    // The merge refuses, and writes nothing.
    let refused = run(&[], &file);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not done (2/2)") && stderr.contains("nothing was written"), "{stderr}");
    assert!(!tmp.path().join("out/r.csv").exists());

    let resumed = ok(run(&["--shard", "2/2"], &file));
    assert!(resumed.contains("going on from the batches already in"), "{resumed}");
    assert_eq!(merged(tmp.path(), &file), expected);
}

#[test]
fn missing_shards_are_named_and_other_plans_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = setup(tmp.path(), 2);
    ok(run(&["--shard", "1/3"], &file));
    ok(run(&["--shard", "3/3"], &file));
    let refused = run(&[], &file);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("1 of its 3 shards not done (2/3)"), "{stderr}");
    assert!(!tmp.path().join("out/r.csv").exists() && !tmp.path().join("out/p.csv").exists());
    let (shown, all_done) = status(tmp.path());
    assert!(!all_done && shown.contains("shard 2/3: not started"), "{shown}");

    // Another split of the same folder.
    let split = run(&["--shard", "2/4"], &file);
    let stderr = String::from_utf8_lossy(&split.stderr);
    assert!(!split.status.success() && stderr.contains("split into 3 shards, not 4"), "{stderr}");
    // Another plan: the file changed after two shards ran.
    let text = std::fs::read_to_string(&file).unwrap().replace("seed 1", "seed 2");
    std::fs::write(&file, text).unwrap();
    for args in [&["--shard", "2/3"][..], &[]] {
        let other = run(args, &file);
        let stderr = String::from_utf8_lossy(&other.stderr);
        assert_eq!(other.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("holds the work of a different plan"), "{stderr}");
    }
    assert!(tmp.path().join("out/r.csv.run/shard-1.done").is_file(), "finished shards are never discarded");
    // Bad shard arguments.
    for bad in ["0/3", "4/3", "2"] {
        let out = run(&["--shard", bad], &file);
        assert_eq!(out.status.code(), Some(2), "--shard {bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("expected K/N"), "--shard {bad}");
    }
}

/// Estimated and path targets: `verify top k` patches a subset of a target's runs exactly
/// (checkpoints name runs by the variant's numbering), a target estimated only leaves a shard
/// nothing to patch, yet it is done, and path runs are the merge's.
#[test]
fn shards_of_estimated_targets_merge_to_the_bytes_of_one_process() {
    for targets in [
        "patch heads = attn.hook_z layers all heads all by attribution verify top 3\npatch resid = hook_resid_mid layers all positions each",
        "patch heads = attn.hook_z layers all heads all by attribution",
        "path p = from attn.hook_z layers 0 heads all to L1.H0 q\npatch resid = hook_resid_mid layers all positions each",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let file = setup_with(tmp.path(), 3, targets);
        let expected = single_process(tmp.path(), &file);
        for k in ["1/2", "2/2"] {
            ok(run(&["--shard", k], &file));
        }
        assert!(status(tmp.path()).1, "{targets}: every shard is done");
        assert_eq!(merged(tmp.path(), &file), expected, "{targets}");
    }
}
