//! The model: its directory, manifest and tokenizer (the model itself is never run).

use super::checker::Checker;
use super::error::CheckError;
use super::tok::Tok;
use crate::diag::Span;
use crate::ir::experiment::{Device, Model};
use crate::model::{Manifest, TOKENIZER_FILE};

impl Checker<'_> {
    /// Resolve the `model` statement: its device, directory, manifest and tokenizer.
    pub fn model(&mut self, device_override: Option<Device>) {
        let Some((reference, device, _)) = self.defs.model else {
            let empty = self.ast.statements.is_empty();
            let error = CheckError::NoModel { path: self.path.display().to_string(), empty };
            // Point at the start of the experiment file, even when it is empty or all comments.
            let file = self.ast.statements.iter().find(|s| !s.included).map(|st| st.span.file.clone());
            let span = file.or(self.ast.root.clone()).map(|file| Span::new(&file, 0..0));
            self.errors.push(error.diagnostic(span.as_ref()));
            return;
        };
        let mut dev = Device::Cpu;
        if let Some(d) = device {
            match d.node.parse::<Device>().ok() {
                Some(x) => dev = x,
                None => self.errors.push(CheckError::UnknownDevice { name: d.node.clone() }.at(&d.span)),
            }
        }
        if let Some(o) = device_override {
            dev = o;
        }
        let dir = crate::cache::resolve_model(&reference.node, &reference.span.file.dir());
        if !dir.is_dir() {
            let error = CheckError::MissingModel { reference: reference.node.clone(), dir };
            self.errors.push(error.at(&reference.span));
            return;
        }
        let manifest = match Manifest::load(&dir) {
            Ok(manifest) => manifest,
            Err(e) => {
                self.errors.push(CheckError::BadManifest { error: e.to_string() }.at(&reference.span));
                return;
            }
        };
        match tokenizers::Tokenizer::from_file(dir.join(TOKENIZER_FILE)) {
            Err(e) => self.errors.push(CheckError::BadTokenizer { error: e.to_string() }.at(&reference.span)),
            Ok(t) => {
                self.model = Some(Model { reference: reference.node.clone(), dir, manifest, device: dev });
                self.tok = Some(Tok::new(t));
            }
        }
    }
}
