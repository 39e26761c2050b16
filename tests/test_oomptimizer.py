"""OOMptimizer on CPU: the batch it reports trains within the budget and one more does not."""

import subprocess
import sys

import pytest

from serinus.audio import FeatureConfig
from serinus.data.oomptimizer import _peak_rss_gib, _reset_peak_rss, largest_batch, run_trial
from serinus.decoding import DecodingConfig
from serinus.model.canary import CanaryConfig, CanaryModel
from serinus.model.decoder import DecoderConfig
from serinus.model.encoder import EncoderConfig


def tiny_model():
    cfg = CanaryConfig(
        features=FeatureConfig(),
        encoder=EncoderConfig(n_layers=1, d_model=64, n_heads=2, subsampling_conv_channels=32),
        decoder=DecoderConfig(vocab_size=256, hidden_size=64, inner_size=128, num_layers=1, num_attention_heads=2,
                              max_sequence_length=128),
        decoding=DecodingConfig(),
    )
    return CanaryModel(cfg).train()


def test_largest_batch_respects_budget():
    model = tiny_model()
    run_trial(model, 1, 2.0, 16, "cpu", 100.0)  # warm-up: first-call allocations are not the batch's
    _reset_peak_rss()
    budget = _peak_rss_gib() + 0.15
    best, trials = largest_batch(model, 2.0, 16, "cpu", budget, max_batch=512, log=lambda m: None)
    assert best >= 1
    by_size = {t.batch_size: t for t in trials}
    assert by_size[best].ok and by_size[best].peak_gib <= budget
    assert best + 1 in by_size and not by_size[best + 1].ok  # the bisection tried one step above
    assert by_size[best + 1].reason in ("over budget", "out of memory")


def test_cli_prints_bucket_batch_size(tmp_path):
    import yaml

    cfg = tiny_model().cfg.to_dict()
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": cfg}))
    out = subprocess.run(
        [sys.executable, "-m", "serinus.cli", "oomptimize", "--config", str(path), "--buckets", "[[1.0, 8], [2.0, 16]]",
         "--device", "cpu", "--memory-gib", "64", "--max-batch", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "bucket_batch_size: [4, 4]" in out.stdout  # everything fits 64 GiB up to the cap


def test_bad_buckets_argument():
    out = subprocess.run([sys.executable, "-m", "serinus.cli", "oomptimize", "--config", "canary-180m-flash",
                          "--buckets", "[1, 2]", "--memory-gib", "1"], capture_output=True, text=True)
    assert out.returncode == 2 and "--buckets must be" in out.stderr
