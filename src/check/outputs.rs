//! How the experiment runs and where its results go: `batch`, `output`, `per_prompt`, `report`.

use super::checker::Checker;
use super::error::CheckError;
use crate::ir::experiment::{Outputs, ReportKind};

impl Checker<'_> {
    /// The batch size, and the output paths (relative to the file that names them).
    pub fn outputs(&mut self) {
        self.batch_size = match self.defs.batch {
            Some(b) if !(1..=4096).contains(&b.node) => {
                self.errors.push(CheckError::BatchOutOfRange.at(&b.span));
                None
            }
            Some(b) => Some(b.node as usize),
            None => None,
        };
        if let Some(report) = self.defs.outputs[2] {
            if ReportKind::of(std::path::Path::new(&report.node)).is_none() {
                self.errors.push(CheckError::ReportExtension { file: report.node.to_string() }.at(&report.span));
            }
        }
        let out = |i: usize| self.defs.outputs[i].map(|s| s.span.file.dir().join(&s.node));
        self.outputs = Outputs { csv: out(0), per_prompt: out(1), report: out(2) };
    }
}
