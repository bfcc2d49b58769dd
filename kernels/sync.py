"""Work sharing for threads inside one numba parallel region (kernels/decode_token.py).

A step is a list of n work items (row chunks of a matvec, attention heads, ...), split into one
contiguous region per thread: thread t owns items [n*t/T, n*(t+1)/T). `take` gives a thread the next
item of its own region, front to back, and once that is exhausted steals items of the other regions
from their back end. `finish` counts an item done after its results are stored, and `wait` spins
until all n are done. Nothing waits for a *thread*: a thread that runs alone (or is descheduled) never
blocks the other, which takes the remaining items itself, and the same code is correct on one thread.
So a step's results are complete once wait returns, and the caller never reuses a buffer within a
region (no thread can still be reading it).

Why regions, not one shared counter: with items handed out in turn, the two threads read alternate
12 KB pieces of each matrix, and the hardware prefetchers, which follow a stream past the piece a
thread reads, fetch the other thread's pieces too: 2 threads then read a matrix no faster than 1,
while contiguous halves let each core's prefetchers stream its own half.

Counters: (T + 1) int64 per step, zeroed by the caller before the region. Word u of a step packs the
items taken from region u's front (low 32 bits) and back (high 32 bits); one atomic add takes from
either end, and an item is taken only while front + back < the region's size, which hands every item
out exactly once whatever the interleaving. The last word counts finished items. Each read-modify-
write is sequentially consistent and wait's load is an acquire, so every store made before an item's
finish is visible to a thread that returns from wait.

numba has no atomics, hence LLVM intrinsics (fetch_add, wait); the numpy twins are the serial
equivalents (one thread, no contention), used where numba is off.
"""

import numpy as np

from kernels import target
from kernels.backend import NUMBA, jit

_LOW = (1 << 32) - 1
_BACK = 1 << 32


def counters_size(steps: int, threads: int) -> int:
    return steps * (threads + 1)


def fetch_add_numpy(counters, i, v):
    old = int(counters[i])
    counters[i] += v
    return old


def wait_numpy(counters, i, n):
    assert counters[i] >= n, "serial code finishes every item before it waits"


if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import I32, c_array, to_i64

    def _pause(builder):
        """The spin-wait hint: x86's pause; AArch64's isb (YIELD is a no-op on cores without SMT, most Arm
        cores, while isb stalls briefly as pause does: Rust's spin_loop uses it too); nothing elsewhere."""
        void = ir.VoidType()
        if target.ARCH == "x86_64":
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(void, [])), [])
        elif target.ARCH == "aarch64":
            isb = builder.module.declare_intrinsic("llvm.aarch64.isb", fnty=ir.FunctionType(void, [I32]))
            builder.call(isb, [ir.Constant(I32, 15)])            # 15: SY, the full-system form (isb sy)

    def _word(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.gep(a.data, [to_i64(builder, args[1])])

    def _is_counters(a):
        return c_array(a, 1, types.int64)

    @intrinsic
    def fetch_add(typingctx, counters, i, v):
        """counters[i] += v atomically; returns the value before."""
        if not (_is_counters(counters) and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            return builder.atomic_rmw("add", _word(context, builder, sig, args), to_i64(builder, args[2]), "seq_cst")

        return types.int64(counters, i, v), codegen

    @intrinsic
    def wait(typingctx, counters, i, n):
        """Return once counters[i] >= n; spins, with the CPU's spin-wait hint (`_pause`) in the loop."""
        if not (_is_counters(counters) and isinstance(i, types.Integer) and isinstance(n, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ptr = _word(context, builder, sig, args)
            n64 = to_i64(builder, args[2])
            fn = builder.function
            check, spin, done = (fn.append_basic_block(f"wait.{s}") for s in ("check", "spin", "done"))
            builder.branch(check)
            builder.position_at_end(check)
            seen = builder.load_atomic(ptr, "acquire", 8)
            builder.cbranch(builder.icmp_signed("<", seen, n64), spin, done)
            builder.position_at_end(spin)
            _pause(builder)
            builder.branch(check)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return types.void(counters, i, n), codegen
else:
    fetch_add, wait = fetch_add_numpy, wait_numpy


def _make_take(fetch_add):
    """The work-sharing functions over a fetch_add: the numba intrinsic, or the serial twin."""

    def take(counters, step, t, threads, n):
        """The next item of step `step` for thread t of `threads` over n items, or -1 when none is left."""
        base = step * (threads + 1)
        lo, hi = n * t // threads, n * (t + 1) // threads
        old = fetch_add(counters, base + t, 1)
        if (old & _LOW) + (old >> 32) < hi - lo:
            return lo + (old & _LOW)
        for k in range(1, threads):
            u = (t + k) % threads
            lo, hi = n * u // threads, n * (u + 1) // threads
            old = fetch_add(counters, base + u, _BACK)
            if (old & _LOW) + (old >> 32) < hi - lo:
                return hi - 1 - (old >> 32)
        return -1

    def finish(counters, step, threads):
        """Count one item of step `step` as done (after its results are stored)."""
        fetch_add(counters, step * (threads + 1) + threads, 1)

    return take, finish


take_numpy, finish_numpy = _make_take(fetch_add_numpy)


def wait_step_numpy(counters, step, threads, n):
    """Return once n items of step `step` are done."""
    wait_numpy(counters, step * (threads + 1) + threads, n)


if NUMBA:
    take, finish = (jit(inline=True)(f) for f in _make_take(fetch_add))

    @jit(inline=True)
    def wait_step(counters, step, threads, n):
        wait(counters, step * (threads + 1) + threads, n)
else:
    take, finish, wait_step = take_numpy, finish_numpy, wait_step_numpy


def new_counters(steps: int, threads: int) -> np.ndarray:
    """(steps * (threads + 1),) int64 zeros."""
    return np.zeros(counters_size(steps, threads), dtype=np.int64)
