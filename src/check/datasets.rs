//! Datasets: expanded from a template (`templates.rs`) or read from a prompt file
//! (`dataset_files.rs`), tokenised, their answers resolved.

use super::checker::Checker;
use super::dataset_files::build_file_dataset;
use super::error::CheckError;
use super::templates::build_template_dataset;

impl Checker<'_> {
    /// Build every dataset (its prompts, when the model's tokenizer is known).
    pub fn datasets(&mut self) {
        for d in &self.defs.datasets {
            let built = match &d.file {
                Some(f) => build_file_dataset(d, f, self.tok.as_ref(), &mut self.errors),
                None => build_template_dataset(d, &self.pools, self.tok.as_ref(), &mut self.errors),
            };
            self.datasets.extend(built);
        }
        if self.defs.datasets.is_empty() {
            if let Some(start) = self.file_start() {
                self.errors.push(CheckError::NoDataset.at(&start));
            }
        }
    }
}
