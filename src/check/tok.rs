//! The model's tokenizer, as the checker uses it.

use tokenizers::Tokenizer;

pub struct Tok {
    inner: Tokenizer,
}

/// A tokenised text: ids, byte offsets into the text, display forms.
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
    pub tokens: Vec<String>,
}

impl Encoded {
    /// The inclusive token indices covering the bytes `start..end` of the text (None: no token).
    pub fn token_span(&self, start: usize, end: usize) -> Option<(usize, usize)> {
        let hits: Vec<usize> = self
            .offsets
            .iter()
            .enumerate()
            .filter(|(_, (s, e))| e > s && *s < end && *e > start)
            .map(|(i, _)| i)
            .collect();
        Some((*hits.first()?, *hits.last()?))
    }
}

impl Tok {
    pub fn new(inner: Tokenizer) -> Tok {
        Tok { inner }
    }

    /// Tokenise a prompt the way the engine will (with the tokenizer's own special tokens).
    pub fn encode(&self, text: &str) -> Encoded {
        match self.inner.encode(text, true) {
            Ok(enc) => {
                let ids = enc.get_ids().to_vec();
                let tokens = ids.iter().map(|&i| self.show(i)).collect();
                Encoded { ids, offsets: enc.get_offsets().to_vec(), tokens }
            }
            Err(_) => Encoded { ids: Vec::new(), offsets: Vec::new(), tokens: Vec::new() },
        }
    }

    /// Tokenise an answer (no special tokens).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        self.inner.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }

    /// The text of one token (byte-level tokens decoded; spaces kept).
    pub fn show(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(s) if !s.is_empty() => s,
            _ => self.inner.id_to_token(id).unwrap_or_else(|| format!("<{id}>")),
        }
    }

    /// `[When][ Mary][ and]`.
    pub fn bracketed(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| format!("[{}]", self.show(i))).collect()
    }
}
