"""One compiled call per decoder layer for single-token decode, when every matrix of the layer is in
the Q4 layout (kernels/layouts.md) and there are no biases.

It composes the same kernels the unfused path calls (RMSNorm, Q4 matvec, RoPE, attention, GLU), so its
numpy twin is engine/model/transformer.py's unfused forward; tests compare the two. What it removes is the Python
between kernels (dispatch, slicing, small numpy operations).
None when numba is off.
"""

import numpy as np

from kernels.activation import _glu_numba
from kernels.attention import _attention_numba
from kernels.backend import NUMBA, jit
from kernels.kv import store
from kernels.matvec import _matvec_q4_numba
from kernels.norm import _rmsnorm_numba
from kernels.rope import _rope_numba


@jit(parallel=False)
def _decode_layer_q4_numba(x, attn_norm, ffn_norm, eps,
                           qkv_qs, qkv_d, qkv_m, o_qs, o_d, o_m, gu_qs, gu_d, gu_m, dn_qs, dn_d, dn_m,
                           cos, sin, k_cache, v_cache, pos, window, n_heads, n_kv, head_dim, ffn, act,
                           h, qkv, attn, gu, tmp):
    """x (1, hidden) f32, updated in place; cos/sin (1, hd/2) for this position; k_cache/v_cache
    (n_kv, max_seq, hd) f32, position `pos` written here. Scratch: h (1, hidden), qkv (hq + 2*hkv,),
    attn (1, n_heads, hd), gu (2*ffn,), tmp (hidden,), all f32."""
    hq = n_heads * head_dim
    hkv = n_kv * head_dim
    _rmsnorm_numba(x, attn_norm, eps, h)
    _matvec_q4_numba(qkv_qs, qkv_d, qkv_m, h[0], qkv)
    q = qkv[:hq].reshape((1, n_heads, head_dim))
    k = qkv[hq:hq + hkv].reshape((1, n_kv, head_dim))
    v = qkv[hq + hkv:].reshape((1, n_kv, head_dim))
    _rope_numba(q, cos, sin, q)
    _rope_numba(k, cos, sin, k)
    for g in range(n_kv):
        for j in range(head_dim):
            k_cache[g, pos, j] = store(k[0, g, j], k_cache)
            v_cache[g, pos, j] = store(v[0, g, j], v_cache)
    _attention_numba(q, k_cache, v_cache, pos, window, attn)
    _matvec_q4_numba(o_qs, o_d, o_m, attn.reshape(hq), tmp)
    for j in range(x.shape[1]):
        x[0, j] += tmp[j]
    _rmsnorm_numba(x, ffn_norm, eps, h)
    _matvec_q4_numba(gu_qs, gu_d, gu_m, h[0], gu)
    gate = gu[:ffn].reshape((1, ffn))
    up = gu[ffn:].reshape((1, ffn))
    _glu_numba(gate, up, act, gate)
    _matvec_q4_numba(dn_qs, dn_d, dn_m, gu[:ffn], tmp)
    for j in range(x.shape[1]):
        x[0, j] += tmp[j]
    return x


decode_layer_q4 = _decode_layer_q4_numba if NUMBA else None
