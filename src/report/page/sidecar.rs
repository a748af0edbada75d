//! The provenance sidecar read back: the facts the report lists, the token text of each patched
//! position, and the expectations' verdicts. Sidecars written before the last two existed
//! still load; the report then shows labels without tokens and no expectations.

use std::collections::HashMap;

use anyhow::Result;
use serde::Deserialize;

use crate::fixable;
use crate::report::agreement::Agreement;

/// What the report takes from a sidecar.
#[derive(Debug, Clone, Default)]
pub struct Sidecar {
    /// Per variant: position label -> (token index, token text) in the variant's first prompt.
    pub positions: HashMap<String, Vec<PositionToken>>,
    pub expectations: Vec<Verdict>,
    /// Attribution estimates against exact values (see [`crate::report::agreement`]).
    pub agreements: Vec<Agreement>,
    /// Every other field, flattened to `path: value` lines (`model.manifest_sha256: ...`).
    pub facts: Vec<(String, String)>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PositionToken {
    pub label: String,
    pub index: usize,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Verdict {
    pub line: usize,
    pub text: String,
    pub holds: bool,
    #[serde(default)]
    pub details: Vec<String>,
}

#[derive(Deserialize)]
struct Known {
    #[serde(default)]
    positions: HashMap<String, Vec<PositionToken>>,
    #[serde(default)]
    expectations: Vec<Verdict>,
    #[serde(default)]
    attribution_agreement: Vec<Agreement>,
}

impl Sidecar {
    /// Parse a sidecar (`name` says which file in errors).
    pub fn parse(bytes: &[u8], name: &str) -> Result<Sidecar> {
        let bad = |e: serde_json::Error| {
            fixable!(
                "{name} is not a patchbay provenance sidecar: {e}";
                help: "rerun `patchbay run` to write it afresh, or move it away to report without provenance"
            )
        };
        let json: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
        let known: Known = serde_json::from_value(json.clone()).map_err(bad)?;
        let mut facts = vec![];
        if let serde_json::Value::Object(map) = &json {
            let shown_apart = ["positions", "expectations", "attribution_agreement"];
            for (key, value) in map.iter().filter(|(k, _)| !shown_apart.contains(&k.as_str())) {
                flatten(key, value, &mut facts);
            }
        }
        Ok(Sidecar {
            positions: known.positions,
            expectations: known.expectations,
            agreements: known.attribution_agreement,
            facts,
        })
    }

    /// The token text at a position label in a variant, when the sidecar has it.
    pub fn token(&self, variant: &str, label: &str) -> Option<&str> {
        self.positions.get(variant)?.iter().find(|p| p.label == label)?.token.as_deref()
    }
}

fn flatten(path: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                flatten(&format!("{path}.{key}"), v, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{path}[{i}]"), v, out);
            }
        }
        serde_json::Value::String(s) => out.push((path.to_string(), s.clone())),
        serde_json::Value::Null => out.push((path.to_string(), "-".into())),
        other => out.push((path.to_string(), other.to_string())),
    }
}
