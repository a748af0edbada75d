//! Each stage's output as a snapshot (PRQL-style): the AST, the typed experiment and the plan
//! of one IOI file; plans are deterministic.

#[path = "support/lang_fixture.rs"]
mod fixture;

use patchbay::{check, plan};

pub const IOI: &str = r#"# IOI on the fixture model
model "tiny" on cpu
pool names = [" Mary", " John", " Tom", " Sarah", " Alice", " Bob"]
dataset ioi {
  template "When{IO} and{S1} went to the{PLACE},{S2} gave a drink to"
  slot IO, S1 from names distinct
  slot S2 = S1
  slot PLACE from [" store", " park"]
  count 4  seed 1
  answer IO  wrong S1
}
corruption s2_io = replace S2 with IO
corruption abc   = resample IO, S1, S2 distinct seed 3
corruption gn    = noise on S2 scale 3 samples 10 seed 7
patch heads = attn.hook_z layers all heads all
patch resid = hook_resid_pre layers 0..1 positions [S1, S2, end]
metric ld = logit_diff normalized
metric p  = prob
metric kl = kl
sweep { corruption: [s2_io, abc, gn]  direction: [denoise, noise] }
expect detected heads by ld includes L1.H3
expect top 3 heads by ld includes L1.H2 when corruption = s2_io
expect effect resid L1 @ S2 by ld > 0.2
output "results/ioi.csv"
"#;

fn plan_text(src: &str, name: &str) -> String {
    let ws = fixture::workspace();
    let path = fixture::write(ws.path(), name, src);
    let exp = match check::check_file(&path, None) {
        Ok(e) => e,
        Err(d) => panic!("{}", d.iter().map(|d| d.render_plain()).collect::<String>()),
    };
    let text = plan::plan(&exp).to_string();
    text.replace(&ws.path().display().to_string(), "<ws>")
}

#[test]
fn ioi_plan() {
    insta::assert_snapshot!(plan_text(IOI, "ioi.bay"));
}

#[test]
fn plans_are_deterministic() {
    let ws = fixture::workspace();
    let path = fixture::write(ws.path(), "ioi.bay", IOI);
    let a = plan::plan(&check::check_file(&path, None).unwrap());
    let b = plan::plan(&check::check_file(&path, None).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.to_string(), b.to_string());
    // The seed matters.
    let path2 = fixture::write(ws.path(), "ioi2.bay", &IOI.replace("seed 1", "seed 2"));
    let c = plan::plan(&check::check_file(&path2, None).unwrap());
    assert_ne!(a.variants[0].prompts, c.variants[0].prompts);
}

#[test]
fn windows_and_summation_plan() {
    let src = r#"
model "tiny"
dataset facts from "facts.csv" { prompt: prompt  counterfactual: corrupted  answer: target  wrong: other  slot subject: subject }
corruption cf = counterfactual
corruption gn = noise on subject
patch mlp = hook_mlp_out layers all window [2] with summation baseline
patch joint = {hook_attn_out, hook_mlp_out} layers 1 positions [end, -2, last subject]
metric lp = logprob
metric pd = prob_diff per_prompt_mean
"#;
    let ws = fixture::workspace();
    fixture::write(
        ws.path(),
        "facts.csv",
        "prompt,corrupted,target,other,subject\nThe capital of France is,The capital of Italy is,Paris,Rome,France\nThe capital of Spain is,The capital of Italy is,Madrid,Rome,Spain\n",
    );
    let path = fixture::write(ws.path(), "facts.bay", src);
    let exp = check::check_file(&path, None)
        .unwrap_or_else(|d| panic!("{}", d.iter().map(|d| d.render_plain()).collect::<String>()));
    let p = plan::plan(&exp);
    // w=2 centred on layer 1 of 2: layers 0..1; the baseline adds single layers 0 and 1.
    let mlp: Vec<_> = p.variants[0].patches.iter().filter(|r| r.target == "mlp").collect();
    assert_eq!(mlp.len(), 4);
    assert_eq!(mlp[1].layers, vec![0, 1]);
    insta::assert_snapshot!(p.to_string().replace(&ws.path().display().to_string(), "<ws>"));
}

/// The plan itself (what the engine executes), not only its text: a change to runs, positions,
/// corruptions or outputs shows in review.
/// The small IOI file the IR snapshots use.
fn small_ioi() -> String {
    IOI.replace("count 4", "count 2")
        .replace("heads all\n", "heads [0, 1]\n")
        .replace("L1.H3", "L1.H1")
        .replace("L1.H2 when", "L1.H0 when")
        .replace("samples 10", "samples 2")
        .replace("corruption abc   = resample IO, S1, S2 distinct seed 3\n", "")
        .replace("[s2_io, abc, gn]", "[s2_io, gn]")
}

/// `value` as pretty JSON, with the workspace path (different on every run) replaced.
fn snapshot_json(value: &impl serde::Serialize, ws: &std::path::Path) -> String {
    serde_json::to_string_pretty(value).unwrap().replace(&ws.display().to_string(), "<ws>")
}

#[test]
fn ioi_ast() {
    let ast = patchbay::syntax::parse(&small_ioi(), std::path::Path::new("ioi.bay"))
        .unwrap_or_else(|d| panic!("{}", d.iter().map(|d| d.render_plain()).collect::<String>()));
    insta::assert_snapshot!(serde_json::to_string_pretty(&ast).unwrap());
}

#[test]
fn ioi_experiment_ir() {
    let ws = fixture::workspace();
    let path = fixture::write(ws.path(), "ioi.bay", &small_ioi());
    let exp = check::check_file(&path, None)
        .unwrap_or_else(|d| panic!("{}", d.iter().map(|d| d.render_plain()).collect::<String>()));
    insta::assert_snapshot!(snapshot_json(&exp, ws.path()));
}

#[test]
fn ioi_plan_ir() {
    let ws = fixture::workspace();
    let path = fixture::write(ws.path(), "ioi.bay", &small_ioi());
    let exp = check::check_file(&path, None)
        .unwrap_or_else(|d| panic!("{}", d.iter().map(|d| d.render_plain()).collect::<String>()));
    insta::assert_snapshot!(snapshot_json(&plan::plan(&exp), ws.path()));
}
