"""A FastConformer CTC model (NeMo's `EncDecCTCModelBPE`): the aligner canary-1b-v2 packs for timestamps.

log-mel -> [SpecAugment, training only] -> FastConformer encoder -> 1x1 conv to V+1 classes
(blank last) -> log-probs. Here it force-aligns the AED's output text (serinus.align); `ctc_loss`
also serves the CTC head of a Canary model trained with a joint CTC + attention loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from serinus.audio import FeatureConfig, LogMel
from serinus.model.encoder import ConformerEncoder, EncoderConfig
from serinus.model.specaugment import SpecAugment, SpecAugmentConfig


@dataclass
class CTCConfig:
    features: FeatureConfig
    encoder: EncoderConfig
    num_classes: int  # vocabulary size without the blank; blank id = num_classes
    spec_augment: SpecAugmentConfig | None = None

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
            spec_augment=SpecAugmentConfig.from_nemo(cfg.get("spec_augment")),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CTCConfig":
        spec = d.get("spec_augment")
        return cls(
            features=FeatureConfig(**d["features"]),
            encoder=EncoderConfig(**d["encoder"]),
            num_classes=d["num_classes"],
            spec_augment=SpecAugmentConfig(**spec) if spec is not None else None,
        )


class CTCModel(nn.Module):
    def __init__(self, cfg: CTCConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer  # its vocabulary (a SentencePiece UnifiedTokenizer); not a sub-module
        self.preprocessor = LogMel(cfg.features)
        self.spec_augment = SpecAugment(cfg.spec_augment) if cfg.spec_augment is not None else None
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
        """audio [B, N] at 16 kHz -> log-probs [B, T, V+1] (float32), lengths [B]."""
        features, feature_lengths = self.preprocessor(audio, audio_lengths)
        if self.spec_augment is not None:
            features = self.spec_augment(features, feature_lengths)  # the identity in eval
        encoded, lengths = self.encoder(features, feature_lengths)  # [B, D, T]
        return F.log_softmax(self.head(encoded).transpose(1, 2).float(), dim=-1), lengths


CTC_REDUCTIONS = ("mean", "mean_batch", "mean_volume", "sum", "none")


def ctc_loss(log_probs: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor, blank: int,
             reduction: str = "mean") -> Tensor:
    """CTC loss of padded `targets` [B, S] (valid up to `target_lengths`) under `log_probs` [B, T, C]
    (valid up to `lengths`), with zero_infinity=True: an impossible target (more frames needed than
    there are) contributes 0 instead of inf.

    reduction "mean" (the default): the mean over the batch of each utterance's loss divided by its
    target length (torch's `reduction="mean"`). NeMo's `CTCLoss` names differ: its "mean_batch" (the
    EncDecCTCModel default) is the plain mean of per-utterance losses, not divided by length, and its
    "mean_volume" (the canary-1b-v2 aligner's config) is sum(loss) / sum(target_lengths); both are
    available here under those names, as are "sum" and "none" (per-utterance losses [B]).
    """
    if reduction not in CTC_REDUCTIONS:
        raise ValueError(f"unknown CTC reduction {reduction!r}; allowed: {', '.join(CTC_REDUCTIONS)}")
    per_utt = F.ctc_loss(log_probs.float().transpose(0, 1), targets.long(), lengths.long(), target_lengths.long(),
                         blank=blank, reduction="none", zero_infinity=True)
    target_lengths = target_lengths.to(per_utt.device)
    if reduction == "mean":
        return (per_utt / target_lengths.clamp(min=1).to(per_utt.dtype)).mean()
    if reduction == "mean_batch":
        return per_utt.mean()
    if reduction == "mean_volume":
        return per_utt.sum() / target_lengths.sum().clamp(min=1).to(per_utt.dtype)
    if reduction == "sum":
        return per_utt.sum()
    return per_utt
