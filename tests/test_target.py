"""kernels/target.py: what numba compiles for, read as numba itself reads it (its codegen's magic tuple:
triple, CPU name, features), under the environment variables that change numba's choice."""

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
