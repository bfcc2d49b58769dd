"""An ONNX model of one MatMul, written as protobuf bytes by hand, to time ONNX Runtime's execution
providers without the `onnx` package (which pocketinfer does not depend on).

Wire format: protobuf encoding (https://protobuf.dev/programming-guides/encoding/) of the messages in
onnx/onnx.proto: ModelProto{ir_version=1, graph=7, opset_import=8}, GraphProto{node=1, name=2, input=11,
output=12}, NodeProto{input=1, output=2, op_type=4}, ValueInfoProto{name=1, type=2},
TypeProto{tensor_type=1}, TypeProto.Tensor{elem_type=1, shape=2}, TensorShapeProto{dim=1},
Dimension{dim_value=1}, OperatorSetIdProto{domain=1, version=2}.
"""

from __future__ import annotations

import time

import numpy as np

_FLOAT = 1   # TensorProto.DataType.FLOAT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _bytes_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _str_field(num: int, s: str) -> bytes:
    return _bytes_field(num, s.encode())


def _value_info(name: str, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_bytes_field(1, _int_field(1, d)) for d in shape)
    tensor = _int_field(1, _FLOAT) + _bytes_field(2, dims)
    return _str_field(1, name) + _bytes_field(2, _bytes_field(1, tensor))


def matmul_model(n: int, k: int, m: int) -> bytes:
    """Y (n, m) = A (n, k) @ B (k, m), all float32 inputs."""
    node = _str_field(1, "A") + _str_field(1, "B") + _str_field(2, "Y") + _str_field(4, "MatMul")
    graph = (_bytes_field(1, node) + _str_field(2, "matmul")
             + _bytes_field(11, _value_info("A", (n, k))) + _bytes_field(11, _value_info("B", (k, m)))
             + _bytes_field(12, _value_info("Y", (n, m))))
    opset = _str_field(1, "") + _int_field(2, 17)
    return _int_field(1, 8) + _str_field(2, "pocketinfer") + _bytes_field(7, graph) + _bytes_field(8, opset)


def ort_gflops(n: int, k: int, m: int, threads: int, seconds: float = 0.3) -> tuple[dict[str, float], list[str]]:
    """GFLOP/s of the MatMul per available execution provider, and notes on the ones that failed.
    Raises ImportError when onnxruntime is absent."""
    import onnxruntime as ort

    model = matmul_model(n, k, m)
    rng = np.random.default_rng(0)
    feeds = {"A": rng.standard_normal((n, k), dtype=np.float32), "B": rng.standard_normal((k, m), dtype=np.float32)}
    out, notes = {}, []
    # Azure's EP runs models remotely; it is not a local accelerator.
    for ep in [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(model, sess_options=opts, providers=[ep])
            sess.run(None, feeds)
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                sess.run(None, feeds)
                calls += 1
            dt = time.perf_counter() - t0
        except Exception as e:  # ORT raises its own Fail/InvalidArgument types; any of them means "EP unusable"
            notes.append(f"onnxruntime {ep}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        out[f"onnxruntime:{ep}"] = round(2.0 * n * k * m * calls / dt / 1e9, 1)
    return out, notes
