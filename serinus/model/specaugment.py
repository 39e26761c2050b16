"""SpecAugment (frequency and time masks on the log-mel features), as NeMo's `SpecAugment`.

features [B, F, T], lengths [B] -> the same features with random bands set to 0.0, training only.

Semantics follow NeMo's vectorised `SpecAugment._apply_masks` (its default code path):
* per example, `time_masks` time bands and `freq_masks` frequency bands;
* each band's width is `floor(u * max_width)` with u ~ U[0, 1), so 0 <= width < max_width;
  `max_width` is `time_width` frames, or `time_width * length` when `time_width` is a fraction;
* each band's start is `floor(u * (size - width))`, with size = the example's valid length for
  time bands and F for frequency bands, so a band never reaches past the valid frames;
* the random numbers come from torch's global generator (on the features' device) in NeMo's
  order (time widths, time starts, frequency widths, frequency starts), so seeded runs repeat.
Two small guards NeMo lacks: an absolute time width is capped at the example's length (NeMo
can start a band at a negative index then, masking padding), and frames past the length are
never touched (they are 0.0 already, so for features padded with 0 nothing changes).
NeMo's SpecCutout (`rect_masks`) and a non-zero `mask_value` are not implemented.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class SpecAugmentConfig:
    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 5
    time_width: float = 0.05  # an int: frames; a float in [0, 1]: fraction of each utterance's length

    def __post_init__(self):
        if self.freq_masks < 0 or self.time_masks < 0 or self.freq_width < 0:
            raise ValueError(f"SpecAugment counts and widths must be >= 0: {self}")
        if isinstance(self.time_width, bool) or not isinstance(self.time_width, (int, float)):
            raise ValueError(f"spec_augment.time_width must be a number, got {self.time_width!r}")
        if isinstance(self.time_width, float) and not 0.0 <= self.time_width <= 1.0:
            raise ValueError(f"spec_augment.time_width={self.time_width}: a float is a fraction of the length "
                             "and must be in [0, 1]; give frames as an int")
        if isinstance(self.time_width, int) and self.time_width < 0:
            raise ValueError(f"spec_augment.time_width={self.time_width} must be >= 0")

    @property
    def adaptive_time_width(self) -> bool:
        """True when `time_width` is a fraction of each utterance's length (a float, as in NeMo)."""
        return isinstance(self.time_width, float)

    @classmethod
    def from_nemo(cls, d: dict | None) -> "SpecAugmentConfig | None":
        """Read NeMo's `spec_augment:` section (`SpectrogramAugmentation`); None when it is absent or masks
        nothing. Missing keys take NeMo's defaults (0 masks, freq_width 10, time_width 0.1)."""
        if not d:
            return None
        if int(d.get("rect_masks", 0) or 0) > 0:
            warnings.warn("spec_augment.rect_masks (SpecCutout) is not implemented; it is ignored", stacklevel=2)
        if float(d.get("mask_value", 0.0) or 0.0) != 0.0:
            warnings.warn("spec_augment.mask_value is not implemented; masks are set to 0.0", stacklevel=2)
        cfg = cls(
            freq_masks=int(d.get("freq_masks", 0) or 0),
            freq_width=int(d.get("freq_width", 10)),
            time_masks=int(d.get("time_masks", 0) or 0),
            time_width=d.get("time_width", 0.1),
        )
        return cfg if cfg.freq_masks + cfg.time_masks > 0 else None


def _bands(num: int, max_width: Tensor, size: Tensor, axis_len: int, device) -> Tensor:
    """[B, axis_len] bool: the union of `num` random bands per row.

    max_width, size: [B, 1] float; width = floor(u * max_width), start = floor(u * (size - width))."""
    batch = size.shape[0]
    width = (torch.rand((batch, num), device=device) * max_width).long()
    start = (torch.rand((batch, num), device=device) * (size - width)).long()
    idx = torch.arange(axis_len, device=device)
    inside = (idx >= start[..., None]) & (idx < (start + width)[..., None])  # [B, num, axis_len]
    return inside.any(dim=1)


class SpecAugment(nn.Module):
    def __init__(self, cfg: SpecAugmentConfig):
        super().__init__()
        self.cfg = cfg

    @torch.no_grad()
    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        """features [B, F, T], lengths [B] -> masked features (a new tensor); the input itself in eval."""
        cfg = self.cfg
        if not self.training or (cfg.freq_masks == 0 and cfg.time_masks == 0):
            return features
        batch, n_freq, n_time = features.shape
        device = features.device
        length = lengths.to(device=device, dtype=torch.float32).clamp(max=n_time)[:, None]  # [B, 1]
        valid = torch.arange(n_time, device=device)[None, :] < length  # [B, T]
        mask = torch.zeros((batch, n_freq, n_time), dtype=torch.bool, device=device)
        if cfg.time_masks:
            if cfg.adaptive_time_width:
                max_width = cfg.time_width * length
            else:
                max_width = torch.minimum(torch.full_like(length, float(cfg.time_width)), length)
            mask |= _bands(cfg.time_masks, max_width, length, n_time, device)[:, None, :]
        if cfg.freq_masks:
            max_width = torch.full_like(length, float(min(cfg.freq_width, n_freq)))
            size = torch.full_like(length, float(n_freq))
            mask |= _bands(cfg.freq_masks, max_width, size, n_freq, device)[:, :, None]
        return features.masked_fill(mask & valid[:, None, :], 0.0)
