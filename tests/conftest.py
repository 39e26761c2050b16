import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SERINUS_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "nemo"
REFERENCE = FIXTURES / "reference"
AUDIO = FIXTURES / "audio"
DATA = SHARED / "data"

MODELS = ["tiny_canary2", "tiny_canary2_unified", "tiny_canary2_v2style"]


def pytest_configure(config):
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"NeMo fixtures not found at {FIXTURES} (set SERINUS_SHARED to the shared/ folder)")
