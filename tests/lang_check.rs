//! Diagnostics of `check`, as snapshots (miette graphical handler, plain ASCII theme), and a
//! fuzz test (fixed seed and case count): `check` never panics.

#[path = "support/lang_fixture.rs"]
mod fixture;

use std::path::Path;

use patchbay::check;

/// Check `src` in a fresh workspace; render every diagnostic.
fn diagnose(src: &str, extra: &[(&str, &str)]) -> String {
    let ws = fixture::workspace();
    for (name, text) in extra {
        fixture::write(ws.path(), name, text);
    }
    let path = fixture::write(ws.path(), "exp.bay", src);
    let out = match check::check_file(&path, None) {
        Ok(_) => "ok".to_string(),
        Err(d) => d.iter().map(|d| d.render_plain()).collect::<Vec<_>>().join("\n"),
    };
    // Paths that differ between machines.
    out.replace(&ws.path().display().to_string(), "<ws>")
        .replace(&patchbay::cache::models_dir().display().to_string(), "<models>")
}

const HEAD: &str = r#"model "tiny"
pool names = [" Mary", " John", " Tom"]
dataset ioi {
  template "When{IO} and{S1} went to the store,{S2} gave a drink to"
  slot IO, S1 from names distinct
  slot S2 = S1
  count 3 seed 1
  answer IO wrong S1
}
"#;

fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

#[test]
fn valid_file_checks() {
    let src = with_head(
        "corruption s2 = replace S2 with IO\npatch h = attn.hook_z heads all\nmetric ld = logit_diff normalized\n",
    );
    assert_eq!(diagnose(&src, &[]), "ok");
}

#[test]
fn syntax_errors_all_reported() {
    insta::assert_snapshot!(diagnose(
        "modle \"tiny\"\ndataset d {\n  template \"x\"\n  count many\n}\ncorruption c = replace S2 IO\n",
        &[]
    ));
}

#[test]
fn unknown_names_did_you_mean() {
    insta::assert_snapshot!(diagnose(
        &with_head("corruption s2 = replace S2 with IO\npatch h = attn.hook_z heads all\nmetric ld = logit_dif\nsweep { corruption: [s3] }\n"),
        &[]
    ));
}

#[test]
fn hook_not_in_manifest() {
    insta::assert_snapshot!(diagnose(
        &with_head("corruption s2 = replace S2 with IO\npatch h = hook_mlp_outt\nmetric p = prob\n"),
        &[]
    ));
}

#[test]
fn layer_and_head_out_of_range() {
    insta::assert_snapshot!(diagnose(
        &with_head("corruption s2 = replace S2 with IO\npatch h = attn.hook_z layers 0..5 heads [1, 4]\npatch k = attn.hook_k heads 3\nmetric p = prob\n"),
        &[]
    ));
}

#[test]
fn slot_not_in_template() {
    insta::assert_snapshot!(diagnose(
        &with_head(
            "corruption s2 = replace S3 with IO\npatch r = hook_resid_pre positions [S1, S4]\nmetric p = prob\n"
        ),
        &[]
    ));
}

#[test]
fn pool_too_small_for_distinct() {
    insta::assert_snapshot!(diagnose(
        r#"model "tiny"
dataset ioi {
  template "When{IO} and{S1} went to the store,{S2} gave a drink to"
  slot IO, S1, S2 from [" Mary", " John"] distinct
  answer IO
}
corruption n = noise on S2
patch r = hook_resid_pre
metric p = prob
"#,
        &[]
    ));
}

#[test]
fn str_changes_token_count() {
    insta::assert_snapshot!(diagnose(
        &with_head("corruption long = replace S2 with \" Christopher\"\npatch r = hook_resid_pre\nmetric p = prob\n"),
        &[]
    ));
}

#[test]
fn answer_not_single_token() {
    insta::assert_snapshot!(diagnose(
        r#"model "tiny"
dataset d {
  template "Then{A} said"
  slot A from [" Mary", " Bartholomew"]
  answer " Christopher"
}
corruption n = noise on A
patch r = hook_resid_pre
metric p = prob
"#,
        &[]
    ));
}

#[test]
fn missing_file_and_column() {
    insta::assert_snapshot!(diagnose(
        r#"model "tiny"
pool cities from "cities.txt"
dataset facts from "facts.csv" { prompt: prompt  answer: targte  counterfactual: corrupted }
corruption cf = counterfactual
patch r = hook_resid_pre
metric p = prob
"#,
        &[("facts.csv", "prompt,corrupted,target\nThe capital of France is,The capital of Italy is,Paris\n")]
    ));
}

#[test]
fn duplicate_definitions_across_include() {
    insta::assert_snapshot!(diagnose(
        &format!(
            "include \"shared.bay\"\n{}",
            with_head("corruption s2 = replace S2 with IO\npatch r = hook_resid_pre\nmetric p = prob\nmetric p = kl\n")
        ),
        &[(
            "shared.bay",
            "# shared definitions\npool names = [\" Alice\", \" Bob\"]\ncorruption broken = replace S9 with IO\n"
        )]
    ));
}

#[test]
fn expectation_on_metric_not_computed() {
    insta::assert_snapshot!(diagnose(
        &with_head(
            "corruption s2 = replace S2 with IO\npatch h = attn.hook_z heads all\nmetric ld = logit_diff\nmetric p = prob\nsweep { metric: [p] }\nexpect top 3 h by ld includes L1.H2\nexpect effect h L7.H0 by p > 0.1\n"
        ),
        &[]
    ));
}

#[test]
fn missing_model() {
    insta::assert_snapshot!(diagnose(&HEAD.replace("model \"tiny\"", "model \"no-such-model\" on gpu"), &[]));
}

#[test]
fn errors_in_included_file_point_into_it() {
    let out = diagnose(
        &format!("include \"lib.bay\"\n{HEAD}"),
        &[("lib.bay", "corruption c = replace S2 with IO\npatch p = hook_nope\n")],
    );
    assert!(out.contains("lib.bay:2"), "{out}");
}

/// Random and mutated inputs: `check` returns (Ok or diagnostics) and never panics.
#[test]
fn fuzz_check_never_panics() {
    const CASES: usize = 20_000;
    use rand::{Rng, SeedableRng};
    let ws = fixture::workspace();
    let seeds = [
        with_head("corruption s2 = replace S2 with IO\ncorruption g = noise on S2 samples 2\ncorruption z = mean ablation\npatch h = attn.hook_z layers 0..1 heads all positions [S1, end, -1]\npatch w = hook_mlp_out window [1, 2] with summation baseline\npatch j = {hook_attn_out, hook_mlp_out} layers 1 positions each\nmetric ld = logit_diff normalized per_prompt_mean\nmetric kl = kl\naverage ratio_of_means\nsweep { corruption: [s2, g, z] direction: [denoise, noise] }\nexpect detected h by ld beyond 2 sd includes L1.H2\nexpect effect w L1 by kl > 0.1 when window = 2\noutput \"r.csv\"\n"),
        "model \"tiny\"\ndataset g { template \"The war lasted from the year 17{Y}5 to the year 17\" slot Y from [\"2\", \"3\", \"4\"] answer set [\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\"] where > Y wrong set [\"1\",\"2\",\"3\",\"4\",\"5\"] where < Y }\ncorruption c = replace Y with \"1\"\npatch r = hook_resid_post\nmetric gt = prob_diff normalized\n".to_string(),
    ];
    let tokens = [
        "{",
        "}",
        "[",
        "]",
        ",",
        "=",
        "..",
        "@",
        "\"",
        "#",
        "\n",
        " ",
        "model",
        "dataset",
        "slot",
        "from",
        "patch",
        "layers",
        "heads",
        "positions",
        "window",
        "metric",
        "sweep",
        "expect",
        "L1.H2",
        "-1",
        "99999999999999999999",
        "S1",
        "end",
        "all",
        "each",
        "{S9}",
        "\u{e9}",
        "\u{1F600}",
        "\\",
        "\"\"",
        "0..0",
        "5..1",
        "include",
        "\"exp.bay\"",
        "set",
        "where",
        ">",
        "ablation",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    // A fixed number of cases from a fixed seed: the same coverage on every machine and load.
    for n in 0..CASES {
        let base = &seeds[n % seeds.len()];
        let mut s: Vec<char> = base.chars().collect();
        for _ in 0..rng.gen_range(1..6) {
            match rng.gen_range(0..4) {
                0 if !s.is_empty() => {
                    let i = rng.gen_range(0..s.len());
                    let j = (i + rng.gen_range(1..20)).min(s.len());
                    s.drain(i..j);
                }
                1 => {
                    let i = rng.gen_range(0..=s.len());
                    let t = tokens[rng.gen_range(0..tokens.len())];
                    for (k, c) in t.chars().enumerate() {
                        s.insert(i + k, c);
                    }
                }
                2 if !s.is_empty() => {
                    let i = rng.gen_range(0..s.len());
                    s[i] = char::from(rng.gen_range(32u8..127));
                }
                _ => {
                    let len = rng.gen_range(0..40);
                    s = (0..len).map(|_| char::from(rng.gen_range(9u8..127))).collect();
                }
            }
        }
        let text: String = s.into_iter().collect();
        let path = fixture::write(ws.path(), "fuzz.bay", &text);
        let result = std::panic::catch_unwind(|| {
            let r = check::check_file(&path, None);
            if let Err(d) = &r {
                for x in d {
                    let _ = x.render_plain();
                }
            }
            if let Ok(e) = &r {
                let _ = patchbay::plan::plan(e).to_string();
            }
        });
        assert!(result.is_ok(), "check panicked on case {n}, input:\n{text}");
    }
}

/// A JSONL line without a mapped key is a diagnostic, not a panic (lines need not share keys).
#[test]
fn jsonl_row_missing_key() {
    let out = diagnose(
        "model \"tiny\"\ndataset d from \"p.jsonl\" { prompt: prompt  counterfactual: cf  answer: answer }\ncorruption c = counterfactual\npatch r = hook_resid_pre\nmetric p = prob\n",
        &[(
            "p.jsonl",
            "{\"prompt\": \"The capital of France is\", \"cf\": \"The capital of Italy is\", \"answer\": \"Paris\"}\n{\"prompt\": \"The capital of Spain is\", \"answer\": \"Madrid\"}\n",
        )],
    );
    assert!(out.contains("row 2 of `p.jsonl` has no `cf`"), "{out}");
}

/// An empty pool is an error; the dataset is not silently dropped.
#[test]
fn empty_inline_pool() {
    let out = diagnose(
        "model \"tiny\"\ndataset d { template \"When{IO} and\" slot IO from [] answer IO }\ncorruption c = replace IO with \" John\"\npatch r = hook_resid_pre\nmetric p = prob\n",
        &[],
    );
    assert!(out.contains("the pool `[]` has no values"), "{out}");
}

/// A file dataset's `count` is range-checked like a template's.
#[test]
fn file_dataset_count_range() {
    let out = diagnose(
        "model \"tiny\"\ndataset d from \"p.csv\" { prompt: prompt  answer: answer  count 0 }\ncorruption c = zero ablation\npatch r = hook_resid_pre\nmetric p = prob\nsweep { direction: [noise] }\n",
        &[("p.csv", "prompt,answer\nThe capital of France is,Paris\n")],
    );
    assert!(out.contains("count must be between 1 and 100000"), "{out}");
}

/// Two syntax errors in one block are both reported; an error at a literal token (`=`) points
/// at it, not at the start of the statement.
#[test]
fn syntax_errors_in_one_block() {
    insta::assert_snapshot!(diagnose(
        "model \"tiny\"\ndataset d {\n  template \"When{IO} and\"\n  count many\n  slot IO from [\" Mary\" \" John\"]\n  answer IO\n}\ncorruption c\u{e9} = replace IO with \" John\"\n",
        &[]
    ));
}

/// An empty or comments-only file gets a located "no model" error with a `model` line as help.
#[test]
fn empty_file_names_no_model() {
    let empty = diagnose("", &[]);
    assert!(empty.contains("<ws>/exp.bay:1:1"), "{empty}");
    assert!(empty.contains("model \"smollm2-135m\""), "{empty}");
    insta::assert_snapshot!(diagnose("# only a comment\n\n# and another\n", &[]));
}

/// A cycle through several files shows the whole chain.
#[test]
fn include_cycle_shows_chain() {
    insta::assert_snapshot!(diagnose(
        &format!("include \"a.bay\"\n{HEAD}"),
        &[("a.bay", "include \"b.bay\"\n"), ("b.bay", "# back to a\ninclude \"a.bay\"\n")]
    ));
}

/// A file that includes itself still says so in the short form.
#[test]
fn include_self() {
    let out = diagnose(&format!("include \"exp.bay\"\n{HEAD}"), &[]);
    assert!(out.contains("include cycle: `exp.bay` includes itself"), "{out}");
}

/// Includes nested more than 16 deep: an error with help.
#[test]
fn include_depth_has_help() {
    let files: Vec<(String, String)> =
        (0..20).map(|i| (format!("f{i}.bay"), format!("include \"f{}.bay\"\n", i + 1))).collect();
    let extra: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let out = diagnose(&format!("include \"f0.bay\"\n{HEAD}"), &extra);
    assert!(out.contains("includes nested too deeply"), "{out}");
    assert!(out.contains("help: includes may nest at most 16 files deep"), "{out}");
}

/// A layer number that does not fit in 64 bits is "too large", not a clamped number.
#[test]
fn layer_number_too_large() {
    insta::assert_snapshot!(diagnose(
        &with_head(
            "corruption s2 = replace S2 with IO\npatch h = attn.hook_z layers 0..99999999999999999999 heads 99999999999999999999\nmetric p = prob\n"
        ),
        &[]
    ));
}

/// `{}` and `{IO and{S1}` are malformed placeholders, reported once each, without follow-on
/// "slot not in the template" errors.
#[test]
fn bad_template_placeholders() {
    insta::assert_snapshot!(diagnose(
        r#"model "tiny"
pool names = [" Mary", " John", " Tom"]
dataset a {
  template "When{IO} and{} went to the store"
  slot IO from names
  answer IO
}
dataset b {
  template "When{IO and{S1} went to the store,{S2} gave"
  slot IO, S1 from names distinct
  slot S2 = S1
  answer IO
}
corruption n = noise on IO
patch r = hook_resid_pre
metric p = prob
"#,
        &[]
    ));
}

/// Numbers: `1e400` is out of range (reported at the whole literal); `1e3` and `1.5` are not
/// integers.
#[test]
fn number_literals() {
    insta::assert_snapshot!(diagnose(
        &with_head("corruption g = noise on S2 scale 1e400\npatch r = hook_resid_pre\nmetric p = prob\n"),
        &[]
    ));
    let out = diagnose(&with_head("corruption g = noise on S2 samples 1e3\nbatch 1.5\n"), &[]);
    assert!(out.contains("`1e3` is not a whole number"), "{out}");
    assert!(out.contains("`1.5` is not a whole number"), "{out}");
    assert!(!out.contains("expected a statement"), "{out}");
    // Exponents are fine where a decimal number is expected.
    let ok = diagnose(
        &with_head("corruption g = noise on S2 scale 2.5e0\npatch r = hook_resid_pre\nmetric p = prob\n"),
        &[],
    );
    assert_eq!(ok, "ok");
}

/// `top k` with more than the patch's components is an error that says how many there are.
#[test]
fn top_k_exceeds_components() {
    insta::assert_snapshot!(diagnose(
        &with_head(
            "corruption s2 = replace S2 with IO\npatch h = attn.hook_z layers 1 heads 0..2\nmetric ld = logit_diff\nexpect top 4 h by ld includes L1.H2\nexpect top 3 h by ld includes L1.H2\n"
        ),
        &[]
    ));
}

/// Range errors (samples, scale, seed, top-k, threshold, batch, window, mixed hooks) all carry
/// help text.
#[test]
fn range_errors_have_help() {
    let ws = fixture::workspace();
    let src = with_head(
        "corruption g = noise on S2 scale 0 samples 0 seed -1\ncorruption r = resample S2 seed 99999999999999999999\npatch h = attn.hook_z heads all\npatch m = {hook_embed, hook_mlp_out}\npatch w = hook_mlp_out window [0]\nmetric ld = logit_diff\nbatch 0\nexpect top 0 h by ld includes L1.H2\nexpect detected h by ld beyond 0 sd includes L1.H2\n",
    )
    .replace("count 3 seed 1", "count 3 seed -2");
    let path = fixture::write(ws.path(), "exp.bay", &src);
    let Err(diags) = check::check_file(&path, None) else { panic!("expected errors") };
    let errors: Vec<_> = diags.iter().filter(|d| d.is_error()).collect();
    assert!(errors.len() >= 10, "{errors:#?}");
    for d in errors {
        assert!(d.span.is_some(), "no span: {}", d.render_plain());
        assert!(d.help.is_some(), "no help: {}", d.render_plain());
    }
}

/// An expectation's text (what `run` prints with its verdict) is its statement alone, without the
/// comments that follow it.
#[test]
fn expectation_text_leaves_out_comments() {
    let ws = fixture::workspace();
    let src = with_head(
        "corruption s2 = replace S2 with IO\npatch h = attn.hook_z heads all\nmetric ld = logit_diff\nexpect top 1 h by ld includes L1.H2 # why\n# the next finding\nexpect top 1 h by ld includes L1.H0\n",
    );
    let exp = check::check_file(&fixture::write(ws.path(), "exp.bay", &src), None).unwrap();
    let texts: Vec<&str> = exp.expectations.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, ["expect top 1 h by ld includes L1.H2", "expect top 1 h by ld includes L1.H0"]);
}

/// A report named neither `.html` nor `.md` is an error at `check`, not at the end of a run.
#[test]
fn report_extension() {
    let out = diagnose(
        &with_head(
            "corruption s2 = replace S2 with IO\npatch r = hook_resid_pre\nmetric p = prob\nreport \"out.txt\"\n",
        ),
        &[],
    );
    assert!(out.contains("cannot tell which report to write to `out.txt`"), "{out}");
    assert!(out.contains("patchbay::report_extension"), "{out}");
}

/// A pool whose definition failed (empty, or a missing file) does not also produce "unknown pool".
#[test]
fn broken_pool_no_cascade() {
    let src = "model \"tiny\"\npool names = []\npool more from \"missing.txt\"\ndataset d {\n  template \"When{IO} and{S1}\"\n  slot IO from names\n  slot S1 from more\n  answer set names\n}\ncorruption c = replace IO with \" John\"\npatch r = hook_resid_pre\nmetric p = prob\n";
    let out = diagnose(src, &[]);
    assert!(out.contains("the pool `[]` has no values"), "{out}");
    assert!(out.contains("cannot read `missing.txt`"), "{out}");
    assert!(!out.contains("unknown pool"), "{out}");
    assert!(!out.contains("no values to draw from"), "{out}");
}

/// A slot whose value covers no token is an error naming the prompt, never a prompt (or a whole
/// file dataset) dropped silently. The fixture tokenizer drops whitespace, so `" "` covers none.
#[test]
fn slot_covering_no_token() {
    let file = diagnose(
        r#"model "tiny"
dataset facts from "facts.csv" { prompt: prompt  answer: target  slot gap: gap }
corruption n = noise on gap
patch r = hook_resid_pre
metric p = prob
"#,
        &[("facts.csv", "prompt,gap,target\nThe capital of France is,\" \",Paris\n")],
    );
    assert!(file.contains("patchbay::slot_without_tokens"), "{file}");
    assert!(file.contains("row 1: slot `gap` (value ` `) covers no token"), "{file}");
    let template = diagnose(
        r#"model "tiny"
dataset d {
  template "Then{A} said{B}"
  slot A from [" Mary"]
  slot B from [" "]
  answer " Mary"
}
corruption n = noise on A
patch r = hook_resid_pre
metric p = prob
"#,
        &[],
    );
    assert!(template.contains("prompt 0: slot `B` (value ` `) covers no token"), "{template}");
}

/// An empty token set names the prompt it is empty for (not which answer it is).
#[test]
fn empty_token_set_names_the_prompt() {
    let out = diagnose(
        r#"model "tiny"
pool years = [" 1", " 2", " 3"]
dataset d {
  template "The war lasted from year{Y} to"
  slot Y from [" 3"]
  answer Y
  wrong set years where > Y
}
corruption n = noise on Y
patch r = hook_resid_pre
metric p = prob
"#,
        &[],
    );
    assert!(out.contains("the token set is empty for prompt 0 (no value >  3)"), "{out}");
}

/// A hand-edited manifest (a short hash, a hook with zero heads) is a clear error, not a panic.
#[test]
fn damaged_manifest_is_a_clear_error() {
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 2] = [
        ("source.sha256 `abc` is not 64 hexadecimal digits", |m| m["source"]["sha256"] = "abc".into()),
        ("hook `blocks.0.attn.hook_z` has a dimension of size 0", |m| {
            m["hooks"]["blocks.0.attn.hook_z"]["shape"][2] = 0.into()
        }),
    ];
    for (expected, edit) in edits {
        let ws = fixture::workspace();
        let path = ws.path().join("tiny/patchbay.json");
        let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut manifest);
        std::fs::write(&path, manifest.to_string()).unwrap();
        let exp =
            fixture::write(ws.path(), "exp.bay", &with_head("patch h = attn.hook_z heads all\nmetric p = prob\n"));
        let out = match check::check_file(&exp, None) {
            Ok(_) => "ok".to_string(),
            Err(d) => d.iter().map(|d| d.render_plain()).collect(),
        };
        // The renderer wraps long messages: compare words.
        let words = out.split_whitespace().filter(|w| *w != "|").collect::<Vec<_>>().join(" ");
        assert!(words.contains("is damaged") && words.contains(expected), "{out}");
    }
}

/// Every file the language reads must be a regular file of bounded size: `include "/dev/zero"`
/// used to read forever and exhaust memory.
#[test]
fn special_and_huge_files_are_refused() {
    let ws = fixture::workspace();
    let huge = ws.path().join("huge.txt");
    let file = std::fs::File::create(&huge).unwrap();
    file.set_len(patchbay::syntax::files::MAX_INPUT_BYTES + 1).unwrap();
    for (statement, expected) in [
        ("include \"/dev/zero\"", "is not a regular file"),
        ("pool p from \"/dev/zero\"", "is not a regular file"),
        ("dataset z from \"/dev/zero\" { prompt: p  answer: a }", "is not a regular file"),
        ("pool p from \"huge.txt\"", "is larger than 64 MiB"),
    ] {
        let path = fixture::write(ws.path(), "exp.bay", &format!("{}{statement}\n", with_head("metric p = prob\n")));
        let out = match check::check_file(&path, None) {
            Ok(_) => "ok".to_string(),
            Err(d) => d.iter().map(|d| d.render_plain()).collect(),
        };
        assert!(out.contains(expected), "{statement}: {out}");
    }
    let out = patchbay::syntax::parse_file(Path::new("/dev/zero")).unwrap_err();
    assert!(out[0].render_plain().contains("is not a regular file"));
}

/// `by attribution` and `verify top k`: `verify` needs an estimate and a positive count, and
/// `by atp*` is refused by name (AtP* is not implemented).
#[test]
fn attribution_options() {
    insta::assert_snapshot!(diagnose(
        &with_head(
            "corruption s2 = replace S2 with IO\npatch a = attn.hook_z layers 1 heads all by attribution verify top 0\npatch b = attn.hook_z layers 1 verify top 2\npatch d = hook_mlp_out by attribution verify top 99999999999999999999\nmetric ld = logit_diff\n"
        ),
        &[]
    ));
}
