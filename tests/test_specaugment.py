"""SpecAugment (serinus.model.specaugment): NeMo's vectorised masks, training only, inside the valid length."""

import math

import pytest
import torch
import yaml

from conftest import REFERENCE
from serinus.model.specaugment import SpecAugment, SpecAugmentConfig


def _runs(flags: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, n = [], 0
    for f in flags.tolist() + [False]:
        if f:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _augment(cfg, x, lengths, seed=0):
    aug = SpecAugment(cfg).train()
    torch.manual_seed(seed)
    return aug(x.clone(), lengths)


def test_identity_in_eval():
    aug = SpecAugment(SpecAugmentConfig()).eval()
    x = torch.randn(2, 128, 50)
    assert aug(x, torch.tensor([50, 30])) is x


def test_masks_only_within_lengths_and_bounds_hold():
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=27, time_masks=5, time_width=20)
    B, F, T = 64, 80, 300
    lengths = torch.randint(150, T + 1, (B,))
    x = torch.rand(B, F, T) + 1.0  # no zeros anywhere, padding included
    out = _augment(cfg, x, lengths)
    masked = out == 0
    valid = torch.arange(T)[None, :] < lengths[:, None]
    assert not masked.transpose(1, 2)[~valid].any()  # nothing past the length
    assert torch.equal(out[~masked], x[~masked])  # the rest untouched
    assert masked.any()
    for b in range(B):
        n = int(lengths[b])
        m = masked[b, :, :n]
        cols = m.all(dim=0)  # time bands cover every bin (the freq bands leave bins free)
        rows = m.all(dim=1)  # freq bands cover every valid frame (the time bands leave frames free)
        assert torch.equal(m, rows[:, None] | cols[None, :])  # only whole bands
        # each band is narrower than the max width, so a run of r masked frames (bins) takes at least
        # ceil(r / (max - 1)) bands, and there are only so many
        assert sum(math.ceil(r / (cfg.time_width - 1)) for r in _runs(cols)) <= cfg.time_masks
        assert sum(math.ceil(r / (cfg.freq_width - 1)) for r in _runs(rows)) <= cfg.freq_masks


def test_fractional_time_width_scales_with_length():
    cfg = SpecAugmentConfig(freq_masks=0, time_masks=1, time_width=0.1)
    B = 400
    lengths = torch.tensor([60, 1000]).repeat(B // 2)
    out = _augment(cfg, torch.ones(B, 4, 1000), lengths, seed=1)
    widths = (out[:, 0] == 0).sum(dim=1).float()
    short, long = widths[lengths == 60], widths[lengths == 1000]
    assert short.max() < 6 and long.max() < 100  # width < time_width * length
    assert 40 < long.mean() < 60 and 1.5 < short.mean() < 3.5  # ~uniform below the max: floor(u * 0.1 L)
    assert long.max() >= 90


def test_absolute_width_on_a_short_utterance_stays_inside():
    cfg = SpecAugmentConfig(freq_masks=0, time_masks=5, time_width=50)
    out = _augment(cfg, torch.ones(32, 4, 40), torch.full((32,), 7))
    assert not (out[:, :, 7:] == 0).any() and (out[:, :, :7] == 0).any()


def test_seeded_runs_repeat():
    cfg = SpecAugmentConfig()
    x, lengths = torch.rand(4, 128, 200) + 1, torch.tensor([200, 150, 90, 10])
    assert torch.equal(_augment(cfg, x, lengths, 7), _augment(cfg, x, lengths, 7))
    assert not torch.equal(_augment(cfg, x, lengths, 7), _augment(cfg, x, lengths, 8))


def test_from_nemo():
    nemo = yaml.safe_load((REFERENCE / "tiny_canary2" / "model_config.yaml").read_text())["spec_augment"]
    assert SpecAugmentConfig.from_nemo(nemo) == SpecAugmentConfig(2, 27, 10, 0.05)
    frames = SpecAugmentConfig.from_nemo({"freq_masks": 1, "time_masks": 2, "time_width": 25})
    assert frames.time_width == 25 and not frames.adaptive_time_width and frames.freq_width == 10
    assert SpecAugmentConfig.from_nemo(None) is None
    assert SpecAugmentConfig.from_nemo({"freq_masks": 0, "time_masks": 0}) is None
    with pytest.raises(ValueError, match="fraction"):
        SpecAugmentConfig.from_nemo({"time_masks": 2, "time_width": 1.5})
