//! GGUF (llama.cpp's model format, versions 2 and 3): a validating reader over a memory map, a
//! writer, and [`GgufCheckpoint`], which presents a GGUF file through the canonical
//! [`Checkpoint`] interface.
//!
//! File layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count,
//! the metadata key/value pairs, the tensor infos (name, dims, type, offset), padding to the
//! alignment (`general.alignment`, default 32), then the tensor data; each tensor's offset is
//! relative to the start of the data and aligned.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use crate::import::checkpoint::{Checkpoint, Tensor};
use crate::import::gguf_config::{config_from, Family, ROPE_FREQS};
use crate::import::gguf_tokenizer;
use crate::import::quant::{self, GgmlType};
use crate::model::{Architecture, ModelConfig};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
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
    fn id(self) -> u32 {
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
        1 => bail!(
            "GGUF version 1 is not supported (only 2 and 3)\n  help: re-convert the model with a current llama.cpp"
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

/// A tensor to write: row-major `shape` (as in [`Tensor`]) and its encoded bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

impl GgufTensorData {
    /// Encode an f32 tensor as `ty` (see [`quant::quantize`] for the types offered).
    pub fn encode(name: &str, tensor: &Tensor, ty: GgmlType) -> Result<GgufTensorData> {
        let row = tensor.shape.last().copied().unwrap_or(1);
        if !row.is_multiple_of(ty.block_size()) {
            bail!("tensor {name} has rows of {row} elements, not a whole number of {ty} blocks");
        }
        let data = quant::quantize(ty, &tensor.data).with_context(|| format!("cannot encode tensor {name}"))?;
        Ok(GgufTensorData { name: name.to_string(), shape: tensor.shape.clone(), ty, data })
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[*x as u8]),
        MetaValue::String(s) => write_str(w, s),
        MetaValue::Array(ty, items) => {
            w.write_all(&ty.id().to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, item))
        }
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Write a GGUF v3 file. The alignment is `general.alignment` when `metadata` sets it, else 32.
pub fn write_gguf(path: &Path, metadata: &[(String, MetaValue)], tensors: &[GgufTensorData]) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    write_gguf_to(&mut w, metadata, tensors)?;
    w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// [`write_gguf`] into any writer.
pub fn write_gguf_to(w: &mut impl Write, metadata: &[(String, MetaValue)], tensors: &[GgufTensorData]) -> Result<()> {
    for (key, value) in metadata {
        if let MetaValue::Array(ty, items) = value {
            if let Some(bad) = items.iter().find(|i| i.meta_type() != *ty) {
                bail!("metadata `{key}` is an array of {ty:?} holding a {:?}", bad.meta_type());
            }
        }
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => *a as u64,
        Some(_) => bail!("general.alignment must be a u32 power of two"),
    };
    for t in tensors {
        let n: usize = t.shape.iter().product();
        if t.shape.is_empty() || t.shape.len() > MAX_DIMS as usize || t.ty.n_bytes(n) != Some(t.data.len()) {
            bail!(
                "tensor {} ({}, shape {:?}) has {} bytes of data, which does not fit",
                t.name,
                t.ty,
                t.shape,
                t.data.len()
            );
        }
    }

    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_str(&mut header, key)?;
        header.extend_from_slice(&value.meta_type().id().to_le_bytes());
        write_value(&mut header, value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(&mut header, &t.name)?;
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
    }
    let pad = |len: u64| vec![0u8; (len.next_multiple_of(alignment) - len) as usize];
    header.extend(pad(header.len() as u64));
    w.write_all(&header)?;
    for t in tensors {
        w.write_all(&t.data)?;
        w.write_all(&pad(t.data.len() as u64))?;
    }
    Ok(())
}

/// Where a canonical tensor lives in a GGUF file.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Plain(String),
    /// Rows of llama's Q (`n_heads`) or K (`n_kv_heads`) projection, stored RoPE-interleaved.
    Permuted(String, usize),
    /// Part `i` (0 = Q, 1 = K, 2 = V) of a fused `attn_qkv` tensor.
    Fused(String, usize),
}

/// Map a canonical name (see `checkpoint.rs`) to its GGUF source; `None` for an unknown name.
fn source(name: &str, config: &ModelConfig, family: Family) -> Option<Source> {
    let plain = |s: &str| Some(Source::Plain(s.to_string()));
    match name {
        "embed.W_E" => return plain("token_embd.weight"),
        "pos_embed.W_pos" => return plain("position_embd.weight"),
        "ln_final.w" => return plain("output_norm.weight"),
        "ln_final.b" => return plain("output_norm.bias"),
        "unembed.W_U" if config.tied_embeddings => return plain("token_embd.weight"),
        "unembed.W_U" => return plain("output.weight"),
        _ => {}
    }
    let rest = name.strip_prefix("blocks.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let blk = |s: &str| format!("blk.{layer}.{s}");
    let (gguf, qkv_part) = match part {
        "ln1.w" => ("attn_norm.weight", None),
        "ln1.b" => ("attn_norm.bias", None),
        "ln2.w" => ("ffn_norm.weight", None),
        "ln2.b" => ("ffn_norm.bias", None),
        "attn.W_Q" => ("attn_q.weight", Some(0)),
        "attn.W_K" => ("attn_k.weight", Some(1)),
        "attn.W_V" => ("attn_v.weight", Some(2)),
        "attn.b_Q" => ("attn_q.bias", Some(0)),
        "attn.b_K" => ("attn_k.bias", Some(1)),
        "attn.b_V" => ("attn_v.bias", Some(2)),
        "attn.W_O" => ("attn_output.weight", None),
        "attn.b_O" => ("attn_output.bias", None),
        "mlp.W_gate" => ("ffn_gate.weight", None),
        "mlp.W_in" => ("ffn_up.weight", None),
        "mlp.W_out" => ("ffn_down.weight", None),
        "mlp.b_in" => ("ffn_up.bias", None),
        "mlp.b_out" => ("ffn_down.bias", None),
        _ => return None,
    };
    Some(match qkv_part {
        // GPT-2 stores Q, K and V as one fused tensor.
        Some(i) if family == Family::Gpt2 => {
            let suffix = if gguf.ends_with("bias") { "bias" } else { "weight" };
            Source::Fused(blk(&format!("attn_qkv.{suffix}")), i)
        }
        Some(0) if family == Family::LlamaPermuted => Source::Permuted(blk(gguf), config.n_heads),
        Some(1) if family == Family::LlamaPermuted => Source::Permuted(blk(gguf), config.n_kv_heads),
        _ => Source::Plain(blk(gguf)),
    })
}

/// llama.cpp's converter permutation for interleaved RoPE, on the rows of `data` (rows of
/// `row_len` values, `n_heads` heads): `w.reshape(n_heads, 2, d_head/2, row).swapaxes(1, 2)`.
/// Within a head, HF row `s*half + i` (`s` = first or second half) becomes GGUF row `2*i + s`.
pub fn permute_rope_rows(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    rope_rows(data, n_heads, row_len, true)
}

/// The inverse of [`permute_rope_rows`]: GGUF (interleaved) row order back to HF rotate-half.
pub fn unpermute_rope_rows(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    rope_rows(data, n_heads, row_len, false)
}

fn rope_rows(data: &[f32], n_heads: usize, row_len: usize, to_gguf: bool) -> Vec<f32> {
    let n_rows = data.len() / row_len;
    let half = n_rows / n_heads / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * 2 * half + s * half + i;
                let gguf = h * 2 * half + 2 * i + s;
                let (from, to) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[to * row_len..(to + 1) * row_len].copy_from_slice(&data[from * row_len..(from + 1) * row_len]);
            }
        }
    }
    out
}

/// A GGUF file seen through the canonical [`Checkpoint`] interface.
pub struct GgufCheckpoint {
    file: GgufFile,
    config: ModelConfig,
    family: Family,
    /// GGUF names of the tensors read so far (the RoPE factors are read by [`config_from`]).
    used: Mutex<BTreeSet<String>>,
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<GgufCheckpoint> {
        let file = GgufFile::open(path)?;
        let (config, family) = config_from(&file).with_context(|| format!("cannot import {}", path.display()))?;
        let used = Mutex::new([ROPE_FREQS.to_string()].into());
        Ok(GgufCheckpoint { file, config, family, used })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn load(&self, canonical: &str) -> Result<Option<Tensor>> {
        let Some(src) = source(canonical, &self.config, self.family) else {
            bail!("`{canonical}` is not a canonical tensor name");
        };
        let (gguf, t) = match &src {
            Source::Plain(g) | Source::Permuted(g, _) | Source::Fused(g, _) => (g, self.file.read_tensor(g)?),
        };
        self.used.lock().expect("not poisoned").insert(gguf.clone());
        let Some(t) = t else { return Ok(None) };
        let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
        let n_rows = t.data.len() / row_len;
        Ok(Some(match src {
            Source::Plain(_) => t,
            Source::Permuted(_, n_heads) => {
                if !n_rows.is_multiple_of(2 * n_heads) {
                    bail!("GGUF tensor {gguf} has {n_rows} rows, not an even number per head for {n_heads} heads");
                }
                Tensor::new(t.shape.clone(), unpermute_rope_rows(&t.data, n_heads, row_len))
            }
            Source::Fused(_, part) => {
                let c = &self.config;
                let sizes = [c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head];
                if n_rows != sizes.iter().sum::<usize>() {
                    bail!(
                        "GGUF tensor {gguf} has {n_rows} rows, expected {} (Q, K and V rows)",
                        sizes.iter().sum::<usize>()
                    );
                }
                let start: usize = sizes[..part].iter().sum();
                let data = t.data[start * row_len..(start + sizes[part]) * row_len].to_vec();
                let mut shape = t.shape.clone();
                shape[0] = sizes[part];
                Tensor::new(shape, data)
            }
        }))
    }
}

impl Checkpoint for GgufCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        self.load(name).with_context(|| format!("cannot load `{name}` from {}", self.file.path().display()))
    }

    fn format(&self) -> &'static str {
        "gguf"
    }

    fn unused_tensors(&self) -> Vec<String> {
        let used = self.used.lock().expect("not poisoned");
        self.file.tensors().iter().map(|t| t.name.clone()).filter(|n| !used.contains(n)).collect()
    }

    fn tokenizer_json(&self) -> Result<String> {
        gguf_tokenizer::tokenizer_json(&self.file)
            .with_context(|| format!("cannot build a tokenizer from {}", self.file.path().display()))
    }
}

/// Which ggml types [`canonical_to_gguf`] stores. Vectors (norms, biases) are always F32, and a
/// matrix whose rows are not a whole number of blocks falls back to F32, as llama.cpp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufTypes {
    /// Token (and position) embeddings.
    pub embed: GgmlType,
    /// All other matrices.
    pub matrices: GgmlType,
}

impl GgufTypes {
    /// Everything F32: reading back gives exactly the tensors written.
    pub const EXACT: GgufTypes = GgufTypes { embed: GgmlType::F32, matrices: GgmlType::F32 };
}

impl Default for GgufTypes {
    /// Like real quantised checkpoints: a Q8_0 embedding, Q4_1 weights.
    fn default() -> GgufTypes {
        GgufTypes { embed: GgmlType::Q8_0, matrices: GgmlType::Q4_1 }
    }
}

/// Write canonical weights as a GGUF file that [`GgufCheckpoint`] reads back to the same
/// canonical tensors (up to the quantisation `types` asks for).
///
/// - `tensors`: canonical names and shapes as documented in `checkpoint.rs`, f32 `[out, in]`,
///   Q/K rows in HF rotate-half order. Every tensor the architecture requires must be present;
///   optional biases may be; `unembed.W_U` is ignored when `config.tied_embeddings`. Unknown
///   names are an error (they would be silently dropped otherwise).
/// - `vocab`: token strings by id, `config.vocab_size` of them. With empty `merges` this is a
///   word-level vocabulary (must contain `<unk>`), written under our own
///   `tokenizer.ggml.model = "patchbay-word"`; with merges it is a GPT-2 byte-level BPE
///   vocabulary (`"a b"` merge strings).
///
/// llama Q/K rows are permuted to llama.cpp's interleaved order; GPT-2's Q, K and V are fused
/// into `attn_qkv`.
pub fn canonical_to_gguf(
    path: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    vocab: &[String],
    merges: &[String],
    types: GgufTypes,
) -> Result<()> {
    let c = config;
    if vocab.len() != c.vocab_size {
        bail!("vocabulary has {} tokens but the config says vocab_size {}", vocab.len(), c.vocab_size);
    }
    if c.architecture == Architecture::Llama && !c.d_head.is_multiple_of(2) {
        bail!("d_head {} must be even for rotary embeddings", c.d_head);
    }
    let family = match c.architecture {
        Architecture::Llama => Family::LlamaPermuted,
        Architecture::Gpt2 => Family::Gpt2,
    };
    let arch = c.architecture.name();

    // Every canonical name this architecture can have, with its shape.
    let (q, kv) = (c.n_heads * c.d_head, c.n_kv_heads * c.d_head);
    let gpt2 = c.architecture == Architecture::Gpt2;
    let mut expected: Vec<(String, Vec<usize>, bool)> = vec![
        ("embed.W_E".into(), vec![c.vocab_size, c.d_model], true),
        ("ln_final.w".into(), vec![c.d_model], true),
        ("ln_final.b".into(), vec![c.d_model], gpt2),
        ("unembed.W_U".into(), vec![c.vocab_size, c.d_model], !c.tied_embeddings),
    ];
    if gpt2 {
        expected.push(("pos_embed.W_pos".into(), vec![c.n_ctx, c.d_model], true));
    }
    for l in 0..c.n_layers {
        let mut add =
            |n: &str, shape: Vec<usize>, required: bool| expected.push((format!("blocks.{l}.{n}"), shape, required));
        add("ln1.w", vec![c.d_model], true);
        add("ln2.w", vec![c.d_model], true);
        add("ln1.b", vec![c.d_model], gpt2);
        add("ln2.b", vec![c.d_model], gpt2);
        add("attn.W_Q", vec![q, c.d_model], true);
        add("attn.W_K", vec![kv, c.d_model], true);
        add("attn.W_V", vec![kv, c.d_model], true);
        add("attn.W_O", vec![c.d_model, q], true);
        add("attn.b_Q", vec![q], gpt2);
        add("attn.b_K", vec![kv], gpt2);
        add("attn.b_V", vec![kv], gpt2);
        add("attn.b_O", vec![c.d_model], gpt2);
        if !gpt2 {
            add("mlp.W_gate", vec![c.d_mlp, c.d_model], true);
        }
        add("mlp.W_in", vec![c.d_mlp, c.d_model], true);
        add("mlp.W_out", vec![c.d_model, c.d_mlp], true);
        add("mlp.b_in", vec![c.d_mlp], gpt2);
        add("mlp.b_out", vec![c.d_model], gpt2);
    }
    for name in tensors.keys() {
        if !expected.iter().any(|(n, ..)| n == name) {
            bail!("`{name}` is not a canonical tensor name for a {arch} model with {} layers", c.n_layers);
        }
    }

    // GGUF name -> f32 tensor, after permuting / fusing.
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut fused: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, shape, required) in &expected {
        if name == "unembed.W_U" && c.tied_embeddings {
            continue;
        }
        let Some(t) = tensors.get(name) else {
            if *required {
                bail!("canonical tensor `{name}` is missing");
            }
            continue;
        };
        if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            bail!("canonical tensor `{name}` has shape {:?}, expected {shape:?}", t.shape);
        }
        match source(name, c, family).expect("expected names are canonical") {
            Source::Plain(g) => {
                out.insert(g, t.clone());
            }
            Source::Permuted(g, n_heads) => {
                let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
                out.insert(g, Tensor::new(t.shape.clone(), permute_rope_rows(&t.data, n_heads, row_len)));
            }
            Source::Fused(g, part) => {
                fused.entry(g).or_default()[part] = Some(t.clone());
            }
        }
    }
    for (g, parts) in fused {
        let [Some(tq), Some(tk), Some(tv)] = parts else {
            bail!("GPT-2 needs all of Q, K and V (or none of their biases) to write {g}");
        };
        let mut shape = tq.shape.clone();
        shape[0] = tq.shape[0] + tk.shape[0] + tv.shape[0];
        out.insert(g, Tensor::new(shape, [tq.data, tk.data, tv.data].concat()));
    }

    let mut encoded = Vec::with_capacity(out.len());
    for (name, t) in &out {
        let wanted = match (t.shape.len(), name.as_str()) {
            (1, _) => GgmlType::F32,
            (_, "token_embd.weight" | "position_embd.weight") => types.embed,
            _ => types.matrices,
        };
        let ty = if t.shape[t.shape.len() - 1].is_multiple_of(wanted.block_size()) { wanted } else { GgmlType::F32 };
        encoded.push(GgufTensorData::encode(name, t, ty)?);
    }

    let u32v = |n: usize| MetaValue::U32(n as u32);
    let mut meta: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), MetaValue::String(arch.into())),
        ("general.name".into(), MetaValue::String("patchbay synthetic model".into())),
    ];
    let mut put = |k: &str, v: MetaValue| meta.push((format!("{arch}.{k}"), v));
    put("block_count", u32v(c.n_layers));
    put("context_length", u32v(c.n_ctx));
    put("embedding_length", u32v(c.d_model));
    put("feed_forward_length", u32v(c.d_mlp));
    put("attention.head_count", u32v(c.n_heads));
    put("attention.head_count_kv", u32v(c.n_kv_heads));
    if c.d_head * c.n_heads != c.d_model {
        put("attention.key_length", u32v(c.d_head));
        put("attention.value_length", u32v(c.d_head));
    }
    if gpt2 {
        put("attention.layer_norm_epsilon", MetaValue::F32(c.norm_eps));
    } else {
        put("attention.layer_norm_rms_epsilon", MetaValue::F32(c.norm_eps));
        put("rope.freq_base", MetaValue::F32(c.rope_theta.unwrap_or(10000.0)));
        put("rope.dimension_count", u32v(c.d_head));
    }
    let tokenizer = if merges.is_empty() {
        gguf_tokenizer::word_level_metadata(vocab)?
    } else {
        gguf_tokenizer::bpe_metadata(vocab, merges)
    };
    meta.extend(tokenizer);
    write_gguf(path, &meta, &encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
        (k.to_string(), v)
    }

    fn bytes_of(meta: &[(String, MetaValue)], tensors: &[GgufTensorData]) -> Vec<u8> {
        let mut out = Vec::new();
        write_gguf_to(&mut out, meta, tensors).unwrap();
        out
    }

    fn small_file() -> (Vec<(String, MetaValue)>, Vec<GgufTensorData>) {
        let meta = vec![
            kv("general.architecture", MetaValue::String("llama".into())),
            kv("a.u8", MetaValue::U8(7)),
            kv("a.i8", MetaValue::I8(-7)),
            kv("a.u16", MetaValue::U16(65535)),
            kv("a.i16", MetaValue::I16(-300)),
            kv("a.u32", MetaValue::U32(123456)),
            kv("a.i32", MetaValue::I32(-123456)),
            kv("a.f32", MetaValue::F32(1.5e-5)),
            kv("a.bool", MetaValue::Bool(true)),
            kv("a.u64", MetaValue::U64(1 << 40)),
            kv("a.i64", MetaValue::I64(-(1 << 40))),
            kv("a.f64", MetaValue::F64(0.1)),
            kv("a.strings", MetaValue::strings(["x", "", "héllo"])),
            kv("a.empty", MetaValue::Array(MetaType::String, vec![])),
            kv("a.nested", MetaValue::Array(MetaType::Array, vec![MetaValue::i32s([1, -2])])),
        ];
        let t1 = Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let t2 = Tensor::new(vec![2, 32], (0..64).map(|i| i as f32 / 10.0).collect());
        let tensors = vec![
            GgufTensorData::encode("t1", &t1, GgmlType::F32).unwrap(),
            GgufTensorData::encode("t2", &t2, GgmlType::Q8_0).unwrap(),
        ];
        (meta, tensors)
    }

    #[test]
    fn write_then_parse_round_trips_all_value_types() {
        let (meta, tensors) = small_file();
        let bytes = bytes_of(&meta, &tensors);
        let layout = parse(&bytes).unwrap();
        assert_eq!(layout.version, 3);
        assert_eq!(layout.metadata, meta);
        assert_eq!(layout.data_offset % 32, 0);
        assert_eq!(layout.tensors.len(), 2);
        assert_eq!(layout.tensors[0].dims, vec![3, 2]);
        assert_eq!(layout.tensors[0].shape(), vec![2, 3]);
        assert_eq!(layout.tensors[1].type_id, GgmlType::Q8_0.id());
        assert_eq!(layout.tensors[1].offset % 32, 0);
        assert_eq!(layout.tensors[1].n_bytes, Some(68));
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let (mut meta, tensors) = small_file();
        meta.push(kv("general.alignment", MetaValue::U32(64)));
        let bytes = bytes_of(&meta, &tensors);
        let layout = parse(&bytes).unwrap();
        assert_eq!(layout.alignment, 64);
        assert!(layout.tensors.iter().all(|t| t.offset % 64 == 0));
    }

    #[test]
    fn file_reads_tensors_back() {
        let (meta, tensors) = small_file();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&path, &meta, &tensors).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_u64("a.u32").unwrap(), Some(123456));
        assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
        assert!(f.get_str("a.u32").unwrap_err().to_string().contains("expected a string"));
        let t1 = f.read_tensor("t1").unwrap().unwrap();
        assert_eq!(t1, Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let t2 = f.read_tensor("t2").unwrap().unwrap();
        assert_eq!(t2.shape, vec![2, 32]);
        assert!((t2.data[63] - 6.3).abs() < 0.03);
        assert!(f.read_tensor("nope").unwrap().is_none());
    }

    fn parse_err(bytes: &[u8]) -> String {
        format!("{:#}", parse(bytes).unwrap_err())
    }

    #[test]
    fn every_truncation_is_a_clean_error() {
        let (meta, tensors) = small_file();
        let bytes = bytes_of(&meta, &tensors);
        for len in 0..bytes.len() - 1 {
            // Cutting inside the padding after the last tensor can still be a valid file.
            if let Err(e) = parse(&bytes[..len]) {
                let msg = format!("{e:#}");
                assert!(msg.contains("truncated") || msg.contains("corrupt"), "{len}: {msg}");
            }
        }
        // One key/value, no tensors: cut inside the length of the value string (offset 56).
        let one = bytes_of(&small_file().0[..1], &[]);
        let msg = parse_err(&one[..60]);
        assert!(msg.contains("truncated") && msg.contains("offset 56"), "{msg}");
        // Cut inside the last tensor's data.
        let msg = parse_err(&bytes[..bytes.len() - 40]);
        assert!(msg.contains("tensor t2") && msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn bad_headers_are_clear_errors() {
        assert!(parse_err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
        let (meta, tensors) = small_file();
        let good = bytes_of(&meta, &tensors);

        let mut v1 = good.clone();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse_err(&v1).contains("version 1"));

        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let msg = parse_err(&huge);
        assert!(msg.contains("tensor count at offset 8"), "{msg}");

        let mut huge_kv = good.clone();
        huge_kv[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(parse_err(&huge_kv).contains("metadata count"));

        // The first key's length.
        let mut huge_str = good.clone();
        huge_str[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse_err(&huge_str).contains("length of metadata key #0"));
    }

    #[test]
    fn tensor_past_end_of_file_is_reported() {
        let meta = vec![kv("general.architecture", MetaValue::String("llama".into()))];
        let t = Tensor::new(vec![1, 32], vec![0.5; 32]);
        let tensors = vec![GgufTensorData::encode("w", &t, GgmlType::F32).unwrap()];
        let mut bytes = bytes_of(&meta, &tensors);
        // Header (24) + the one key/value (8+20 key, 4 type, 8+5 "llama") + name (8+1), n_dims (4),
        // dims (16), type (4): then comes the tensor's relative data offset.
        let pos = 24 + (8 + 20 + 4 + 8 + 5) + (8 + 1 + 4 + 16 + 4);
        assert_eq!(bytes[pos..pos + 8], 0u64.to_le_bytes());
        bytes[pos..pos + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let msg = parse_err(&bytes);
        assert!(msg.contains("tensor w") && msg.contains("past the end"), "{msg}");
    }

    #[test]
    fn unsupported_tensor_type_is_named_when_read() {
        let meta = vec![kv("general.architecture", MetaValue::String("llama".into()))];
        let t = Tensor::new(vec![1, 256], vec![0.0; 256]);
        let mut data = GgufTensorData::encode("blk.0.attn_q.weight", &t, GgmlType::F32).unwrap();
        // Write it as Q4_K, then relabel the type id as Q5_K (176 bytes per 256 elements).
        data.ty = GgmlType::Q4_K;
        data.data = vec![0; 144];
        let mut bytes = bytes_of(&meta, &[data]);
        // Header, key/value, name (8+19), n_dims, dims: then the type id.
        let pos = 24 + (8 + 20 + 4 + 8 + 5) + (8 + 19 + 4 + 16);
        assert_eq!(bytes[pos..pos + 4], 12u32.to_le_bytes());
        bytes[pos..pos + 4].copy_from_slice(&13u32.to_le_bytes());
        bytes.extend(vec![0; 64]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q5k.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let msg = f.read_tensor("blk.0.attn_q.weight").unwrap_err().to_string();
        assert!(msg.contains("blk.0.attn_q.weight has type Q5_K, which patchbay cannot import"), "{msg}");
    }

    #[test]
    fn rope_permutation_matches_llama_cpp_and_inverts() {
        // 2 heads of d_head 4, rows of length 1: HF rows [0..8].
        let hf: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let gguf = permute_rope_rows(&hf, 2, 1);
        // reshape(2, 2, 2).swapaxes(1, 2): head 0 [0,1 | 2,3] -> [0,2,1,3].
        assert_eq!(gguf, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(unpermute_rope_rows(&gguf, 2, 1), hf);
        // Larger: 3 heads, d_head 8, rows of 5.
        let x: Vec<f32> = (0..3 * 8 * 5).map(|i| i as f32).collect();
        assert_eq!(unpermute_rope_rows(&permute_rope_rows(&x, 3, 5), 3, 5), x);
        assert_eq!(permute_rope_rows(&unpermute_rope_rows(&x, 3, 5), 3, 5), x);
        assert_ne!(permute_rope_rows(&x, 3, 5), x);
    }

    fn random(shape: Vec<usize>, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        Tensor::new(shape, (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect())
    }

    fn canonical(config: &ModelConfig) -> BTreeMap<String, Tensor> {
        let c = config;
        let gpt2 = c.architecture == Architecture::Gpt2;
        let (q, kv) = (c.n_heads * c.d_head, c.n_kv_heads * c.d_head);
        let mut shapes: Vec<(String, Vec<usize>)> =
            vec![("embed.W_E".into(), vec![c.vocab_size, c.d_model]), ("ln_final.w".into(), vec![c.d_model])];
        if !c.tied_embeddings {
            shapes.push(("unembed.W_U".into(), vec![c.vocab_size, c.d_model]));
        }
        if gpt2 {
            shapes.push(("pos_embed.W_pos".into(), vec![c.n_ctx, c.d_model]));
            shapes.push(("ln_final.b".into(), vec![c.d_model]));
        }
        for l in 0..c.n_layers {
            let mut add = |n: &str, s: Vec<usize>| shapes.push((format!("blocks.{l}.{n}"), s));
            add("ln1.w", vec![c.d_model]);
            add("ln2.w", vec![c.d_model]);
            add("attn.W_Q", vec![q, c.d_model]);
            add("attn.W_K", vec![kv, c.d_model]);
            add("attn.W_V", vec![kv, c.d_model]);
            add("attn.W_O", vec![c.d_model, q]);
            add("mlp.W_in", vec![c.d_mlp, c.d_model]);
            add("mlp.W_out", vec![c.d_model, c.d_mlp]);
            if gpt2 {
                for (n, d) in [("ln1.b", c.d_model), ("ln2.b", c.d_model), ("attn.b_Q", q), ("attn.b_K", kv)] {
                    add(n, vec![d]);
                }
                for (n, d) in
                    [("attn.b_V", kv), ("attn.b_O", c.d_model), ("mlp.b_in", c.d_mlp), ("mlp.b_out", c.d_model)]
                {
                    add(n, vec![d]);
                }
            } else {
                add("mlp.W_gate", vec![c.d_mlp, c.d_model]);
            }
        }
        shapes.into_iter().enumerate().map(|(i, (n, s))| (n, random(s, i as u64))).collect()
    }

    fn config(arch: Architecture, tied: bool) -> ModelConfig {
        let llama = arch == Architecture::Llama;
        ModelConfig {
            architecture: arch,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: if llama { 2 } else { 4 },
            d_model: 32,
            d_head: 8,
            d_mlp: 64,
            vocab_size: 6,
            n_ctx: 16,
            norm_eps: 1e-5,
            rope_theta: llama.then_some(10000.0),
            rope_scaling: None,
            tied_embeddings: tied,
        }
    }

    fn vocab() -> Vec<String> {
        ["<unk>", "<bos>", "the", "cat", "sat", "mat"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn canonical_round_trip_is_exact_in_f32() {
        for (arch, tied) in [(Architecture::Llama, true), (Architecture::Llama, false), (Architecture::Gpt2, false)] {
            let cfg = config(arch, tied);
            let weights = canonical(&cfg);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.gguf");
            canonical_to_gguf(&path, &cfg, &weights, &vocab(), &[], GgufTypes::EXACT).unwrap();
            let ckpt = GgufCheckpoint::open(&path).unwrap();
            assert_eq!(ckpt.config(), &cfg);
            for (name, t) in &weights {
                assert_eq!(&ckpt.tensor(name).unwrap().unwrap(), t, "{arch:?} {name}");
            }
            let unembed = ckpt.tensor("unembed.W_U").unwrap().unwrap();
            let expect = if tied { &weights["embed.W_E"] } else { &weights["unembed.W_U"] };
            assert_eq!(&unembed, expect);
            assert!(ckpt.tensor("blocks.0.attn.b_Q").unwrap().is_some() == (arch == Architecture::Gpt2));
            assert!(ckpt.tensor("blocks.0.bogus").is_err());
            // The file really stores llama Q rows interleaved.
            if arch == Architecture::Llama {
                let raw = ckpt.file().read_tensor("blk.0.attn_q.weight").unwrap().unwrap();
                assert_ne!(raw, weights["blocks.0.attn.W_Q"]);
            }
        }
    }

    #[test]
    fn canonical_round_trip_with_quantised_types() {
        let cfg = config(Architecture::Llama, true);
        let weights = canonical(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        canonical_to_gguf(&path, &cfg, &weights, &vocab(), &[], GgufTypes::default()).unwrap();
        let ckpt = GgufCheckpoint::open(&path).unwrap();
        let info = ckpt.file().tensor_info("token_embd.weight").unwrap();
        assert_eq!(info.type_id, GgmlType::Q8_0.id());
        // Each tensor reads back as its quantise-dequantise image.
        for (name, t) in &weights {
            let ty = match t.shape.len() {
                1 => GgmlType::F32,
                _ if name == "embed.W_E" => GgmlType::Q8_0,
                _ => GgmlType::Q4_1,
            };
            let q = quant::dequantize(ty, &quant::quantize(ty, &t.data).unwrap(), t.data.len()).unwrap();
            assert_eq!(ckpt.tensor(name).unwrap().unwrap().data, q, "{name}");
        }
    }

    #[test]
    fn canonical_to_gguf_validates_input() {
        let cfg = config(Architecture::Llama, true);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut w = canonical(&cfg);
        w.insert("blocks.0.attn.W_X".into(), random(vec![2], 0));
        let err = canonical_to_gguf(&path, &cfg, &w, &vocab(), &[], GgufTypes::EXACT).unwrap_err();
        assert!(err.to_string().contains("blocks.0.attn.W_X"), "{err}");
        let mut w = canonical(&cfg);
        w.remove("blocks.1.mlp.W_gate");
        let err = canonical_to_gguf(&path, &cfg, &w, &vocab(), &[], GgufTypes::EXACT).unwrap_err();
        assert!(err.to_string().contains("blocks.1.mlp.W_gate"), "{err}");
        let err = canonical_to_gguf(&path, &cfg, &canonical(&cfg), &vocab()[..5], &[], GgufTypes::EXACT).unwrap_err();
        assert!(err.to_string().contains("vocab"), "{err}");
    }

    #[test]
    fn qwen2_is_not_unpermuted_and_unknown_architectures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let cfg = config(Architecture::Llama, true);
        canonical_to_gguf(&path, &cfg, &canonical(&cfg), &vocab(), &[], GgufTypes::EXACT).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let tensors: Vec<GgufTensorData> = f
            .tensors()
            .iter()
            .map(|t| {
                let x = f.read_tensor(&t.name).unwrap().unwrap();
                GgufTensorData::encode(&t.name, &x, GgmlType::F32).unwrap()
            })
            .collect();
        let with_arch = |arch: &str| -> Vec<(String, MetaValue)> {
            f.metadata()
                .iter()
                .map(|(k, v)| match k.as_str() {
                    "general.architecture" => (k.clone(), MetaValue::String(arch.into())),
                    _ => (k.replacen("llama.", &format!("{arch}."), 1), v.clone()),
                })
                .collect()
        };
        write_gguf(&path, &with_arch("qwen2"), &tensors).unwrap();
        let ckpt = GgufCheckpoint::open(&path).unwrap();
        let raw = ckpt.file().read_tensor("blk.0.attn_q.weight").unwrap().unwrap();
        assert_eq!(ckpt.tensor("blocks.0.attn.W_Q").unwrap().unwrap(), raw);

        write_gguf(&path, &with_arch("falcon"), &tensors).unwrap();
        let msg = format!("{:#}", GgufCheckpoint::open(&path).err().unwrap());
        assert!(msg.contains("`falcon` is not supported") && msg.contains("llama, mistral, qwen2, gpt2"), "{msg}");
    }

    /// The real SmolLM2 GGUF, when `PATCHBAY_SMOLLM2_GGUF` points at it.
    #[test]
    fn smollm2_gguf_config_and_tensors() {
        let Some(path) = std::env::var_os("PATCHBAY_SMOLLM2_GGUF") else {
            eprintln!("skipping: set PATCHBAY_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run");
            return;
        };
        let ckpt = GgufCheckpoint::open(Path::new(&path)).unwrap();
        let c = ckpt.config();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.n_layers, c.d_model, c.n_heads, c.n_kv_heads), (30, 576, 9, 3));
        assert_eq!((c.d_head, c.d_mlp, c.vocab_size, c.n_ctx), (64, 1536, 49152, 8192));
        assert_eq!(c.rope_theta, Some(100000.0));
        assert_eq!(c.norm_eps, 1e-5);
        assert!(c.tied_embeddings);
        let stats = |t: &Tensor| {
            let n = t.data.len() as f64;
            let mean = t.data.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = t.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        };
        let embed = crate::import::checkpoint::required(&ckpt, "embed.W_E", &[49152, 576]).unwrap();
        assert!(embed.data.iter().all(|v| v.is_finite()));
        let (mean, std) = stats(&embed);
        eprintln!("embed.W_E (Q8_0): mean {mean:.4} std {std:.4}");
        assert!(mean.abs() < 0.05 && std > 0.01 && std < 1.0);
        let wq = crate::import::checkpoint::required(&ckpt, "blocks.0.attn.W_Q", &[576, 576]).unwrap();
        assert!(wq.data.iter().all(|v| v.is_finite()));
        let (mean, std) = stats(&wq);
        eprintln!("blocks.0.attn.W_Q (Q4_1): mean {mean:.4} std {std:.4}");
        assert!(mean.abs() < 0.05 && std > 0.01 && std < 1.0);
        let ln = crate::import::checkpoint::required(&ckpt, "blocks.0.ln1.w", &[576]).unwrap();
        assert!(ln.data.iter().all(|v| v.is_finite()));
    }
}
