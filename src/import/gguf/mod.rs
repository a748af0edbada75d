//! GGUF (llama.cpp's model format, versions 2 and 3): a validating reader over a memory map.
//! [`checkpoint`] presents a file through the canonical `Checkpoint` interface; [`config`] reads
//! the model configuration and [`tokenizer`] the vocabulary from its metadata.
//!
//! File layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count,
//! the metadata key/value pairs, the tensor infos (name, dims, type, offset), padding to the
//! alignment (`general.alignment`, default 32), then the tensor data; each tensor's offset is
//! relative to the start of the data and aligned.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use crate::bail_fixable;
use crate::import::quant;
use crate::model::checkpoint::Tensor;

pub mod checkpoint;
pub mod config;
pub mod tokenizer;

pub use checkpoint::GgufCheckpoint;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub(crate) const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; a crafted file must not recurse without bound.
const MAX_ARRAY_NESTING: usize = 8;

/// The type tag of a metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl MetaType {
    const ALL: [MetaType; 13] = [
        MetaType::U8,
        MetaType::I8,
        MetaType::U16,
        MetaType::I16,
        MetaType::U32,
        MetaType::I32,
        MetaType::F32,
        MetaType::Bool,
        MetaType::String,
        MetaType::Array,
        MetaType::U64,
        MetaType::I64,
        MetaType::F64,
    ];

    /// The id GGUF stores: the position in [`MetaType::ALL`].
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn id(self) -> u32 {
        MetaType::ALL.iter().position(|&t| t == self).unwrap() as u32
    }

    fn from_id(id: u32) -> Option<MetaType> {
        MetaType::ALL.get(id as usize).copied()
    }

    /// Fewest bytes one value of this type occupies, to reject absurd array lengths early.
    fn min_size(self) -> usize {
        match self {
            MetaType::U8 | MetaType::I8 | MetaType::Bool => 1,
            MetaType::U16 | MetaType::I16 => 2,
            MetaType::U32 | MetaType::I32 | MetaType::F32 => 4,
            MetaType::U64 | MetaType::I64 | MetaType::F64 | MetaType::String => 8,
            MetaType::Array => 12,
        }
    }
}

/// A metadata value. Arrays carry their element type so that empty arrays round-trip.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaType, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::String(_) => MetaType::String,
            MetaValue::Array(..) => MetaType::Array,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// Any non-negative integer value (writers disagree on u32 vs u64 vs i32).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value, signed.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric value as a float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> MetaValue {
        let items = items.into_iter().map(|s| MetaValue::String(s.as_ref().to_string()));
        MetaValue::Array(MetaType::String, items.collect())
    }

    /// An array of i32 (the type GGUF uses for `tokenizer.ggml.token_type`).
    pub fn i32s(items: impl IntoIterator<Item = i32>) -> MetaValue {
        MetaValue::Array(MetaType::I32, items.into_iter().map(MetaValue::I32).collect())
    }

    /// A short human description, for error messages.
    pub fn describe(&self) -> String {
        match self {
            MetaValue::String(s) => format!("string {s:?}"),
            MetaValue::Array(t, items) => format!("array of {} {t:?}", items.len()),
            v => format!("{v:?}"),
        }
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying axis (the row length).
    pub dims: Vec<u64>,
    /// ggml type id; see [`quant::type_name`].
    pub type_id: u32,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Size of the data; `None` for a type id this build of patchbay does not know.
    pub n_bytes: Option<u64>,
}

impl GgufTensorInfo {
    /// Row-major shape (the reverse of ggml's `ne`): `ne = [a, b]` is `[b, a]`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The parsed header of a GGUF file: everything but the tensor data.
#[derive(Debug, Clone)]
pub struct GgufLayout {
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset where tensor data begins.
    pub data_offset: u64,
    /// Key/value pairs in file order.
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<GgufTensorInfo>,
}

/// Bounds-checked little-endian cursor; every error says what was being read and where.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!(
                "GGUF file is truncated: {what} at offset {} needs {n} bytes, but the file is {} bytes long",
                self.pos,
                self.bytes.len()
            );
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().unwrap())
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in the rest of the file at `min_size` bytes per item.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > (self.remaining() / min_size.max(1)) as u64 {
            bail!(
                "GGUF file is truncated or corrupt: {what} at offset {at} is {n}, more than the remaining {} bytes can hold",
                self.remaining()
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.count(&format!("length of {what}"), 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow::anyhow!("GGUF file is corrupt: {what} at offset {at} is not valid UTF-8"))
    }

    fn value(&mut self, ty: MetaType, key: &str, depth: usize) -> Result<MetaValue> {
        let what = &format!("value of `{key}`");
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            MetaType::I8 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            MetaType::U32 => MetaValue::U32(self.u32(what)?),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            MetaType::U64 => MetaValue::U64(self.u64(what)?),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            MetaType::Bool => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        bail!("GGUF file is corrupt: {what} at offset {at} is a bool with byte {b}")
                    }
                }
            }
            MetaType::String => MetaValue::String(self.string(what)?),
            MetaType::Array => {
                let at = self.pos;
                if depth >= MAX_ARRAY_NESTING {
                    bail!(
                        "GGUF file is corrupt: {what} at offset {at} nests arrays more than {MAX_ARRAY_NESTING} deep"
                    );
                }
                let elem = self.meta_type(&format!("element type of {what}"))?;
                let n = self.count(&format!("length of {what}"), elem.min_size())?;
                // Capacity grows with what is really there, not with what the count claims.
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(elem, items)
            }
        })
    }

    fn meta_type(&mut self, what: &str) -> Result<MetaType> {
        let at = self.pos;
        let id = self.u32(what)?;
        MetaType::from_id(id).ok_or_else(|| {
            anyhow::anyhow!("GGUF file is corrupt: {what} at offset {at} is {id}, not a GGUF value type")
        })
    }
}

/// Parse and validate the header of a GGUF file held in `bytes` (the whole file).
pub fn parse(bytes: &[u8]) -> Result<GgufLayout> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != MAGIC {
        bail!("not a GGUF file: it starts with {magic:02x?}, GGUF files start with \"GGUF\"");
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => bail_fixable!(
            "GGUF version 1 is not supported (only 2 and 3)";
            help: "re-convert the model with a current llama.cpp"
        ),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            bail!("this GGUF file is big-endian; patchbay reads little-endian GGUF only")
        }
        v => bail!("GGUF version {v} is not supported (only 2 and 3)"),
    }
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata count", 13)?;

    let mut metadata: Vec<(String, MetaValue)> = Vec::new();
    let mut seen = HashMap::new();
    for i in 0..n_kv {
        let at = c.pos;
        let key = c.string(&format!("metadata key #{i}"))?;
        if seen.insert(key.clone(), at).is_some() {
            bail!("GGUF file is corrupt: metadata key `{key}` appears twice (again at offset {at})");
        }
        let ty = c.meta_type(&format!("type of `{key}`"))?;
        let value = c.value(ty, &key, 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v {
            MetaValue::U32(a) if a.is_power_of_two() => *a as u64,
            v => bail!("GGUF file is corrupt: general.alignment is {}, expected a u32 power of two", v.describe()),
        },
    };

    let mut infos = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor #{i}"))?;
        let at = c.pos;
        let n_dims = c.u32(&format!("dimension count of tensor {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("GGUF file is corrupt: tensor {name} has {n_dims} dimensions (offset {at}); ggml allows 1 to {MAX_DIMS}");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&format!("dimensions of tensor {name}"))?);
        }
        let type_id = c.u32(&format!("type of tensor {name}"))?;
        let offset = c.u64(&format!("data offset of tensor {name}"))?;
        infos.push((name, dims, type_id, offset, at));
    }
    let data_offset = (c.pos as u64).next_multiple_of(alignment);

    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(infos.len());
    let mut names = HashSet::new();
    for (name, dims, type_id, rel, at) in infos {
        if !names.insert(name.clone()) {
            bail!("GGUF file is corrupt: tensor {name} is listed twice");
        }
        let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let Some(n_elements) = n_elements.filter(|&n| n < 1 << 50) else {
            bail!("GGUF file is corrupt: tensor {name} has absurd dimensions {dims:?} (offset {at})");
        };
        if !rel.is_multiple_of(alignment) {
            bail!("GGUF file is corrupt: tensor {name} has data offset {rel}, not a multiple of the alignment {alignment}");
        }
        let offset = data_offset
            .checked_add(rel)
            .filter(|&o| o <= bytes.len() as u64)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "GGUF file is truncated or corrupt: tensor {name} starts at offset {data_offset} + {rel}, past the end of the {}-byte file",
                    bytes.len()
                )
            })?;
        let n_bytes = match quant::block_geometry(type_id) {
            None => None,
            Some((block, size)) => {
                if !dims[0].is_multiple_of(block as u64) {
                    bail!(
                        "GGUF file is corrupt: tensor {name} has rows of {} elements, not a whole number of {} blocks ({block} elements)",
                        dims[0],
                        quant::type_name(type_id)
                    );
                }
                let n_bytes = n_elements / block as u64 * size as u64;
                if offset + n_bytes > bytes.len() as u64 {
                    bail!(
                        "GGUF file is truncated: tensor {name} ({}, {dims:?}) occupies bytes {offset}..{} but the file is {} bytes long",
                        quant::type_name(type_id),
                        offset + n_bytes,
                        bytes.len()
                    );
                }
                Some(n_bytes)
            }
        };
        tensors.push(GgufTensorInfo { name, dims, type_id, offset, n_bytes });
    }
    Ok(GgufLayout { version, alignment, data_offset, metadata, tensors })
}

/// A GGUF file opened for reading: its validated header plus a memory map of the data.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    layout: GgufLayout,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; like every mmap reader we assume nobody truncates the
        // file underneath us while it is open.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let layout = parse(&mmap).with_context(|| format!("cannot read GGUF file {}", path.display()))?;
        let meta_index = layout.metadata.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
        let tensor_index = layout.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile { path: path.to_path_buf(), mmap, layout, meta_index, tensor_index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> &GgufLayout {
        &self.layout
    }

    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.layout.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.layout.metadata[i].1)
    }

    /// A string value, or an error naming the key (and what was there instead).
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                Some(s) => Ok(Some(s)),
                None => bail!("GGUF metadata `{key}` is {}, expected a string", v.describe()),
            },
        }
    }

    /// A non-negative integer value, or an error naming the key.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n)),
                None => bail!("GGUF metadata `{key}` is {}, expected a non-negative integer", v.describe()),
            },
        }
    }

    /// A numeric value as f64, or an error naming the key.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(n) => Ok(Some(n)),
                None => bail!("GGUF metadata `{key}` is {}, expected a number", v.describe()),
            },
        }
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.layout.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.layout.tensors[i])
    }

    /// The tensor `name` decoded to f32 in row-major shape; `Ok(None)` when the file has no such
    /// tensor, an error when its type cannot be imported.
    pub fn read_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(info) = self.tensor_info(name) else {
            return Ok(None);
        };
        let ty = quant::supported_type(name, info.type_id)?;
        // Sizes were validated against the file length in `parse`.
        let n_bytes = info.n_bytes.expect("supported types have known sizes") as usize;
        let start = info.offset as usize;
        let data = quant::dequantize(ty, &self.mmap[start..start + n_bytes], info.n_elements() as usize)
            .with_context(|| format!("cannot decode tensor {name}"))?;
        Ok(Some(Tensor::new(info.shape(), data)))
    }
}

#[cfg(test)]
mod tests;
