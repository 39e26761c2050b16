"""The CTC model packed inside canary-1b-v2 for timestamps (NeMo's `EncDecCTCModelBPE`).

log-mel -> FastConformer encoder -> 1x1 conv to V+1 classes (blank last) -> log-probs.
Its only job here is forced alignment of the AED's output text (serinus.align).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from serinus.audio import FeatureConfig, LogMel
from serinus.model.encoder import ConformerEncoder, EncoderConfig


@dataclass
class CTCConfig:
    features: FeatureConfig
    encoder: EncoderConfig
    num_classes: int  # vocabulary size without the blank; blank id = num_classes

    @classmethod
    def from_nemo(cls, cfg: dict) -> "CTCConfig":
        decoder = cfg.get("decoder") or {}
        if not str(decoder.get("_target_", "ConvASRDecoder")).endswith("ConvASRDecoder"):
            raise ValueError(f"CTC decoder {decoder.get('_target_')!r} is not supported (ConvASRDecoder)")
        num_classes = decoder.get("num_classes", -1)
        if num_classes in (-1, None):
            num_classes = len(decoder.get("vocabulary") or [])
        return cls(
            features=FeatureConfig.from_nemo(cfg["preprocessor"]),
            encoder=EncoderConfig.from_nemo(cfg["encoder"]),
            num_classes=int(num_classes),
        )


class CTCModel(nn.Module):
    def __init__(self, cfg: CTCConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = LogMel(cfg.features)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.head = nn.Conv1d(cfg.encoder.d_model, cfg.num_classes + 1, kernel_size=1)

    @property
    def blank_id(self) -> int:
        return self.cfg.num_classes

    @property
    def frame_seconds(self) -> float:
        """Duration of one output frame: window stride x subsampling factor (0.08 s for Canary)."""
        return self.cfg.features.window_stride * self.cfg.encoder.subsampling_factor

    def forward(self, audio: Tensor, audio_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """audio [B, N] at 16 kHz -> log-probs [B, T, V+1], lengths [B]."""
        features, feature_lengths = self.preprocessor(audio, audio_lengths)
        encoded, lengths = self.encoder(features, feature_lengths)  # [B, D, T]
        return F.log_softmax(self.head(encoded).transpose(1, 2).float(), dim=-1), lengths
