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

# tiny_canary2_v2style carries tiny_canary2_unified's tokenizer; its reference folder has no tokenizer/prompt files.
REF = {"tiny_canary2": "tiny_canary2", "tiny_canary2_unified": "tiny_canary2_unified",
       "tiny_canary2_v2style": "tiny_canary2_unified"}


@pytest.fixture(scope="session")
def extracted(tmp_path_factory):
    """Each fixture .nemo, extracted once per test session."""
    from serinus.weights import extract_nemo

    root = tmp_path_factory.mktemp("nemo")
    return {m: extract_nemo(FIXTURES / f"{m}.nemo", root / m) for m in MODELS}


@pytest.fixture(scope="session")
def tokenizers(extracted):
    """Each fixture model's tokenizer, loaded from its extracted archive."""
    import yaml

    from serinus.tokenizer import load_tokenizer, nemo_resolver

    out = {}
    for m, d in extracted.items():
        cfg = yaml.safe_load((d / "model_config.yaml").read_text())["tokenizer"]
        out[m] = load_tokenizer(cfg, nemo_resolver(d))
    return out
