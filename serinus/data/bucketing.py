"""2-D bucketing: batches alike in audio duration *and* output length (NeMo's Canary recipe).

* `estimate_bins_2d` computes `[[max_duration, max_tokens], ...]` bins from data, as NeMo's
  `scripts/speech_recognition/estimate_duration_bins_2d.py`: duration buckets holding equal total
  audio, each split into sub-buckets holding equal total tokens (tokens = the prompted transcript,
  prompt + answer + EOS), after dropping tokens-per-second outliers per bucket.
* `make_sampler` is lhotse's `DynamicBucketingSampler` with a 2-D fixed-batch-size-per-bucket
  constraint (NeMo's `FixedBucketBatchSizeConstraint2D` idea; lhotse itself only has the 1-D
  `FixedBucketBatchSizeConstraint`), `bucket_batch_size` per bucket or derived from
  `batch_duration` (+ `quadratic_duration`), and a filter for cuts that fit no bucket or exceed the
  bucket's tokens-per-second ceiling. Filtered cuts are counted, by reason, never silently lost.
  Its `state_dict()` / `load_state_dict()` resume mid-epoch.
* `padding_ratio` measures padded / real audio and tokens over batches.

CLI: `serinus buckets estimate MANIFEST... --tokenizer DIR_OR_NEMO --buckets 8 --sub-buckets 2`.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import warnings
from bisect import bisect_left
from itertools import islice
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
from lhotse.dataset.sampling.base import EpochDiagnostics
from lhotse.dataset.sampling.dynamic_bucketing import DynamicBucketingSampler, FixedBucketBatchSizeConstraint

from serinus.data.dataset import DataError, PromptedBatch, encode_cut
from serinus.prompt import PromptFormat, get_format


def _ceil3(x: float) -> float:
    # Bins are printed with 3 decimals; round *up* so every example a bin was built from fits in it.
    return math.ceil(round(x * 1000, 6)) / 1000


# ---------------------------------------------------------------------------------------------
# Measuring cuts


def _as_cuts(data, langs=None):
    """A CutSet from a manifest path / `Manifest` / list of paths, or the cuts given."""
    import os

    from serinus.data.manifest import Manifest, manifest_to_cuts, manifests_to_cuts

    if isinstance(data, (str, os.PathLike, Manifest)):
        return manifest_to_cuts(data, langs)
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (str, os.PathLike, Manifest)):
        return manifests_to_cuts(data, langs)
    return data


def attach_num_tokens(
    cuts, tokenizer, prompt_format: str | PromptFormat = "canary2", slot_defaults: Mapping | None = None,
    allow_unk: bool = False,
):
    """Store each cut's prompted-transcript length as `cut.num_tokens`, so the sampler measures it once.

    Lazy CutSets stay lazy (the count happens as the sampler reads them). Text the tokenizer can only
    encode with <unk> is an error naming the manifest line, unless `allow_unk`.
    """
    fmt = get_format(prompt_format)
    unk = frozenset(i for i, p in enumerate(tokenizer.vocab) if p == "<unk>")

    def attach(cut):
        cut.num_tokens = len(encode_cut(cut, tokenizer, fmt, slot_defaults, unk, allow_unk=allow_unk).input_ids)
        return cut

    return cuts.map(attach)


def measure(cuts) -> tuple[np.ndarray, np.ndarray]:
    """(durations, num_tokens) of cuts that went through `attach_num_tokens`."""
    durs, toks = [], []
    for c in cuts:
        durs.append(c.duration)
        toks.append(_num_tokens(c))
    return np.asarray(durs, dtype=np.float64), np.asarray(toks, dtype=np.int64)


def _num_tokens(cut) -> int:
    custom = cut.custom or {}
    if "num_tokens" not in custom:
        raise DataError(f"cut {cut.id} has no num_tokens: pass the cuts through attach_num_tokens() first")
    return custom["num_tokens"]


# ---------------------------------------------------------------------------------------------
# Estimating bins


@dataclass
class Bins2D:
    bins: list[tuple[float, int]]  # [(max_duration, max_tokens), ...], sorted
    max_tps: list[float]  # per bin: tokens-per-second ceiling of its duration bucket (outlier filter)
    num_examples: int = 0  # examples the bins were estimated from
    num_rejected: int = 0  # examples outside [min_duration, max_duration]

    def __str__(self) -> str:
        return "[" + ",".join(f"[{d:.3f},{t:d}]" for d, t in self.bins) + "]"


def _find_non_outliers(tps: np.ndarray, threshold: float) -> np.ndarray:
    # One-sided z-score, as NeMo: only long-transcript outliers hurt (OOM); short ones are harmless.
    std = tps.std()
    if std == 0:
        return np.arange(len(tps))
    return np.where((tps - tps.mean()) / std <= threshold)[0]


def bins_from_lengths(
    durations: Sequence[float],
    num_tokens: Sequence[int],
    num_buckets: int = 30,
    num_subbuckets: int = 2,
    max_duration: float | None = None,
    token_outlier_threshold: float = 4.0,
) -> tuple[list[tuple[float, int]], list[float]]:
    """NeMo's 2-D bin estimation on measured lengths; returns (bins, per-bin max tokens-per-second).

    Duration buckets hold equal total audio (so buckets run dry evenly during an epoch); equal
    edges (skewed data) merge into one bucket with proportionally more sub-buckets. Each bucket's
    token sub-buckets hold equal total tokens, after dropping its tokens-per-second outliers
    (one-sided z-score above `token_outlier_threshold`).

    Differences from NeMo's script, both so that every non-outlier example fits the bins it was
    estimated from: bin durations are rounded up (not to nearest) to 3 decimals, and token
    sub-bins come from the examples the sampler will put in that duration bucket (the script reads
    from the bucket's start to the end of the data, through a stale loop index).
    """
    if num_buckets < 1 or num_subbuckets < 1:
        raise ValueError(f"need at least one bucket and sub-bucket, got {num_buckets} x {num_subbuckets}")
    if len(durations) < num_buckets * num_subbuckets:
        raise ValueError(f"{len(durations)} examples are too few for {num_buckets} x {num_subbuckets} buckets")
    sizes = np.asarray(durations, dtype=np.float64)
    toks = np.asarray(num_tokens, dtype=np.int64)
    if (sizes <= 0).any():
        raise ValueError("durations must be positive")
    top = _ceil3(sizes.max()) if max_duration is None or math.isinf(max_duration) else float(max_duration)

    # Duration edges: split the sorted durations into buckets of equal total audio.
    size_per_bucket = sizes.sum() / num_buckets
    edges, tot = [], 0.0
    for size in np.sort(sizes):
        if tot > size_per_bucket:
            edges.append(_ceil3(size))
            tot = 0.0
        tot += size
    uppers = sorted(set(e for e in edges if e < top)) + [top]
    multiplicity = [max(1, sum(e == u for e in edges) + (u == top)) for u in uppers]

    bins: list[tuple[float, int]] = []
    tps_ceilings: list[float] = []
    assign = np.searchsorted(np.asarray(uppers), sizes, side="left")  # the sampler's rule: dur <= upper
    for k, upper in enumerate(uppers):
        sel = assign == k
        if not sel.any():
            continue
        t_all, d_all = toks[sel], sizes[sel]
        keep = _find_non_outliers(t_all / d_all, token_outlier_threshold)
        t, d = t_all[keep], d_all[keep]
        max_tps = float((t / d).max())
        t = np.sort(t)
        per_sub, acc = t.sum() / (num_subbuckets * multiplicity[k]), 0
        for n in t:
            if acc > per_sub and (not bins or bins[-1] != (upper, int(n))):
                bins.append((upper, int(n)))
                tps_ceilings.append(max_tps)
                acc = 0
            acc += n
        if not bins or bins[-1] != (upper, int(t[-1])):
            bins.append((upper, int(t[-1])))
            tps_ceilings.append(max_tps)
    return bins, tps_ceilings


def estimate_bins_2d(
    data,
    tokenizer,
    num_buckets: int = 30,
    num_subbuckets: int = 2,
    min_duration: float | None = None,
    max_duration: float | None = None,
    prompt_format: str | PromptFormat = "canary2",
    slot_defaults: Mapping | None = None,
    num_examples: int = -1,
    token_outlier_threshold: float = 4.0,
) -> Bins2D:
    """Bins for `data` (manifest path(s), a `Manifest`, or cuts), measuring tokens with `tokenizer`
    (`tokenizer=None`: the cuts already carry `num_tokens`)."""
    cuts = _as_cuts(data)
    if tokenizer is not None:
        cuts = attach_num_tokens(cuts, tokenizer, prompt_format, slot_defaults)
    if num_examples > 0:
        cuts = islice(cuts, num_examples)
    durs, toks = measure(cuts)
    ok = np.ones(len(durs), dtype=bool)
    if min_duration is not None:
        ok &= durs >= min_duration
    if max_duration is not None:
        ok &= durs <= max_duration
    bins, tps = bins_from_lengths(
        durs[ok], toks[ok], num_buckets, num_subbuckets, max_duration, token_outlier_threshold
    )
    return Bins2D(bins, tps, int(ok.sum()), int((~ok).sum()))


# ---------------------------------------------------------------------------------------------
# Sampling


def find_bucket(bins: Sequence[Sequence[float]], duration: float, num_tokens: int, strict: bool = True) -> int | None:
    """Index of the smallest bin that holds (duration, num_tokens), or None.

    strict: only the sub-buckets of the duration bucket the example falls in are considered (an
    example with too many tokens for it does not fit). Otherwise the first bin with room in both
    dimensions is taken, possibly a longer-duration one, at the cost of more padding.
    """
    if strict:
        durs = [b[0] for b in bins]
        lo = bisect_left(durs, duration)
        hi = lo
        while hi < len(bins) and bins[hi][0] == bins[lo][0]:
            hi += 1
        for i in range(lo, hi):
            if num_tokens <= bins[i][1]:
                return i
        return None
    for i, (d, t) in enumerate(bins):
        if duration <= d and num_tokens <= t:
            return i
    return None


@dataclass
class FixedBucketBatchSize2D(FixedBucketBatchSizeConstraint):
    """lhotse's fixed batch size per bucket, with (duration, num_tokens) buckets.

    Cuts must carry `num_tokens` (see `attach_num_tokens`). `max_seq_len_buckets` are the 2-D bins.
    """

    strict_2d: bool = True

    def measure_length(self, example) -> tuple[float, int]:
        return example.duration, _num_tokens(example)

    def select_bucket(self, buckets=None, example=None, example_len=None) -> int:
        dur, toks = self.measure_length(example) if example_len is None else example_len
        idx = find_bucket(self.max_seq_len_buckets, dur, toks, self.strict_2d)
        return len(self.max_seq_len_buckets) if idx is None else idx  # == "no bucket" for lhotse


class BucketFilter:
    """Sampler filter: keeps cuts that fit a bucket and its tokens-per-second ceiling; counts the rest."""

    def __init__(self, bins, max_tps=None, min_duration=None, max_duration=None, strict_2d=True):
        self.bins = [tuple(b) for b in bins]
        if max_tps is not None and not isinstance(max_tps, (int, float)) and len(max_tps) != len(self.bins):
            raise ValueError(f"max_tps has {len(max_tps)} values for {len(self.bins)} bins")
        self.max_tps = max_tps
        self.min_duration, self.max_duration, self.strict_2d = min_duration, max_duration, strict_2d
        self.rejected: dict[str, int] = {}  # reason -> count, over the sampler's lifetime

    def _reject(self, reason: str) -> bool:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return False

    def __call__(self, cut) -> bool:
        dur, toks = cut.duration, _num_tokens(cut)
        if self.min_duration is not None and dur < self.min_duration:
            return self._reject("shorter than min_duration")
        if self.max_duration is not None and dur > self.max_duration:
            return self._reject("longer than max_duration")
        idx = find_bucket(self.bins, dur, toks, self.strict_2d)
        if idx is None:
            return self._reject("fits no bucket")
        if self.max_tps is not None:
            ceiling = self.max_tps if isinstance(self.max_tps, (int, float)) else self.max_tps[idx]
            if toks / dur > ceiling:
                return self._reject("tokens-per-second above the bucket's max_tps")
        return True


class BucketingSampler(DynamicBucketingSampler):
    """lhotse's DynamicBucketingSampler whose state_dict() also works with our 2-D constraint.

    lhotse refuses to save samplers with a custom constraint because it cannot serialise one; ours
    is fully given by the constructor arguments, so the rest of the state is all that is needed.
    """

    bucket_filter: BucketFilter | None = None

    def state_dict(self) -> dict:
        constraint, self.constraint = self.constraint, None
        try:
            return super().state_dict()
        finally:
            self.constraint = constraint

    def _fast_forward(self) -> None:
        # lhotse 1.33 counts every filtered-out cut as a "discarded batch" and, when resuming, skips
        # kept + discarded batches, i.e. too many. Skip exactly the batches that were yielded.
        epoch = self.diagnostics.current_epoch
        num_batches = self.diagnostics.current_epoch_stats.kept_batches
        self.set_epoch(epoch)
        self.diagnostics.stats_per_epoch[epoch] = EpochDiagnostics(epoch=epoch)
        self._just_restored_state = False
        iter(self)
        for _ in range(num_batches):
            next(self)
        self._just_restored_state = True

    def rejection_report(self) -> str:
        f = self.bucket_filter
        if f is None or not f.rejected:
            return "no cuts filtered out"
        return "filtered out: " + ", ".join(f"{n} {why}" for why, n in f.rejected.items())


def bucket_batch_sizes(bins, batch_duration: float, quadratic_duration: float | None = None) -> list[int]:
    """Per-bucket batch size from a duration budget, lhotse-style: each cut costs its bucket's max
    duration d (plus d**2 / quadratic_duration, for attention's quadratic cost)."""
    sizes = []
    for d, _ in bins:
        cost = d + (d * d / quadratic_duration if quadratic_duration else 0.0)
        sizes.append(max(1, int(batch_duration // cost)))
    return sizes


def make_sampler(
    cuts,
    bins: Sequence[Sequence[float]],
    bucket_batch_size: Sequence[int] | None = None,
    batch_duration: float | None = None,
    quadratic_duration: float | None = None,
    max_tps: float | Sequence[float] | None = None,
    min_duration: float | None = None,
    max_duration: float | None = None,
    strict_2d: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    buffer_size: int = 20000,
    world_size: int | None = None,
    rank: int | None = None,
) -> BucketingSampler:
    """A 2-D bucketing sampler over `cuts` (which must carry `num_tokens`: see `attach_num_tokens`).

    Give either `bucket_batch_size` (one per bin, e.g. from the OOMptimizer) or `batch_duration`
    (seconds of audio per batch, optionally with `quadratic_duration`). Yields CutSets.
    """
    bins = [(float(d), int(t)) for d, t in bins]
    if sorted(bins) != bins:
        raise ValueError("bins must be sorted by duration, then tokens")
    if bucket_batch_size is None:
        if batch_duration is None:
            raise ValueError("give bucket_batch_size (one per bin) or batch_duration")
        bucket_batch_size = bucket_batch_sizes(bins, batch_duration, quadratic_duration)
    if len(bucket_batch_size) != len(bins):
        raise ValueError(f"bucket_batch_size has {len(bucket_batch_size)} values for {len(bins)} bins")
    constraint = FixedBucketBatchSize2D(
        max_seq_len_buckets=bins, batch_sizes=list(bucket_batch_size), strict_2d=strict_2d
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
        sampler = BucketingSampler(
            cuts,
            constraint=constraint,
            duration_bins=bins,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            buffer_size=buffer_size,
            world_size=world_size,
            rank=rank,
        )
    sampler.bucket_filter = BucketFilter(bins, max_tps, min_duration, max_duration, strict_2d)
    sampler.filter(sampler.bucket_filter)
    return sampler


def fixed_size_batches(cuts, batch_size: int, seed: int = 0) -> list[list]:
    """The baseline: shuffled cuts cut into batches of `batch_size` (the last may be smaller)."""
    cuts = list(cuts)
    random.Random(seed).shuffle(cuts)
    return [cuts[i : i + batch_size] for i in range(0, len(cuts), batch_size)]


# ---------------------------------------------------------------------------------------------
# Padding


@dataclass
class PaddingStats:
    num_batches: int = 0
    num_examples: int = 0
    audio_real: float = 0.0  # seconds (or samples for PromptedBatch input)
    audio_total: float = 0.0  # batch size x longest, summed over batches
    tokens_real: int = 0
    tokens_total: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def frames(self) -> float:
        """Padded / real audio."""
        return (self.audio_total - self.audio_real) / self.audio_real if self.audio_real else 0.0

    @property
    def tokens(self) -> float:
        """Padded / real tokens (prompted transcripts)."""
        return (self.tokens_total - self.tokens_real) / self.tokens_real if self.tokens_real else 0.0

    def __str__(self) -> str:
        mean_bs = self.num_examples / max(self.num_batches, 1)
        return (
            f"{self.num_batches} batches, {self.num_examples} examples (mean batch {mean_bs:.1f}): "
            f"padding {self.frames:.1%} of audio frames, {self.tokens:.1%} of tokens"
        )


def padding_ratio(batches: Iterable) -> PaddingStats:
    """Padding over batches: each a `PromptedBatch`, or a list/CutSet of cuts carrying `num_tokens`."""
    s = PaddingStats()
    for batch in batches:
        if isinstance(batch, PromptedBatch):
            a = batch.audio_lens.double().numpy()
            t = batch.prompted_transcript_lens.numpy()
        else:
            cuts = list(batch)
            a = np.array([c.duration for c in cuts])
            t = np.array([_num_tokens(c) for c in cuts])
        if len(a) == 0:
            continue
        s.num_batches += 1
        s.num_examples += len(a)
        s.batch_sizes.append(len(a))
        s.audio_real += float(a.sum())
        s.audio_total += float(a.max()) * len(a)
        s.tokens_real += int(t.sum())
        s.tokens_total += int(t.max()) * len(t)
    return s


# ---------------------------------------------------------------------------------------------
# Tokenizer lookup for the CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serinus buckets", description="2-D (duration x tokens) bucketing.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate", help="Estimate bucket_duration_bins from manifests and report padding.")
    e.add_argument("manifests", nargs="+", help="NeMo JSONL manifests")
    e.add_argument("--tokenizer", required=True, help=".nemo file, model folder, or tokenizer folder")
    e.add_argument("-b", "--buckets", type=int, default=30, help="duration buckets (default 30, as NeMo)")
    e.add_argument("-s", "--sub-buckets", type=int, default=2,
                   help="token-length sub-buckets per duration bucket (default 2; ~6 for mixed ASR/AST data)")
    e.add_argument("-l", "--min-duration", type=float, help="drop shorter examples (seconds)")
    e.add_argument("-u", "--max-duration", type=float, help="drop longer examples (seconds)")
    e.add_argument("-n", "--num-examples", type=int, default=-1, help="estimate from the first N examples")
    e.add_argument("-f", "--prompt-format", default="canary2", choices=["canary", "canary2"])
    e.add_argument("--token-outlier-threshold", type=float, default=4.0,
                   help="tokens-per-second outlier filter, in standard deviations (default 4)")
    e.add_argument("--batch-duration", type=float, default=60.0, help="seconds of audio per batch (for the report)")
    e.add_argument("--quadratic-duration", type=float,
                   help="penalise long examples in --batch-duration: cost = d + d^2 / Q seconds")
    e.add_argument("--seed", type=int, default=0, help="seed of the shuffled baseline batches")
    args = parser.parse_args(argv)
    try:
        from serinus.tokenizer import open_tokenizer

        tokenizer = open_tokenizer(args.tokenizer)
        cuts = attach_num_tokens(_as_cuts(args.manifests), tokenizer, args.prompt_format).to_eager()
        est = estimate_bins_2d(
            cuts, None, args.buckets, args.sub_buckets, args.min_duration, args.max_duration,
            args.prompt_format, num_examples=args.num_examples, token_outlier_threshold=args.token_outlier_threshold,
        )
        sizes = bucket_batch_sizes(est.bins, args.batch_duration, args.quadratic_duration)
        sampler = make_sampler(
            cuts, est.bins, sizes, max_tps=est.max_tps, min_duration=args.min_duration,
            max_duration=args.max_duration, seed=args.seed,
        )
        bucketed = padding_ratio(sampler)
        mean_bs = max(1, round(bucketed.num_examples / max(bucketed.num_batches, 1)))
        keep = BucketFilter(est.bins, est.max_tps, args.min_duration, args.max_duration)
        kept = [c for c in cuts if keep(c)]  # the baseline batches the same cuts the sampler keeps
        baseline = padding_ratio(fixed_size_batches(kept, mean_bs, args.seed))
    except (ValueError, OSError) as err:
        print(f"serinus buckets: {err}", file=sys.stderr)
        return 1
    print(f"estimated from {est.num_examples} examples ({est.num_rejected} outside the duration range)")
    print(f"bucket_duration_bins: {est}")
    print(f"bucket_batch_size: {sizes}  (batch_duration={args.batch_duration})")
    print("max_tps: [" + ",".join(f"{t:.2f}" for t in est.max_tps) + "]")
    print(f"bucketed:            {bucketed}")
    print(f"shuffled fixed-size: {baseline}")
    print(f"sampler: {sampler.rejection_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
