"""ONNX Runtime's fp32 MatMul throughput on this machine: the ceiling to compare
benches/forward.rs against.

    python3 -m venv /tmp/pv && /tmp/pv/bin/pip install numpy onnx
    /tmp/pv/bin/python benches/matmul_ceiling.py   # uses the onnxruntime in the patchbay cache
"""
import os
import sys
import time

cache = os.environ.get("PATCHBAY_CACHE", os.path.expanduser("~/.cache/patchbay"))
sys.path.insert(0, os.path.join(cache, "pip", "onnxruntime-1.31.1"))
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def bench(m, k, n, reps=5):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": rng.standard_normal((m, k), dtype=np.float32)}
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(reps):
        session.run(None, feed)
    seconds = (time.perf_counter() - start) / reps
    print(f"MatMul {m}x{k} @ {k}x{n}: {2 * m * k * n / seconds / 1e9:.0f} GFLOP/s")


bench(2048, 2048, 2048)
# SmolLM2's projection shapes at 48 x 14 tokens.
bench(672, 576, 1536)
bench(672, 1536, 576)
