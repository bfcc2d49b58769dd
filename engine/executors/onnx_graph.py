"""The ONNX graph of a model's prefill: every layer, from the embedded tokens to the residual stream after
the last layer, with the `onnx` package, for ONNX Runtime (engine/executors/onnx_prefill.py).

The matmuls are ONNX Runtime's MatMulNBits (com.microsoft) on the model's own quantized blocks:
- Q4_0 maps exactly and reads our bytes in place. MatMulNBits wants element 2j of a block in byte j's
  low nibble and 2j+1 in its high nibble; GGUF puts elements j and j+16 there (kernels/layouts.md). The
  graph therefore permutes each block of the *activation* the same way (a (n, cols) copy per input,
  with Split and Concat) and the weight bytes stay as they are. 4-bit, zero point 8 (the default).
- Q4_1 and the Q4 layout of Q4_K: value d*q + m. MatMulNBits gets explicit zero points 0 (a small packed
  array) for d*q, and the offsets' part, sum over blocks of m times the block sums of x, is a separate
  f32 MatMul of 1/32 the work on m's transpose (a new (cols/32, rows) f32 array). Exact: the
  alternative, a float zero point -m/d, rounds and measured slower.
- The I8 layout (Q8_0): MatMulNBits' 8-bit values are unsigned with zero point 128, so ORT gets a copy
  of our int8 bytes with the sign bit flipped (q + 128, exact). The Q5 layout (Q5_0/Q5_1, Q5_K) and the
  Q6 layout (Q6_K, in blocks of 16: a scale per 16 values) go as 8-bit values too, unpacked. These are
  the formats where ORT holds a second copy of the quantized bytes. Offsets (Q5_1, Q5_K) as for Q4_1.
- F32: Gemm with transB on our array.
Block scales stored as f16 bits become f32 arrays (MatMulNBits' scales have the activation's type): 4
bytes per block beside the 18 (Q4_0) or 34 (Q8_0) of the block. `Graph.extra_bytes` counts every array
made for ORT.
Other layouts (F16, BF16) are refused with UnsupportedGraph, and the caller falls back.

Norms are ORT's SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization (the residual add
fused with the next norm), RoPE its RotaryEmbedding (rotate-half: interleaved=0, from our cos/sin
tables), attention plain ONNX ops: the cached keys concatenated with the prompt's, one batched MatMul per
KV head group, an additive mask (causal and sliding window) from the caller, Softmax, MatMul.
GroupQueryAttention would fuse attention, but its CPU kernel keeps the past in a (1, kv_heads, max_seq,
head_dim) buffer of its own element type that it writes into; the plain ops take our cache's past as it
is (f32, or half bits read as float16) and return only the prompt's keys and values.

Inputs (T prompt tokens, P cached positions; kv = float32, or float16 for a half cache):
  x (T, hidden) f32; cos, sin (T, head_dim/2) f32; position_ids (1, T) int64;
  mask (group*T, P+T) f32, 0 or -inf, row g*T + t for query t of group member g;
  past_k.i, past_v.i (kv_heads, P, head_dim) kv, for every layer i.
Outputs: y (T, hidden) f32, the residual stream after the last layer; k.i, v.i (kv_heads, T, head_dim)
kv, the prompt's keys (after RoPE) and values, for the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from engine.model.weights import F32Weight, I8Weight, Q4Weight, Q5Weight, Q6Weight, S24Weight
from kernels import dequant, sparse24
from kernels.activation import DRELU, GELU, GELU_TANH, RELU, SILU

OPSET = 18            # Split with num_outputs; ORT 1.16 and later run it
MS = "com.microsoft"


class UnsupportedGraph(ValueError):
    """The model has something the graph cannot express (a weight layout, an activation)."""


@dataclass
class Graph:
    model: onnx.ModelProto                                   # weights as external data in PLACEHOLDER
    initializers: dict[str, np.ndarray] = field(default_factory=dict)   # name -> C-contiguous array
    extra_bytes: int = 0                                     # bytes of the arrays made for ORT, not ours


def _f32_scales(d: np.ndarray) -> np.ndarray:
    """Block scales (rows, blocks) f32 or f16 bits -> f32 (a new array when converted)."""
    return d.view(np.float16).astype(np.float32) if d.dtype == np.uint16 else d


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.extra = 0
        self.permuted: dict[str, str] = {}      # activation name -> its block-permuted copy
        self.n = 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.node(op, inputs, 1, domain, **attrs)[0]

    def init(self, name: str, a: np.ndarray, ours: bool) -> str:
        """A constant: ours (the model's own array, handed over without a copy when contiguous) or made
        for ORT; whatever is not ours in place counts in extra_bytes."""
        c = np.ascontiguousarray(a)
        self.inits[name] = c
        if not ours or not np.may_share_memory(c, a):
            self.extra += c.nbytes
        return name

    def ints(self, values: list[int]) -> str:
        name = self.name("shape")
        self.inits[name] = np.array(values, dtype=np.int64)
        return name

    def permute_blocks(self, x: str, cols: int) -> str:
        """x (n, cols) with each block of 32 reordered j, j+16 -> 2j, 2j+1 (module docstring)."""
        if x not in self.permuted:
            # Split and Concat, not Transpose: ORT's Transpose with a 2-wide inner axis measured 20x slower.
            lo, hi = self.node("Split", [self.one("Reshape", [x, self.ints([-1, 2, 16])])], 2, axis=1, num_outputs=2)
            pairs = [self.one("Reshape", [half, self.ints([-1, 16, 1])]) for half in (lo, hi)]
            self.permuted[x] = self.one("Reshape", [self.one("Concat", pairs, axis=2), self.ints([-1, cols])])
        return self.permuted[x]

    def offsets(self, name: str, w, x: str, y: str, block: int) -> str:
        """y + the block offsets' part of x @ w.T, sum over blocks b of m[r, b] * (sum of x in block b):
        a (n, cols/block) @ (cols/block, rows) f32 MatMul, 1/block of the main product's work."""
        if not w.m.shape[1]:
            return y
        cols = w.shape[1]
        sums = self.one("ReduceSum", [self.one("Reshape", [x, self.ints([-1, cols // block, block])]), self.ints([2])],
                        keepdims=0)
        m_t = self.init(name + ".m", _f32_scales(w.m).T, False)                     # (cols/block, rows) f32
        return self.one("Add", [y, self.one("MatMul", [sums, m_t])])

    def linear(self, name: str, w, x: str, bias: np.ndarray | None = None) -> str:
        """x (n, cols) f32 -> (n, rows) f32 = x @ w.T (+ bias)."""
        rows, cols = w.shape
        if isinstance(w, F32Weight):
            y = self.one("Gemm", [x, self.init(name, w.w, True)], transB=1)
        elif isinstance(w, Q4Weight) and cols % 32 == 0:
            blocks = cols // 32
            qs = self.init(name + ".qs", w.qs, True)
            self.inits[qs] = self.inits[qs].reshape(rows, blocks, 16)
            d = _f32_scales(w.d)
            inputs = [self.permute_blocks(x, cols), qs, self.init(name + ".d", d, d is w.d)]
            if w.m.shape[1]:
                # explicit zero points 0 (packed nibbles), and the offsets as their own small matmul
                inputs.append(self.init(name + ".z", np.zeros((rows, (blocks + 1) // 2), np.uint8), False))
            y = self.one("MatMulNBits", inputs, MS, K=cols, N=rows, bits=4, block_size=32, accuracy_level=0)
            y = self.offsets(name, w, x, y, 32)
        elif isinstance(w, Q5Weight):
            # 5-bit values as MatMulNBits' 8-bit ones (zero point 128): u + 128 reads d*u, and Q5_0's
            # u + 112 reads d*(u - 16); the mins, where there are some, come as offsets.
            values = dequant.q5_values_numpy(w.qs, cols // 32)                   # (rows, cols/32, 32) uint8
            values += np.uint8(128 if w.m.shape[1] else 112)
            d = _f32_scales(w.d)
            inputs = [x, self.init(name + ".q", values, False), self.init(name + ".d", d, d is w.d)]
            y = self.one("MatMulNBits", inputs, MS, K=cols, N=rows, bits=8, block_size=32, accuracy_level=0)
            y = self.offsets(name, w, x, y, 32)
        elif isinstance(w, Q6Weight):
            # 6-bit values as MatMulNBits' 8-bit ones in blocks of 16 (zero point 128): u + 96 reads d*(u - 32)
            values = dequant.q6_values_numpy(w.qs, cols // 32) + np.uint8(96)      # (rows, cols/32, 32) uint8
            d = dequant.q6_scales_numpy(w.d).reshape(rows, cols // 16)              # (rows, cols/16) f32
            inputs = [x, self.init(name + ".q", values.reshape(rows, cols // 16, 16), False),
                      self.init(name + ".d", d, False)]
            y = self.one("MatMulNBits", inputs, MS, K=cols, N=rows, bits=8, block_size=16, accuracy_level=0)
        elif isinstance(w, I8Weight) and w.d.shape[1] and cols % w.d.shape[1] == 0:
            block = cols // w.d.shape[1]
            if block not in (16, 32, 64, 128, 256):
                raise UnsupportedGraph(f"{name}: int8 blocks of {block} (MatMulNBits takes powers of two >= 16)")
            flipped = (w.q.view(np.uint8) ^ np.uint8(0x80)).reshape(rows, cols // block, block)
            d = _f32_scales(w.d)
            inputs = [x, self.init(name + ".q", flipped, False)]
            inputs.append(self.init(name + ".d", d, d is w.d))
            y = self.one("MatMulNBits", inputs, MS, K=cols, N=rows, bits=8, block_size=block, accuracy_level=0)
            y = self.offsets(name, w, x, y, block)
        elif isinstance(w, S24Weight):
            # 2:4 weights as MatMulNBits' 8-bit values (zero point 128), zeros where pruned: the bytes the
            # lane GEMM reads (S8: v + 128; S4: q reading q - 8, moved up by 120); one scale per 64 columns,
            # given per block of 32. ONNX Runtime multiplies the zeros too: no speed from the sparsity here.
            values = sparse24.dense_bytes_numpy(w.qs, w.d)                           # (rows, cols) uint8
            if w.form == "s4":
                values += np.uint8(120)
            d = np.repeat(_f32_scales(w.d), 2, axis=1)                                # (rows, cols/32) f32
            inputs = [x, self.init(name + ".q", values.reshape(rows, cols // 32, 32), False),
                      self.init(name + ".d", d, False)]
            y = self.one("MatMulNBits", inputs, MS, K=cols, N=rows, bits=8, block_size=32, accuracy_level=0)
        else:
            raise UnsupportedGraph(f"{name}: {type(w).__name__} {w.shape} has no MatMulNBits mapping")
        if bias is not None:
            y = self.one("Add", [y, self.init(name + ".bias", bias, True)])
        return y


def _activation(b: _Builder, kind: int, gate: str, up: str) -> str:
    if kind == SILU:
        a = b.one("Mul", [gate, b.one("Sigmoid", [gate])])
    elif kind == RELU:
        a = b.one("Relu", [gate])
    elif kind == DRELU:
        return b.one("Mul", [b.one("Relu", [gate]), b.one("Relu", [up])])
    elif kind == GELU:
        a = b.one("Gelu", [gate], MS)
    elif kind == GELU_TANH:
        a = b.one("FastGelu", [gate], MS)
    else:
        raise UnsupportedGraph(f"activation kind {kind} has no ONNX form here")
    return b.one("Mul", [a, up])


def build(config, layers, kv_half: bool) -> Graph:
    """The prefill graph of `layers` (the model's LayerWeights, after engine/model/layout.fuse), for a
    cache of f32 or (kv_half) IEEE half elements. Raises UnsupportedGraph."""
    c = config
    kv_type = TensorProto.FLOAT16 if kv_half else TensorProto.FLOAT
    b = _Builder()
    heads, kv_heads, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    group = heads // kv_heads
    hq, hkv = heads * hd, kv_heads * hd
    eps = float(c.rms_norm_eps)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", c.hidden_size]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["T", hd // 2]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["T", hd // 2]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "T"]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["GT", "PT"])]
    outputs = []
    scale = np.array(1.0 / np.sqrt(hd), dtype=np.float32)
    b.inits["attn_scale"] = scale
    x = "x"
    h = b.one("SimplifiedLayerNormalization", [x, b.init("norm.0", layers[0].attn_norm, True)], axis=-1, epsilon=eps)
    for i, lw in enumerate(layers):
        if lw.wqkv is not None:
            qkv = b.linear(f"l{i}.wqkv", lw.wqkv, h)
            q, k, v = b.node("Split", [qkv, b.ints([hq, hkv, hkv])], 3, axis=-1)
            q, k, v = (t if bias is None else b.one("Add", [t, b.init(f"l{i}.b{name}", bias, True)])
                       for name, t, bias in (("q", q, lw.bq), ("k", k, lw.bk), ("v", v, lw.bv)))
        else:
            q = b.linear(f"l{i}.wq", lw.wq, h, lw.bq)
            k = b.linear(f"l{i}.wk", lw.wk, h, lw.bk)
            v = b.linear(f"l{i}.wv", lw.wv, h, lw.bv)
        # RotaryEmbedding reads (1, T, heads*hd)
        rot = {}
        for name, t, n in (("q", q, heads), ("k", k, kv_heads)):
            t3 = b.one("Unsqueeze", [t, b.ints([0])])
            rot[name] = b.one("RotaryEmbedding", [t3, "position_ids", "cos", "sin"], MS, interleaved=0, num_heads=n)
        # the prompt's keys and values as the cache holds them: (kv_heads, T, hd)
        k_new = b.one("Transpose", [b.one("Reshape", [rot["k"], b.ints([-1, kv_heads, hd])])], perm=[1, 0, 2])
        v_new = b.one("Transpose", [b.one("Reshape", [v, b.ints([-1, kv_heads, hd])])], perm=[1, 0, 2])
        past_k, past_v = f"past_k.{i}", f"past_v.{i}"
        inputs += [helper.make_tensor_value_info(n, kv_type, [kv_heads, "P", hd]) for n in (past_k, past_v)]
        if kv_half:
            k_out, v_out = b.one("Cast", [k_new], to=kv_type), b.one("Cast", [v_new], to=kv_type)
            keys = b.one("Cast", [b.one("Concat", [past_k, k_out], axis=1)], to=TensorProto.FLOAT)
            values = b.one("Cast", [b.one("Concat", [past_v, v_out], axis=1)], to=TensorProto.FLOAT)
        else:
            k_out, v_out = k_new, v_new
            keys = b.one("Concat", [past_k, k_new], axis=1)
            values = b.one("Concat", [past_v, v_new], axis=1)
        b.node("Identity", [k_out], [f"k.{i}"])
        b.node("Identity", [v_out], [f"v.{i}"])
        outputs += [helper.make_tensor_value_info(n, kv_type, [kv_heads, "T", hd]) for n in (f"k.{i}", f"v.{i}")]
        # queries (kv_heads, group*T, hd): head kv*group + g, token t at row g*T + t
        qh = b.one("Reshape", [rot["q"], b.ints([-1, kv_heads, group, hd])])
        qh = b.one("Reshape", [b.one("Transpose", [qh], perm=[1, 2, 0, 3]), b.ints([kv_heads, -1, hd])])
        scores = b.one("MatMul", [qh, b.one("Transpose", [keys], perm=[0, 2, 1])])
        scores = b.one("Add", [b.one("Mul", [scores, "attn_scale"]), "mask"])
        probs = b.one("Softmax", [scores], axis=-1)
        att = b.one("MatMul", [probs, values])                                   # (kv_heads, group*T, hd)
        att = b.one("Reshape", [att, b.ints([kv_heads, group, -1, hd])])
        att = b.one("Reshape", [b.one("Transpose", [att], perm=[2, 0, 1, 3]), b.ints([-1, hq])])
        o = b.linear(f"l{i}.wo", lw.wo, att, lw.bo)
        h, _, _, x = b.node("SkipSimplifiedLayerNormalization",
                            [o, x, b.init(f"norm.{i}.ffn", lw.ffn_norm, True)], 4, MS, epsilon=eps)
        f = lw.w_down.shape[1]
        if lw.w_gate_up is not None:
            gate, up = b.node("Split", [b.linear(f"l{i}.w_gate_up", lw.w_gate_up, h), b.ints([f, f])], 2, axis=-1)
        else:
            gate, up = b.linear(f"l{i}.w_gate", lw.w_gate, h), b.linear(f"l{i}.w_up", lw.w_up, h)
        down = b.linear(f"l{i}.w_down", lw.w_down, _activation(b, c.act_kind, gate, up))
        if i + 1 < len(layers):
            h, _, _, x = b.node("SkipSimplifiedLayerNormalization",
                                [down, x, b.init(f"norm.{i + 1}", layers[i + 1].attn_norm, True)], 4, MS, epsilon=eps)
        else:
            b.node("Add", [down, x], ["y"])
    outputs.insert(0, helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", c.hidden_size]))
    return _finish(b, inputs, outputs)


def matmul(w) -> Graph:
    """One weight's product as the prefill graph computes it: x (T, cols) f32 -> y (T, rows) f32 = x @ w.T
    (the planner times it)."""
    b = _Builder()
    rows, cols = w.shape
    b.node("Identity", [b.linear("w", w, "x")], ["y"])
    return _finish(b, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", cols])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", rows])])


def _finish(b: _Builder, inputs: list, outputs: list) -> Graph:
    graph = helper.make_graph(b.nodes, "pocketinfer_prefill", inputs, outputs)
    small = {n: a for n, a in b.inits.items() if a.nbytes <= 64}
    graph.initializer.extend(helper.make_tensor(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape, a.ravel().tolist())
                             for n, a in small.items())
    graph.initializer.extend(_external(n, a) for n, a in b.inits.items() if n not in small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="pocketinfer")
    model.ir_version = 10
    return Graph(model, {n: a for n, a in b.inits.items() if n not in small}, b.extra)


PLACEHOLDER = "weights.placeholder"


def _external(name: str, a: np.ndarray) -> TensorProto:
    """An initializer whose data ORT takes from memory we hand it (SessionOptions.add_initializer). The
    proto names external data in PLACEHOLDER, a sparse file of zeros beside the model file that ORT
    checks for but does not read: add_initializer uses our array in place, where
    add_external_initializers (ORT 1.32) copies it."""
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(a.dtype)
    t.dims.extend(a.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(a.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t
