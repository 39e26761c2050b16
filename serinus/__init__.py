"""Serinus: NVIDIA Canary speech models (ASR, translation, timestamps) in plain PyTorch."""

__version__ = "0.1.0"
