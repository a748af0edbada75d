#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (ignored by git).

    python3 fuzz/seed_corpus.py

gguf_header: small hand-made GGUF files (every metadata type, nested arrays, alignment, tensors
of several ggml types). safetensors_header: small valid files. language: examples/*.bay and the
experiment snippets of the tests, their model line pointed at the target's tiny model ("model").
"""
import hashlib
import json
import pathlib
import re
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# ---- GGUF ---------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
          U64: "<Q", I64: "<q", F64: "<d"}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(ty, v):
    if ty == STRING:
        return gstr(v)
    if ty == ARRAY:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gval(elem, x) for x in items)
    return struct.pack(SCALAR[ty], v)


def gguf(metadata, tensors, version=3, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, dims, type_id, n_bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, ty, v in metadata:
        out += gstr(key) + struct.pack("<I", ty) + gval(ty, v)
    offset, data = 0, b""
    for name, dims, type_id, n_bytes in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", type_id, offset)
        chunk = bytes((i * 7) & 0xFF for i in range(n_bytes))
        chunk += b"\0" * (-len(chunk) % alignment)
        data += chunk
        offset += len(chunk)
    out += b"\0" * (-len(out) % alignment)
    return out + data


every_type = [
    ("general.architecture", STRING, "llama"),
    ("general.name", STRING, "fuzz seed"),
    ("t.u8", U8, 200), ("t.i8", I8, -5), ("t.u16", U16, 60000), ("t.i16", I16, -300),
    ("t.u32", U32, 7), ("t.i32", I32, -7), ("t.f32", F32, 1.5), ("t.bool", BOOL, 1),
    ("t.u64", U64, 1 << 40), ("t.i64", I64, -(1 << 40)), ("t.f64", F64, 2.25),
    ("llama.context_length", U32, 2048), ("llama.embedding_length", U32, 32),
    ("llama.block_count", U32, 2), ("llama.attention.head_count", U32, 4),
    ("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "a", "b", " Mary"])),
    ("tokenizer.ggml.scores", ARRAY, (F32, [0.0, 0.0, -1.0, -2.0, -3.0])),
    ("tokenizer.ggml.token_type", ARRAY, (I32, [3, 3, 1, 1, 1])),
    ("t.nested", ARRAY, (ARRAY, [(U8, [1, 2]), (U8, []), (STRING, ["x"])])),
    ("t.empty", ARRAY, (BOOL, [])),
]
tensors = [
    ("token_embd.weight", [32, 5], 0, 32 * 5 * 4),     # F32
    ("blk.0.attn_q.weight", [32, 32], 1, 32 * 32 * 2),  # F16
    ("blk.0.ffn_up.weight", [64, 2], 8, 4 * 34),        # Q8_0: 4 blocks of 32
    ("blk.0.ffn_down.weight", [32, 2, 1], 2, 2 * 18),   # Q4_0
    ("blk.0.odd", [3], 1000, 0),                        # unknown type id
]
put("gguf_header", "empty_v3", gguf([], []))
put("gguf_header", "empty_v2", gguf([], [], version=2))
put("gguf_header", "every_type", gguf(every_type, tensors))
put("gguf_header", "aligned_64", gguf([("general.alignment", U32, 64)] + every_type[:3], tensors[:2], alignment=64))
put("gguf_header", "one_tensor", gguf([("general.architecture", STRING, "qwen2")], tensors[:1]))

# ---- safetensors --------------------------------------------------------------------------


def safetensors(header, data_len):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + bytes(data_len)


put("safetensors_header", "two_tensors", safetensors({
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}, 32))
put("safetensors_header", "empty_tensor", safetensors({
    "e": {"dtype": "F16", "shape": [0, 8], "data_offsets": [0, 0]},
    "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
}, 3))
put("safetensors_header", "unknown_dtype", safetensors({"x": {"dtype": "F8_E4M3", "shape": [5], "data_offsets": [0, 5]}}, 5))
put("safetensors_header", "no_tensors", safetensors({}, 0))

# ---- language -----------------------------------------------------------------------------
MODEL_LINE = re.compile(r'^(\s*model\s+)"[^"]*"', re.M)


def retarget(src):
    return MODEL_LINE.sub(r'\1"model"', src)


for bay in sorted((ROOT / "examples").rglob("*.bay")):
    put("language", "example_" + bay.stem, retarget(bay.read_text()))

RAW = re.compile(r'r#"(.*?)"#', re.S)
PLAIN = re.compile(r'(?<![r#\w])"((?:[^"\\]|\\.)*)"', re.S)
KEYWORDS = re.compile(r"\b(model|dataset|pool|corruption|patch|metric|sweep|expect|include|template|output)\b")


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'", "0": "\0"}


def unescape(s):
    """A Rust string literal's body (with line continuations and \\u{..})."""
    s = re.sub(r"\\\n\s*", "", s)
    s = re.sub(r"\\u\{([0-9a-fA-F]+)\}", lambda m: chr(int(m.group(1), 16)), s)
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), s)


snippets = []
for test in ["lang_check.rs", "lang_plan.rs", "lang_examples.rs", "run_engine.rs"]:
    text = (ROOT / "tests" / test).read_text()
    found = [m.group(1) for m in RAW.finditer(text)]
    found += [unescape(m.group(1)) for m in PLAIN.finditer(RAW.sub("", text))]
    for s in found:
        if "{{" in s:
            s = s.replace("{{", "{").replace("}}", "}")
        if "\n" in s and KEYWORDS.search(s):
            snippets.append(retarget(s))
head = next(s for s in snippets if s.startswith('model "model"\npool names'))
for s in snippets:
    body = s if MODEL_LINE.search(s) else head + s
    put("language", "test_" + hashlib.sha1(body.encode()).hexdigest()[:12], body)

for target in ["gguf_header", "safetensors_header", "language"]:
    print(target, len(list((CORPUS / target).iterdir())), "seeds")
