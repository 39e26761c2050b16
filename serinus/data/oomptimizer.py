"""OOMptimizer: the largest batch size per 2-D bucket that trains within a memory budget.

For each bucket `[max_duration, max_tokens]` it runs real training steps (forward, backward,
AdamW step) on a batch of the bucket's worst case (random audio of max_duration seconds,
random token sequences of max_tokens) and searches the batch size: doubling until a step
fails or exceeds the budget, then bisecting between the last success and the first failure.

Memory is measured, not guessed:
* GPU: `torch.cuda.max_memory_allocated` against a fraction of the device's memory; a CUDA
  out-of-memory error counts as failure.
* CPU: the process's peak resident set size (Linux VmHWM, reset before each trial) is
  compared with a budget in GiB. Give a budget below the machine's free memory.

    serinus oomptimize --config canary-180m-flash --vocab-size 5248 \\
        --buckets "[[5.0, 40], [10.0, 80], [20.0, 160]]" --memory-gib 8
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from dataclasses import dataclass

import torch

from serinus.model.canary import CanaryConfig, CanaryModel, sequence_loss

SAMPLE_RATE = 16000


@dataclass
class Trial:
    batch_size: int
    ok: bool
    peak_gib: float
    reason: str = ""


def training_step(model: CanaryModel, optimizer, batch_size: int, duration: float, tokens: int, device) -> None:
    """One forward/backward/optimizer step on a worst-case batch of the bucket."""
    generator = torch.Generator().manual_seed(0)
    samples = int(duration * SAMPLE_RATE)
    audio = (0.1 * torch.randn(batch_size, samples, generator=generator)).to(device)
    audio_lens = torch.full((batch_size,), samples, device=device)
    vocab = model.cfg.decoder.vocab_size
    seq = torch.randint(4, vocab, (batch_size, tokens + 1), generator=generator).to(device)
    token_lens = torch.full((batch_size,), tokens, device=device)
    log_probs = model(audio, audio_lens, seq[:, :-1], token_lens)
    loss = sequence_loss(log_probs, seq[:, 1:], pad_id=-1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _peak_rss_gib() -> float:
    """Peak resident set size of this process since the last reset (Linux VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0). Freed heap memory is
    handed back to the OS first (malloc_trim), or an earlier, larger trial would count again."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError(f"cannot measure peak CPU memory on this system ({e}); use a GPU or Linux") from e


def run_trial(model, batch_size: int, duration: float, tokens: int, device: str, budget_gib: float) -> Trial:
    """Two training steps (AdamW allocates its state on the first) and the peak memory they took."""
    cuda = device != "cpu"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        import gc

        gc.collect()
        _reset_peak_rss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # a trial must not change the model
    reason = ""
    try:
        for _ in range(2):
            training_step(model, optimizer, batch_size, duration, tokens, device)
        if cuda:
            torch.cuda.synchronize(device)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        reason = "out of memory"
    except RuntimeError as e:
        if "out of memory" not in str(e).lower() and "can't allocate" not in str(e).lower():
            raise
        reason = "out of memory"
    finally:
        del optimizer
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else _peak_rss_gib()
    if reason:
        return Trial(batch_size, False, peak, reason)
    return Trial(batch_size, peak <= budget_gib, peak, "" if peak <= budget_gib else "over budget")


def largest_batch(model, duration: float, tokens: int, device: str, budget_gib: float,
                  start: int = 1, max_batch: int = 4096, log=print) -> tuple[int, list[Trial]]:
    """Doubling then bisection. Returns the largest batch size that passed (0 if none) and the trials."""
    trials: list[Trial] = []

    def attempt(bs: int) -> bool:
        trial = run_trial(model, bs, duration, tokens, device, budget_gib)
        trials.append(trial)
        log(f"  batch {bs:5d}: {'ok  ' if trial.ok else 'FAIL'} peak {trial.peak_gib:6.2f} GiB {trial.reason}")
        return trial.ok

    good, bad = 0, None
    bs = start
    while bs <= max_batch:
        if attempt(bs):
            good, bs = bs, bs * 2
        else:
            bad = bs
            break
    if bad is None:
        return good, trials
    while bad - good > 1:
        mid = (good + bad) // 2
        if attempt(mid):
            good = mid
        else:
            bad = mid
    return good, trials


def oomptimize(model: CanaryModel, buckets: list[list[float]], device: str = "cpu", memory_gib: float | None = None,
               memory_fraction: float = 0.9, max_batch: int = 4096, log=print) -> list[int]:
    """`bucket_batch_size` for `buckets` ([[max_duration, max_tokens], ...])."""
    if device == "cpu":
        if memory_gib is None:
            raise ValueError("on CPU give the memory budget in GiB (--memory-gib)")
        budget = memory_gib
    else:
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        budget = memory_gib if memory_gib is not None else memory_fraction * total
    model.to(device).train()
    sizes = []
    for duration, tokens in buckets:
        log(f"bucket [{duration} s, {int(tokens)} tokens], budget {budget:.2f} GiB")
        best, _ = largest_batch(model, float(duration), int(tokens), device, budget, max_batch=max_batch, log=log)
        sizes.append(best)
    return sizes


def _load_model_for(args) -> CanaryModel:
    from serinus.model.canary import PRESETS, preset_config

    if args.config in PRESETS:
        return CanaryModel(preset_config(args.config, args.vocab_size))
    if args.config.endswith((".yaml", ".yml")):
        import yaml

        cfg = yaml.safe_load(open(args.config))
        cfg = cfg.get("model", cfg)
        if "decoder" in cfg and isinstance(cfg["decoder"], dict) and "hidden_size" in cfg["decoder"]:
            return CanaryModel(CanaryConfig.from_dict(cfg))
        return CanaryModel(CanaryConfig.from_nemo(cfg, args.vocab_size))
    return CanaryModel.from_pretrained(args.config, for_training=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="serinus oomptimize",
        description="Find, per 2-D bucket, the largest batch that trains (forward, backward, optimizer step) "
        "within a memory budget; prints bucket_batch_size for the training config.",
    )
    parser.add_argument("--config", required=True,
                        help="a preset name (canary-180m-flash, ...), a model YAML (NeMo model_config.yaml or ours), "
                        "or a checkpoint (.nemo / Serinus folder)")
    parser.add_argument("--buckets", required=True, help='bucket bins as JSON: "[[max_duration, max_tokens], ...]"')
    parser.add_argument("--vocab-size", type=int, default=16384, help="vocabulary size for presets/YAML without a tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-gib", type=float, help="memory budget in GiB (required on CPU)")
    parser.add_argument("--memory-fraction", type=float, default=0.9, help="GPU: fraction of device memory (default 0.9)")
    parser.add_argument("--max-batch", type=int, default=4096, help="largest batch size to try (default 4096)")
    args = parser.parse_args(argv)
    try:
        buckets = json.loads(args.buckets)
        if not all(isinstance(b, list) and len(b) == 2 for b in buckets):
            raise ValueError
    except ValueError:
        parser.error(f"--buckets must be a JSON list of [max_duration, max_tokens] pairs, got {args.buckets!r}")
    try:
        model = _load_model_for(args)
        sizes = oomptimize(model, buckets, args.device, args.memory_gib, args.memory_fraction, args.max_batch,
                           log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        print(f"serinus oomptimize: {e}", file=sys.stderr)
        return 2
    print(f"bucket_duration_bins: {json.dumps(buckets)}")
    print(f"bucket_batch_size: {json.dumps(sizes)}")
    return 0 if all(sizes) else 1
