"""kernels/target.py: what numba compiles for, read as numba itself reads it (its codegen's magic tuple:
triple, CPU name, features), under the environment variables that change numba's choice; and the
kernels' tests again on a target without hardware halves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import backend, target

REPO = Path(__file__).resolve().parent.parent

_PROBE = ("from numba.core.registry import cpu_target\n"
          "from kernels import target\n"
          "triple, _, features = cpu_target.target_context.codegen().magic_tuple()\n"
          "print(target.ARCH == target.arch_of(triple), target.FEATURES == target.features_of(features),\n"
          "      target.ARCH, target.NATIVE_HALF, target.AVX2, target.VNNI512)\n")


def test_triples_and_feature_strings():
    assert target.arch_of("x86_64-unknown-linux-gnu") == "x86_64"
    assert target.arch_of("aarch64-unknown-linux-android24") == "aarch64"
    assert target.arch_of("arm64-apple-darwin23.0.0") == "aarch64"
    assert target.arch_of("i686-pc-linux-gnu") == "other"
    assert target.arch_of("riscv64-unknown-linux-gnu") == "other"
    assert target.features_of("+avx2,-avx512f, +f16c,") == {"avx2", "f16c"}
    assert target.features_of("") == frozenset()


@pytest.mark.skipif(not backend.NUMBA, reason="without numba there is no compile target")
@pytest.mark.parametrize("env", [{}, {"NUMBA_CPU_NAME": "generic"}, {"NUMBA_CPU_FEATURES": "+avx2,+f16c,-avx512f"},
                                 {"NUMBA_ENABLE_AVX": "0"}])
def test_flags_follow_numbas_target(env):
    """In a fresh process under each setting: the architecture and features are numba's own, and the
    flags follow from them (on x86; AArch64 converts halves whatever the features say)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU") and k != "NUMBA_ENABLE_AVX"}
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env={**clean, **env},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    same_arch, same_features, arch, native_half, avx2, vnni = r.stdout.split()
    assert same_arch == same_features == "True"
    if arch == "aarch64":
        assert native_half == "True" and avx2 == vnni == "False"
    elif arch == "x86_64" and env:
        want = {"NUMBA_CPU_NAME": ("False", "False", "False"),
                "NUMBA_CPU_FEATURES": ("True", "True", "False")}.get(next(iter(env)))
        if want:
            assert (native_half, avx2, vnni) == want
        else:                                             # NUMBA_ENABLE_AVX=0: no avx* feature
            assert avx2 == vnni == "False"


# On a target without hardware halves or AVX2: the integer row dots (dense, sparse prefetching) and the
# gathered axpys in generic vector IR with integer half conversion; the dense matvecs on f32 and f16
# scales, with every tail of the four-block step and wide rows; the one-region decode; the sparse FFN's
# paths (Q4_0, Q5_0, Q6_K and Q8_0 in records, Q4 down, F16); the min terms, f16 conversions and the half KV cache.
NO_HALF_TESTS = [
    "tests/test_rowdot_sync.py::test_row_dots_against_numpy",
    "tests/test_sparse_ffn.py::test_gather_twins",
    "tests/test_kernels.py::test_matvec_q4_q5[5-576-f16-True-q4]",
    "tests/test_kernels.py::test_matvec_q4_q5[5-576-f16-False-q4]",
    "tests/test_kernels.py::test_matvec_q4_q5[3-1056-f32-False-q4]",
    "tests/test_kernels.py::test_matvec_q4_q5[5-8256-f16-False-q4]",
    "tests/test_kernels.py::test_matvec_q4_q5[5-576-f16-True-q5]",
    "tests/test_kernels.py::test_matvec_q4_q5[3-1056-f32-False-q5]",
    "tests/test_kernels.py::test_matvec_q6[5-576]",
    "tests/test_kernels.py::test_matvec_q6[3-1056]",
    "tests/test_kernels.py::test_dequant_q6[5-576]",
    "tests/test_kernels.py::test_matvec_i8[32-5-576-True-f16]",
    "tests/test_kernels.py::test_matvec_i8[32-3-1056-False-f32]",
    "tests/test_kernels.py::test_matvec_i8[32-5-8256-False-f16]",
    "tests/test_rowdot_sync.py::test_one_region_decode_matches_layer_by_layer",
    "tests/test_sparse_ffn.py::test_sparse_kernel_code_uses_the_intrinsics",
    "tests/test_sparse_ffn.py::test_layouts_random_subset[64-96-q4-f16-sym-i8-f16-32-nomin]",
    "tests/test_sparse_ffn.py::test_layouts_random_subset[64-96-i8-f16-32-nomin-i8-f16-32-nomin]",
    "tests/test_sparse_ffn.py::test_layouts_random_subset[64-96-q4-f32-q4-f16]",
    "tests/test_sparse_ffn.py::test_layouts_random_subset[64-96-f16-f16]",
    "tests/test_sparse_ffn.py::test_layouts_random_subset[64-96-q5-f16-sym-i8-f16-32-nomin]",
    "tests/test_sparse_ffn.py::test_layouts_random_subset[64-96-q6-i8-f16-32-nomin]",
    "tests/test_sparse_ffn.py::test_gathered_rows_given_gate_and_odd_blocks[96-q4-f16-sym-i8-f16-32-nomin]",
    "tests/test_kernels.py::test_min_term_twins",
    "tests/test_kernels.py::test_dequant_f16_every_pattern",
    "tests/test_kv.py::test_half_bits_match_numpy",
    "tests/test_kv.py::test_attention_over_a_half_cache",
]


@pytest.mark.slow
@pytest.mark.skipif(not backend.NUMBA, reason="numba only: without it nothing is compiled for a target")
def test_without_hardware_halves():
    """NO_HALF_TESTS again in a process whose numba compiles for the generic x86-64 CPU (NUMBA_CPU_NAME=
    generic: SSE2, no F16C, no AVX2), as on x86 CPUs before F16C: the kernels take their generic vector
    IR and every f16 value converts with integer operations. A hardware half conversion left anywhere in
    that code would crash the process (LLVM calls a runtime helper numba's JIT cannot resolve)."""
    if target.ARCH == "aarch64":
        pytest.skip("every AArch64 target converts halves in hardware: there is no such target to compile for")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU") and k != "NUMBA_ENABLE_AVX"}
    env["NUMBA_CPU_NAME"] = "generic"
    probe = subprocess.run([sys.executable, "-c", "from kernels import decode_token, target; "
                            "print(target.NATIVE_HALF, target.AVX2, decode_token.decode_token is not None)"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["False", "False", "True"], probe.stdout + probe.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *NO_HALF_TESTS],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
