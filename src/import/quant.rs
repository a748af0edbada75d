//! GGML tensor types: block layouts, dequantisation to f32, and reference quantisers.
//!
//! Block layouts follow llama.cpp's `ggml-common.h` exactly (all little-endian):
//!
//! | type | elements | bytes | layout |
//! |---|---|---|---|
//! | Q8_0 | 32 | 34 | f16 `d`, 32 × i8 `qs`; `x = q·d` |
//! | Q4_0 | 32 | 18 | f16 `d`, 16 bytes; low nibbles are elements 0..16, high 16..32; `x = (q−8)·d` |
//! | Q4_1 | 32 | 20 | f16 `d`, f16 `m`, 16 bytes as Q4_0; `x = q·d + m` |
//! | Q4_K | 256 | 144 | f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales/mins, 128 bytes `qs` |
//! | Q6_K | 256 | 210 | `ql[128]`, `qh[64]`, i8 `scales[16]`, f16 `d` |

use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;

use crate::fixable;

/// Every ggml type id llama.cpp has defined, with its block geometry, so that error messages can
/// name types patchbay does not import and the GGUF reader can still size their data.
/// `(id, name, elements per block, bytes per block)`; ids 4, 5, 31–33 and 36–38 were removed.
const KNOWN_TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

/// Name of any ggml type id, for messages: `Q5_K`, or `unknown type id 99`.
pub fn type_name(id: u32) -> String {
    match KNOWN_TYPES.iter().find(|t| t.0 == id) {
        Some(t) => t.1.to_string(),
        None => format!("unknown type id {id}"),
    }
}

/// `(elements per block, bytes per block)` of any known ggml type id, imported or not.
pub fn block_geometry(id: u32) -> Option<(usize, usize)> {
    KNOWN_TYPES.iter().find(|t| t.0 == id).map(|t| (t.2, t.3))
}

/// The ggml tensor types patchbay can import.
#[allow(non_camel_case_types)] // spelled as ggml spells them, so messages and code agree
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 8] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// The type id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        block_geometry(self.id()).expect("supported types are known").0
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        block_geometry(self.id()).expect("supported types are known").1
    }

    /// Bytes needed for `n_elements`, or `None` when `n_elements` is not a whole number of blocks
    /// (or overflows).
    pub fn n_bytes(self, n_elements: usize) -> Option<usize> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The supported type for `id`, or an error naming the tensor and the type it has.
pub fn supported_type(tensor: &str, id: u32) -> Result<GgmlType> {
    GgmlType::from_id(id).ok_or_else(|| {
        let supported: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
        fixable!(
            "tensor {tensor} has type {}, which patchbay cannot import; supported: {}",
            type_name(id),
            supported.join(", ");
            help: "re-quantise the model to one of these types, or import the original safetensors checkpoint"
        )
    })
}

/// Decode `n_elements` values of type `ty` from `bytes` (which must hold exactly that many).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let Some(expected) = ty.n_bytes(n_elements) else {
        bail!("{n_elements} elements are not a whole number of {ty} blocks ({} elements each)", ty.block_size());
    };
    if bytes.len() != expected {
        bail!("{n_elements} {ty} elements need {expected} bytes, got {}", bytes.len());
    }
    let mut out = vec![0f32; n_elements];
    // Blocks are independent; big tensors (an embedding is ~28M values) decode in parallel.
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let chunk_blocks = (16384 / bs).max(1);
    out.par_chunks_mut(bs * chunk_blocks).zip(bytes.par_chunks(ts * chunk_blocks)).for_each(|(y, x)| {
        for (y, x) in y.chunks_exact_mut(bs).zip(x.chunks_exact(ts)) {
            decode_block(ty, x, y);
        }
    });
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn decode_block(ty: GgmlType, x: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
        GgmlType::F16 => y[0] = f16_at(x, 0),
        // bf16 is the top half of an f32.
        GgmlType::BF16 => y[0] = f32::from_bits((u16::from_le_bytes([x[0], x[1]]) as u32) << 16),
        GgmlType::Q8_0 => {
            let d = f16_at(x, 0);
            for (y, &q) in y.iter_mut().zip(&x[2..34]) {
                *y = (q as i8) as f32 * d;
            }
        }
        GgmlType::Q4_0 => {
            let d = f16_at(x, 0);
            for (j, &q) in x[2..18].iter().enumerate() {
                y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(x, 0), f16_at(x, 2));
            for (j, &q) in x[4..20].iter().enumerate() {
                y[j] = (q & 0x0F) as f32 * d + m;
                y[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q4_K => decode_q4_k(x, y),
        GgmlType::Q6_K => decode_q6_k(x, y),
    }
}

/// Scale and min of sub-block `j` (0..8) from Q4_K's 12 packed bytes (llama.cpp
/// `get_scale_min_k4`): the first four use 6 low bits of bytes 0..4 / 4..8; the last four take
/// their low 4 bits from bytes 8..12 and their top 2 bits from the spare bits of bytes 0..8.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn decode_q4_k(x: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(x, 0), f16_at(x, 2));
    let scales = &x[4..16];
    // Four groups of 64 outputs; each uses 32 bytes of qs, low nibbles then high nibbles.
    for g in 0..4 {
        let qs = &x[16 + 32 * g..16 + 32 * (g + 1)];
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let y = &mut y[64 * g..64 * (g + 1)];
        for (l, &q) in qs.iter().enumerate() {
            y[l] = d1 * (q & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

fn decode_q6_k(x: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&x[0..128], &x[128..192], &x[192..208]);
    let d = f16_at(x, 208);
    // Two halves of 128 outputs, each from 64 bytes of ql, 32 of qh and 8 scales.
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let y = &mut y[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}

/// Encode f32 values as `ty`. Supports F32, F16, BF16 and the round-to-nearest reference
/// quantisers of llama.cpp (`quantize_row_q8_0_ref`, `_q4_0_ref`, `_q4_1_ref`), bit for bit.
/// K-quants need llama.cpp's iterative search and are not offered.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    if !values.len().is_multiple_of(ty.block_size()) {
        bail!("{} values are not a whole number of {ty} blocks ({} elements each)", values.len(), ty.block_size());
    }
    let mut out = Vec::with_capacity(ty.n_bytes(values.len()).unwrap_or(0));
    for x in values.chunks_exact(ty.block_size()) {
        match ty {
            GgmlType::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
            GgmlType::F16 => out.extend_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
            GgmlType::BF16 => out.extend_from_slice(&f32_to_bf16(x[0]).to_le_bytes()),
            GgmlType::Q8_0 => quantize_q8_0(x, &mut out),
            GgmlType::Q4_0 => quantize_q4_0(x, &mut out),
            GgmlType::Q4_1 => quantize_q4_1(x, &mut out),
            GgmlType::Q4_K | GgmlType::Q6_K => {
                bail!("patchbay has no quantiser for {ty}; use Q8_0, Q4_0 or Q4_1")
            }
        }
    }
    Ok(out)
}

/// ggml's `fp32_to_bf16`: round to nearest even, NaNs kept quiet.
fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1)) as u64) >> 16) as u16
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    // `f32::round` rounds half away from zero, like C's roundf.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    // The signed value of largest magnitude (first one on ties) maps to -8.
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    // C truncates `x*id + 8.5` toward zero, i.e. rounds to nearest for these non-negative values.
    let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

fn quantize_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().fold(f32::MAX, |a, &v| if v < a { v } else { a });
    let max = x.iter().fold(-f32::MAX, |a, &v| if v > a { v } else { a });
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let q = |v: f32| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        ty: GgmlType,
        n: usize,
        input: Option<Vec<f32>>,
        blocks: Vec<u8>,
        expected: Vec<f32>,
    }

    /// Fixtures from `tests/fixtures/quant/make_fixtures.py` (gguf-py's reference quants).
    fn fixture(name: &str) -> Fixture {
        let path = format!("{}/tests/fixtures/quant/{name}.json", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
        };
        let hex = doc["blocks_hex"].as_str().unwrap();
        let blocks = (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        let ty_name = doc["type"].as_str().unwrap();
        Fixture {
            ty: *GgmlType::ALL.iter().find(|t| t.name() == ty_name).unwrap(),
            n: doc["n_elements"].as_u64().unwrap() as usize,
            input: (!doc["input"].is_null()).then(|| floats(&doc["input"])),
            blocks,
            expected: floats(&doc["expected"]),
        }
    }

    const FIXTURES: [&str; 7] = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"];

    #[test]
    fn dequantize_matches_gguf_py_exactly() {
        for name in FIXTURES {
            let f = fixture(name);
            let got = dequantize(f.ty, &f.blocks, f.n).unwrap();
            assert_eq!(got.len(), f.expected.len(), "{name}");
            for (i, (g, e)) in got.iter().zip(&f.expected).enumerate() {
                assert_eq!(g.to_bits(), e.to_bits(), "{name}[{i}]: {g} vs {e}");
            }
        }
    }

    #[test]
    fn quantizers_match_gguf_py_bytes() {
        for name in ["f16", "bf16", "q8_0", "q4_0", "q4_1"] {
            let f = fixture(name);
            let got = quantize(f.ty, f.input.as_ref().unwrap()).unwrap();
            assert_eq!(got, f.blocks, "{name}");
        }
    }

    #[test]
    fn quantize_round_trip_error_is_bounded() {
        let x: Vec<f32> = (0..1024).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        // Worst-case error as a fraction of the block's largest magnitude: half a step for Q8_0
        // and Q4_1 (whose steps are amax/127 and at most 2·amax/15), a whole step for Q4_0 (the
        // extreme opposite in sign to the largest value clamps from +8 to +7).
        for (ty, frac) in [(GgmlType::Q8_0, 0.5 / 127.0), (GgmlType::Q4_0, 1.0 / 8.0), (GgmlType::Q4_1, 1.0 / 15.0)] {
            let bytes = quantize(ty, &x).unwrap();
            assert_eq!(bytes.len(), ty.n_bytes(x.len()).unwrap());
            let y = dequantize(ty, &bytes, x.len()).unwrap();
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                // Plus slack for rounding the scale to f16 (relative 2^-11, times up to 127 steps).
                let tol = amax * (frac + 127.0 / 2048.0 * frac * 2.0) + 1e-6;
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= tol, "{ty}: {a} vs {b} (tol {tol})");
                }
            }
        }
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let y = dequantize(ty, &quantize(ty, &x).unwrap(), x.len()).unwrap();
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= a.abs() / 128.0, "{ty}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0f32; 64];
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let y = dequantize(ty, &quantize(ty, &x).unwrap(), 64).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{ty}");
        }
    }

    #[test]
    fn type_table_is_consistent() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
            assert_eq!(type_name(ty.id()), ty.name());
        }
        assert_eq!(GgmlType::Q4_K.type_size(), 144);
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(type_name(13), "Q5_K");
        assert_eq!(type_name(99), "unknown type id 99");
    }

    #[test]
    fn unsupported_type_error_names_tensor_and_type() {
        let err = supported_type("blk.0.attn_q.weight", 13).unwrap_err().to_string();
        assert!(err.contains("blk.0.attn_q.weight has type Q5_K"), "{err}");
        assert!(err.contains("supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K"), "{err}");
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(dequantize(GgmlType::Q8_0, &[0; 34], 31).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_err());
        assert!(quantize(GgmlType::Q4_0, &[0.0; 33]).is_err());
        assert!(quantize(GgmlType::Q4_K, &[0.0; 256]).is_err());
    }
}
