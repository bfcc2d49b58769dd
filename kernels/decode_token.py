"""One numba parallel region per decoded token: every layer of a model whose matrices all have the Q4,
Q5 or Q6 layout, the I8 layout with blocks of 32 or a 2:4 layout (kernels/layouts.md; Q4_0, Q4_1, Q4_K,
Q5_0, Q5_1, Q5_K, Q8_0, Q6_K, S8, S4), at most two of them per matrix group across layers, and no
biases, in one call.

Why: a kernel call per matrix and step (q|k|v, attention, o, gate|up, down) is ~150 fork/joins of the
thread team per token on SmolLM2, each a few microseconds of wake-up and of waiting for the slower
thread, with each matrix starting cold in the hardware prefetchers. Here the team starts once a token. Each thread walks the whole token; the work of each
step is split into items (row chunks, KV heads, query heads) that the threads claim from shared
counters, and a thread waits only for the items of a step to be finished (kernels/sync.py), never for
the other thread. What every thread needs whole (RMSNorm, the residual, x rounded to int8 for the
next matvec) each computes for itself into its own scratch: cheaper than a step of its own.

Steps of layer i, each with its own counters and its own output rows (nothing is overwritten within a
token, so a thread running ahead never clobbers what the other still reads):
  0 q|k|v rows            -> qkv[i]                (x normed and rounded privately first)
  1 KV heads              -> (k head norm,) RoPE of k, k and v into the cache at `pos`
  2 query heads           -> (q head norm,) RoPE of q, attention  -> attn[i]
  3 o rows                -> o_out[i]              (attn[i] rounded privately first)
  4 gate|up neuron chunks -> act[i] = act(gate) * up (the chunk's gate and up rows together)
  5 down rows             -> dn_out[i]             (act[i] rounded privately first)
and the residual x += o_out[i], then x += dn_out[i], privately (each RMS-normed first in models with
output norms, Gemma 3). Each layer has its own RoPE row and window (Gemma 3's local and global
layers), and its matrices may come from either of two stacks per group (a Q4_K_M file's Q4_K and Q6_K
down projections). x (1, hidden) gets the last layer's output. The LM head stays with the caller (one
parallel call of its own).

The arithmetic is the layer-by-layer decode's (engine/executors/stack.py: kernels/matvec.py's rowdot
products, the same RMSNorm, RoPE, attention and activation), each output element computed by one
thread in the same order whichever thread it is, so the results do not depend on the thread count.
That layer-by-layer decode is the numpy twin; tests/test_rowdot_sync.py compares the two. None when
numba is off.
"""

import numpy as np

from kernels import rowdot, sync
from kernels.activation import act_scalar
from kernels.attention import attend_head
from kernels.backend import NUMBA, jit
from kernels.kv import store
from kernels.norm import rmsnorm
from kernels.rope import rope_head

STEPS = 6            # steps per layer, each with its own counters (kernels/sync.py)
ROWS = 32            # matrix rows per work item: SmolLM2's 576-wide Q4_1 rows, ~12 KB per item


def counters_for(layers: int, threads: int) -> np.ndarray:
    """Zeroed work counters for one token (kernels/sync.py)."""
    return sync.new_counters(STEPS * layers, threads)


if NUMBA:
    from numba import prange

    @jit(inline=True)
    def _rows(counters, step, t, threads, qs, d, m, xq, xp, xc, dx, xsum, out):
        """Step `step`: out[r] = row r of the weight . x for every r, in items of ROWS rows, each row
        prefetching one a page or more ahead (rowdot.row_ahead)."""
        rows = qs.shape[0]
        items = (rows + ROWS - 1) // ROWS
        ahead = rowdot.rows_ahead(qs.shape[1] * qs.itemsize)
        c = sync.take(counters, step, t, threads, items)
        while c >= 0:
            for r in range(c * ROWS, min(rows, c * ROWS + ROWS)):
                out[r] = rowdot.row_ahead(qs, d, m, r, ahead, xq, xp, xc, dx, xsum)
            sync.finish(counters, step, threads)
            c = sync.take(counters, step, t, threads, items)
        sync.wait_step(counters, step, threads, items)

    @jit(inline=True)
    def _group_rows(counters, step, t, threads, w, a_qs, a_d, a_m, b_qs, b_d, b_m, xq, xp, xc, dx, xsum, out):
        """_rows on the layer's matrix: slot w of the group's first-layout stacks, or -1 - w of its second."""
        if w >= 0:
            _rows(counters, step, t, threads, a_qs[w], a_d[w], a_m[w], xq, xp, xc, dx, xsum, out)
        else:
            _rows(counters, step, t, threads, b_qs[-1 - w], b_d[-1 - w], b_m[-1 - w], xq, xp, xc, dx, xsum, out)

    @jit(inline=True)
    def _gate_up(counters, step, t, threads, gq, gd, gm, ffn, xq, xp, xc, dx, xsum, act, ao):
        """Step `step`: ao[n] = act(gate row n . x) * (up row ffn + n . x), ROWS neurons per item (the
        chunk's gate and up rows together)."""
        items = (ffn + ROWS - 1) // ROWS
        ahead = rowdot.rows_ahead(gq.shape[1] * gq.itemsize)
        c = sync.take(counters, step, t, threads, items)
        while c >= 0:
            for n in range(c * ROWS, min(ffn, c * ROWS + ROWS)):
                gate = rowdot.row_ahead(gq, gd, gm, n, ahead, xq, xp, xc, dx, xsum)
                up = rowdot.row_ahead(gq, gd, gm, ffn + n, ahead, xq, xp, xc, dx, xsum)
                ao[n] = act_scalar(gate, up, act)
            sync.finish(counters, step, threads)
            c = sync.take(counters, step, t, threads, items)
        sync.wait_step(counters, step, threads, items)

    @jit(inline=True)
    def _group_gate_up(counters, step, t, threads, w, a_qs, a_d, a_m, b_qs, b_d, b_m, ffn, xq, xp, xc, dx, xsum,
                       act, ao):
        """_gate_up on the layer's gate|up: slot w of the first-layout stacks, or -1 - w of the second."""
        if w >= 0:
            _gate_up(counters, step, t, threads, a_qs[w], a_d[w], a_m[w], ffn, xq, xp, xc, dx, xsum, act, ao)
        else:
            _gate_up(counters, step, t, threads, b_qs[-1 - w], b_d[-1 - w], b_m[-1 - w], ffn, xq, xp, xc, dx, xsum,
                     act, ao)

    @jit(inline=True)
    def _add_output(xt, out_row, norm_w, eps, h):
        """xt += out_row (1, hidden), RMS-normed by norm_w first when the model has output norms (h scratch)."""
        if norm_w.shape[0]:
            rmsnorm(out_row, norm_w, eps, h)
            out_row = h
        for j in range(xt.shape[1]):
            xt[0, j] += out_row[0, j]

    @jit()
    def _worker(t, threads, x, attn_norm, ffn_norm, q_norm, k_norm, post_attn, post_ffn,
                qkv_qs, qkv_d, qkv_m, qkv2_qs, qkv2_d, qkv2_m, o_qs, o_d, o_m, o2_qs, o2_d, o2_m,
                gu_qs, gu_d, gu_m, gu2_qs, gu2_d, gu2_m, dn_qs, dn_d, dn_m, dn2_qs, dn2_d, dn2_m, where,
                k_caches, v_caches, cos, sin, rope_kind, windows, pos, n_heads, n_kv, head_dim, act, eps, scale,
                counters, xs, hs, xqs, xps, xcs, dxs, xsums, scores, qkv, attn, o_out, act_out, dn_out):
        hidden = x.shape[1]
        hq, hkv = n_heads * head_dim, n_kv * head_dim
        ffn = act_out.shape[1]
        group = n_heads // n_kv
        scale = np.float32(scale)
        xt = xs[t : t + 1]                      # (1, hidden) f32 this thread's residual stream
        h = hs[t : t + 1]                       # (1, hidden) f32 its normed copy
        # This thread's rounded-x buffers as views of each width, taken once: a slice made inside a
        # loop costs an atomic reference-count update on the shared parent array per iteration, and two
        # threads updating one counter contend for its cache line at every slice, enough to make two
        # threads slower than one.
        sc = scores[t]
        xq_h, xp_h, xc_h = xqs[t, :hidden], xps[t, :hidden], xcs[t, : hidden // 4]
        dx_h, xs_h = dxs[t, : hidden // 32], xsums[t, : hidden // 32]
        xq_a, xp_a, xc_a, dx_a, xs_a = xqs[t, :hq], xps[t, :hq], xcs[t, : hq // 4], dxs[t, : hq // 32], xsums[t, : hq // 32]
        xq_f, xp_f, xc_f, dx_f, xs_f = xqs[t, :ffn], xps[t, :ffn], xcs[t, : ffn // 4], dxs[t, : ffn // 32], xsums[t, : ffn // 32]
        qk_norm = q_norm.shape[1] > 0
        for j in range(hidden):
            xt[0, j] = x[0, j]
        for i in range(len(attn_norm)):
            base = STEPS * i
            w = where[i]
            kind = rope_kind[i]
            cs, sn = cos[kind : kind + 1], sin[kind : kind + 1]
            # 0: q|k|v
            rmsnorm(xt, attn_norm[i], eps, h)
            rowdot.round_x(h[0], xq_h, xp_h, xc_h, dx_h, xs_h)
            _group_rows(counters, base, t, threads, w[0], qkv_qs, qkv_d, qkv_m, qkv2_qs, qkv2_d, qkv2_m,
                        xq_h, xp_h, xc_h, dx_h, xs_h, qkv[i])
            q = qkv[i, :hq].reshape((1, n_heads, head_dim))
            k = qkv[i, hq : hq + hkv].reshape((1, n_kv, head_dim))
            v = qkv[i, hq + hkv :].reshape((1, n_kv, head_dim))
            kc, vc = k_caches[i], v_caches[i]
            # 1: KV heads into the cache
            g = sync.take(counters, base + 1, t, threads, n_kv)
            while g >= 0:
                if qk_norm:
                    rmsnorm(k[0, g : g + 1], k_norm[i], eps, k[0, g : g + 1])
                rope_head(k, cs, sn, 0, g, k)
                for j in range(head_dim):
                    kc[g, pos, j] = store(k[0, g, j], kc)
                    vc[g, pos, j] = store(v[0, g, j], vc)
                sync.finish(counters, base + 1, threads)
                g = sync.take(counters, base + 1, t, threads, n_kv)
            sync.wait_step(counters, base + 1, threads, n_kv)
            # 2: query heads
            a = attn[i]
            hh = sync.take(counters, base + 2, t, threads, n_heads)
            while hh >= 0:
                if qk_norm:
                    rmsnorm(q[0, hh : hh + 1], q_norm[i], eps, q[0, hh : hh + 1])
                rope_head(q, cs, sn, 0, hh, q)
                attend_head(q, kc, vc, 0, hh, hh // group, pos, windows[i], scale, sc, a)
                sync.finish(counters, base + 2, threads)
                hh = sync.take(counters, base + 2, t, threads, n_heads)
            sync.wait_step(counters, base + 2, threads, n_heads)
            # 3: o
            rowdot.round_x(a.reshape(hq), xq_a, xp_a, xc_a, dx_a, xs_a)
            _group_rows(counters, base + 3, t, threads, w[1], o_qs, o_d, o_m, o2_qs, o2_d, o2_m,
                        xq_a, xp_a, xc_a, dx_a, xs_a, o_out[i])
            _add_output(xt, o_out[i : i + 1], post_attn[i], eps, h)
            # 4: gate|up and the activation
            rmsnorm(xt, ffn_norm[i], eps, h)
            rowdot.round_x(h[0], xq_h, xp_h, xc_h, dx_h, xs_h)
            _group_gate_up(counters, base + 4, t, threads, w[2], gu_qs, gu_d, gu_m, gu2_qs, gu2_d, gu2_m, ffn,
                           xq_h, xp_h, xc_h, dx_h, xs_h, act, act_out[i])
            # 5: down
            rowdot.round_x(act_out[i], xq_f, xp_f, xc_f, dx_f, xs_f)
            _group_rows(counters, base + 5, t, threads, w[3], dn_qs, dn_d, dn_m, dn2_qs, dn2_d, dn2_m,
                        xq_f, xp_f, xc_f, dx_f, xs_f, dn_out[i])
            _add_output(xt, dn_out[i : i + 1], post_ffn[i], eps, h)
        if t == 0:
            for j in range(hidden):
                x[0, j] = xt[0, j]

    @jit(parallel=True)
    def _decode_token_numba(threads, x, attn_norm, ffn_norm, q_norm, k_norm, post_attn, post_ffn,
                            qkv_qs, qkv_d, qkv_m, qkv2_qs, qkv2_d, qkv2_m, o_qs, o_d, o_m, o2_qs, o2_d, o2_m,
                            gu_qs, gu_d, gu_m, gu2_qs, gu2_d, gu2_m, dn_qs, dn_d, dn_m, dn2_qs, dn2_d, dn2_m, where,
                            k_caches, v_caches, cos, sin, rope_kind, windows, pos, n_heads, n_kv, head_dim, act,
                            eps, scale, counters, xs, hs, xqs, xps, xcs, dxs, xsums, scores, qkv, attn, o_out,
                            act_out, dn_out):
        """x (1, hidden) f32 in and out. The layers' arrays from engine/model/layout.stack_layers
        (OneRegionStacks: the norms, then per matrix group the arrays (qs or q, d, m) of its two layouts,
        then `where`), the KV caches (L, n_kv, max_seq, hd) f32 or half bits; cos, sin (kinds, hd/2) f32 of
        position `pos`, one row per RoPE; rope_kind and windows (L,) int64 each layer's RoPE row and
        sliding window (0: none); scale the attention's score scale. counters from counters_for(layers,
        threads). Scratch per thread (first axis `threads`): xs (T, hidden), hs (T, hidden), xqs and xps
        (T, C) int8, xcs (T, C/4) int32, dxs and xsums (T, C/32), scores (T, >= pos + 1), all f32 unless
        said, C the widest matvec input. Per layer (first axis layers): qkv (L, hq + 2 hkv), attn (L, 1,
        heads, hd), o_out (L, hidden), act_out (L, ffn), dn_out (L, hidden)."""
        for t in prange(threads):
            _worker(t, threads, x, attn_norm, ffn_norm, q_norm, k_norm, post_attn, post_ffn,
                    qkv_qs, qkv_d, qkv_m, qkv2_qs, qkv2_d, qkv2_m, o_qs, o_d, o_m, o2_qs, o2_d, o2_m,
                    gu_qs, gu_d, gu_m, gu2_qs, gu2_d, gu2_m, dn_qs, dn_d, dn_m, dn2_qs, dn2_d, dn2_m, where,
                    k_caches, v_caches, cos, sin, rope_kind, windows, pos, n_heads, n_kv, head_dim, act, eps,
                    scale, counters, xs, hs, xqs, xps, xcs, dxs, xsums, scores, qkv, attn, o_out, act_out, dn_out)
        return x

    decode_token = _decode_token_numba
else:
    decode_token = None
