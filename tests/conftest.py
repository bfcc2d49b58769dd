import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):      # run against this checkout, and find tests/model_factory.py
    if p not in sys.path:
        sys.path.insert(0, p)

STORIES = ROOT.parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories_dir():
    if not (STORIES / "config.json").exists():
        pytest.skip(f"stories260K fixture not found at {STORIES} (it lives in ../shared beside the repo)")
    return STORIES


@pytest.fixture(params=["vnni512", "avx2", "generic", "generic-softhalf"])
def simd_code(request, monkeypatch):
    """Force the hand-written IR's code by setting kernels/target.py's flags, which an intrinsic reads
    when it generates its IR, i.e. when the test's functions compile: AVX-512 VNNI (with VBMI and VBMI2 where
    the CPU has them), AVX2, the generic
    vector IR other targets get (AArch64's code, halves converted as this target does), or the generic
    IR with halves converted by integer operations (kernels/llvm_ir.half_to_f32: x86 without F16C and
    AVX2, other architectures). Skipped where this CPU lacks the code. Returns its name."""
    from kernels import target

    code = request.param
    if (code == "avx2" and not target.AVX2) or (code == "vnni512" and not target.VNNI512):
        pytest.skip(f"numba's compile target has no {code}")
    monkeypatch.setattr(target, "AVX2", code in ("vnni512", "avx2"))
    monkeypatch.setattr(target, "VBMI", target.VBMI and code == "vnni512")
    monkeypatch.setattr(target, "VBMI2", target.VBMI2 and code == "vnni512")
    monkeypatch.setattr(target, "VNNI512", code == "vnni512")
    if code == "generic-softhalf":
        monkeypatch.setattr(target, "NATIVE_HALF", False)
    return code


@pytest.fixture(params=["hardware", "software"])
def half_code(request, monkeypatch):
    """Force how the hand-written IR converts f16 (kernels/llvm_ir.half_to_f32): one instruction, as on
    targets with hardware halves (skipped where this one has none), or integer operations, as on the
    others. Read when the test's functions compile, like simd_code. Returns its name."""
    from kernels import target

    code = request.param
    if code == "hardware" and not target.NATIVE_HALF:
        pytest.skip("this target converts halves in software")
    monkeypatch.setattr(target, "NATIVE_HALF", code == "hardware")
    return code
