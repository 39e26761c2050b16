"""Serinus: NVIDIA Canary speech models (ASR, translation, timestamps) in plain PyTorch.

    import serinus
    model = serinus.CanaryModel.from_pretrained("nvidia/canary-1b-v2")   # or a .nemo file
    hyps = model.transcribe(["audio.wav"], source_lang="en", target_lang="en", timestamps=True)
"""

__version__ = "0.1.0"

from serinus.decoding import Hypothesis  # noqa: E402
from serinus.model.canary import CanaryModel  # noqa: E402

__all__ = ["CanaryModel", "Hypothesis", "__version__"]
