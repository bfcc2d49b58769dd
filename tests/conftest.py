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
