"""2-D bucketing: bin estimation, the lhotse sampler with a 2-D constraint, padding, resumable state."""

import pickle

import numpy as np
import pytest

from conftest import DATA
from serinus.data import bucketing as bk
from serinus.data.tokenizers import manifest_texts, train_unified_tokenizer
from serinus.tokenizer import UnifiedTokenizer

SYNTH = [DATA / "synth-v1" / "asr_train.jsonl", DATA / "synth-v1" / "ast_train.jsonl"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # A unified tokenizer for the synthetic corpus (the fixture tokenizers lack some of its characters).
    out = train_unified_tokenizer(manifest_texts(SYNTH), tmp_path_factory.mktemp("tok"), 1700)
    return UnifiedTokenizer(out / "tokenizer.model")


@pytest.fixture(scope="module")
def cuts(tokenizer):
    return bk.attach_num_tokens(bk._as_cuts(SYNTH), tokenizer).to_eager()


def test_bins_from_lengths_small_example():
    durs = [1.0, 1.0, 1.2, 2.0, 2.0, 2.5, 3.0, 3.0]
    toks = [10, 20, 12, 20, 40, 22, 30, 60]
    bins, tps = bk.bins_from_lengths(durs, toks, num_buckets=2, num_subbuckets=2)
    assert bins == sorted(bins) and bins[-1][0] == 3.0
    # every example fits the bins it came from
    assert all(bk.find_bucket(bins, d, t) is not None for d, t in zip(durs, toks))
    assert len(tps) == len(bins)


def test_find_bucket_strict_and_lenient():
    bins = [(10, 5), (10, 10), (20, 12), (20, 18)]
    assert bk.find_bucket(bins, 8, 4) == 0 and bk.find_bucket(bins, 8, 6) == 1 and bk.find_bucket(bins, 10, 10) == 1
    assert bk.find_bucket(bins, 8, 11) is None  # strict: only the 10 s bucket's sub-buckets
    assert bk.find_bucket(bins, 8, 11, strict=False) == 2
    assert bk.find_bucket(bins, 21, 1) is None


def test_estimated_bins_give_low_padding(cuts):
    est = bk.estimate_bins_2d(cuts, None, num_buckets=16, num_subbuckets=6)
    assert est.num_examples == len(cuts) == 2176
    assert len(est.bins) <= 16 * 6 and est.bins == sorted(est.bins)
    sampler = bk.make_sampler(cuts, est.bins, batch_duration=60, max_tps=est.max_tps, seed=0)
    bucketed = bk.padding_ratio(sampler)
    rejected = sum(sampler.bucket_filter.rejected.values())
    assert bucketed.num_examples + rejected == len(cuts)  # every cut is either batched or counted
    assert rejected < 0.01 * len(cuts)
    batch = round(bucketed.num_examples / bucketed.num_batches)
    keep = bk.BucketFilter(est.bins, est.max_tps)
    baseline = bk.padding_ratio(bk.fixed_size_batches([c for c in cuts if keep(c)], batch, seed=0))
    assert bucketed.frames < 0.10 and bucketed.tokens < 0.10, bucketed
    assert baseline.frames > 0.5 and baseline.tokens > 0.5, baseline


def test_every_batch_stays_in_one_2d_bucket(cuts):
    est = bk.estimate_bins_2d(cuts, None, num_buckets=4, num_subbuckets=2)
    sizes = bk.bucket_batch_sizes(est.bins, 40.0)
    for batch in bk.make_sampler(cuts, est.bins, sizes, seed=1):
        idx = {bk.find_bucket(est.bins, c.duration, c.num_tokens) for c in batch}
        assert len(idx) == 1 and len(batch) <= sizes[idx.pop()]


def test_sampler_state_resumes_mid_epoch(cuts):
    est = bk.estimate_bins_2d(cuts, None, num_buckets=8, num_subbuckets=2)

    def sampler():
        return bk.make_sampler(cuts, est.bins, batch_duration=60, max_tps=est.max_tps, seed=7)

    full = [[c.id for c in b] for b in sampler()]
    for k in (0, 5, len(full) - 1):
        s = sampler()
        it = iter(s)
        head = [[c.id for c in next(it)] for _ in range(k)]
        state = pickle.loads(pickle.dumps(s.state_dict()))
        resumed = sampler()
        resumed.load_state_dict(state)
        assert head + [[c.id for c in b] for b in resumed] == full


def test_make_sampler_argument_errors(cuts):
    bins = [(5.0, 30), (12.0, 80)]
    with pytest.raises(ValueError, match="bucket_batch_size"):
        bk.make_sampler(cuts, bins)
    with pytest.raises(ValueError, match="2 values for 2 bins|3 values for 2 bins"):
        bk.make_sampler(cuts, bins, bucket_batch_size=[1, 2, 3])
    assert bk.bucket_batch_sizes(bins, 60, quadratic_duration=30) == [10, 3]


def test_cli_estimate(tmp_path, capsys):
    out = train_unified_tokenizer(manifest_texts(SYNTH[:1]), tmp_path, 1600)
    code = bk.main(["estimate", str(SYNTH[0]), "--tokenizer", str(out), "-b", "4", "-s", "2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "bucket_duration_bins: [[" in text and "bucketed:" in text and "shuffled fixed-size:" in text
    assert bk.main(["estimate", str(SYNTH[0]), "--tokenizer", str(tmp_path / "nope")]) == 1


@pytest.mark.parametrize("subbuckets", [1, 2])
def test_train_sampler_estimates_duration_buckets_with_token_subbuckets_only_on_request(subbuckets):
    # batch_duration without bins: num_buckets duration buckets, each split num_subbuckets times by tokens
    # (1 by default: token sub-buckets group utterances by speaking rate and domain, which learnt slower)
    import copy
    import random as _random

    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut

    from serinus.train import loop
    from serinus.train.config import DEFAULTS

    rng = _random.Random(0)
    cuts = []
    for i in range(200):
        c = dummy_cut(i, duration=rng.uniform(1.0, 8.0))
        c.num_tokens = int(c.duration * rng.uniform(5, 15))
        cuts.append(c)
    ds = copy.deepcopy(DEFAULTS["train_ds"])
    ds.update(batch_duration=20, num_buckets=4, num_subbuckets=subbuckets)
    assert DEFAULTS["train_ds"]["num_subbuckets"] == 1
    sampler = loop.build_sampler(ds, CutSet.from_cuts(cuts), 0, 1, 0)
    bins = sampler.duration_bins
    assert len(bins) == 4 * subbuckets
    assert len({d for d, _ in bins}) == 4
    seen = [c.id for batch in sampler for c in batch]
    assert sorted(seen) == sorted(c.id for c in cuts)  # every cut, once
