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


@pytest.fixture(params=["vnni512", "avx2", "generic"])
def simd_code(request, monkeypatch):
    """Force the integer row dots' code: AVX-512 VNNI, AVX2, or the generic vector IR other targets get,
    by turning the other flags off (kernels/intdot.py reads them when an intrinsic generates its IR, i.e.
    when the test's functions compile); skipped where this CPU lacks the code. Returns its name."""
    from kernels import intdot

    code = request.param
    if (code == "avx2" and not intdot.AVX2) or (code == "vnni512" and not intdot.VNNI512):
        pytest.skip(f"this CPU has no {code}")
    monkeypatch.setattr(intdot, "AVX2", code != "generic")
    monkeypatch.setattr(intdot, "VNNI512", code == "vnni512")
    return code
