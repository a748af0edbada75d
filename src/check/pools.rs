//! Pools: lists of values for template slots and token sets, inline or read from a file.

use std::collections::BTreeMap;

use super::checker::{Checker, PoolValues};
use super::error::CheckError;
use crate::diag::Diagnostic;
use crate::syntax::ast::{self, PoolRef, PoolSource};

impl Checker<'_> {
    /// Define and load the top-level pools, in order (a pool defined twice is reported here).
    pub fn pools(&mut self) {
        for p in &self.defs.pools {
            if let Some(prev) = self.pools.get(&p.name.node) {
                self.errors.push(CheckError::duplicate("pool", &p.name.node, &prev.span).at(&p.name.span));
                continue;
            }
            // A broken pool stays defined with no values (see `resolve_pool`).
            let v =
                load_pool(p, &mut self.errors).unwrap_or(PoolValues { values: Vec::new(), span: p.name.span.clone() });
            self.pools.insert(p.name.node.clone(), v);
        }
    }
}

/// Load a pool definition (inline list, or a file with one value per line).
pub fn load_pool(pool: &ast::Pool, errors: &mut Vec<Diagnostic>) -> Option<PoolValues> {
    match &pool.source {
        PoolSource::Inline(v) => {
            if v.is_empty() {
                errors.push(CheckError::EmptyPool.at(&pool.name.span));
                return None;
            }
            Some(PoolValues { values: v.iter().map(|s| s.node.clone()).collect(), span: pool.name.span.clone() })
        }
        PoolSource::File(f) => {
            let path = f.span.file.dir().join(&f.node);
            match crate::syntax::files::read_text(&path) {
                Ok(text) => {
                    let values: Vec<String> = text
                        .lines()
                        .map(|l| l.trim_end_matches('\r').to_string())
                        .filter(|l| !l.trim().is_empty())
                        .collect();
                    if values.is_empty() {
                        errors.push(CheckError::EmptyPoolFile { file: f.node.clone(), path }.at(&f.span));
                        return None;
                    }
                    Some(PoolValues { values, span: pool.name.span.clone() })
                }
                Err(e) => {
                    errors.push(CheckError::missing_file(&f.node, &path, &e).at(&f.span));
                    None
                }
            }
        }
    }
}

/// The values of a pool named or written inline: None when it is unknown or empty (reported,
/// here or at its definition).
pub fn resolve_pool(
    r: &PoolRef,
    local: &BTreeMap<String, PoolValues>,
    global: &BTreeMap<String, PoolValues>,
    errors: &mut Vec<Diagnostic>,
) -> Option<PoolValues> {
    match r {
        PoolRef::Inline(l) => {
            if l.node.is_empty() {
                errors.push(CheckError::EmptyPool.at(&l.span));
                return None;
            }
            Some(PoolValues { values: l.node.iter().map(|s| s.node.clone()).collect(), span: l.span.clone() })
        }
        PoolRef::Named(n) => {
            if let Some(p) = local.get(&n.node).or_else(|| global.get(&n.node)) {
                // No values: the pool's definition failed and was reported there.
                return (!p.values.is_empty()).then(|| p.clone());
            }
            let names = local.keys().chain(global.keys()).map(|s| s.as_str());
            errors.push(CheckError::unknown("pool", &n.node, names).at(&n.span));
            None
        }
    }
}
