"""Long audio against NeMo 3.0.0: chunk boundaries (serinus.pipeline.plan), every LCS merge it made,
merged text and timestamps, hour windows (serinus.pipeline.merge) and the 1 s padding."""

import json

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import torch

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus.audio import pad_min_duration
from serinus.pipeline import merge, plan
from serinus.timestamps import TimedToken, TimedWord, Timestamps, segments_from_words

REF = REFERENCE / "tiny_canary2_v2style"
SYNTH = json.loads((REF / "chunk_merge_synthetic.json").read_text())["cases"]
RUNS = json.loads((REF / "transcribe.json").read_text())["runs"]
TOTALS = {"en_long.wav": 1231365, "en_long2.wav": 2078053}


@pytest.fixture(scope="module")
def sp():
    path = FIXTURES / "tokenizers" / "unified" / "tokenizer_spe_bpe_v1535" / "tokenizer.model"
    return spm.SentencePieceProcessor(model_file=str(path))


def test_long_files_have_the_recorded_lengths():
    for name, total in TOTALS.items():
        assert sf.info(str(AUDIO / name)).frames == total


@pytest.mark.parametrize("case", SYNTH, ids=lambda c: c["file"])
def test_chunk_boundaries(case):
    total = TOTALS[case["file"]]
    samples = np.arange(total, dtype=np.float32)
    chunks = plan.chunk_waveform(samples)
    assert chunks.chunk_size == case["chunk_size_samples"] == plan.find_chunk_size(total)
    assert chunks.starts == case["chunk_start_samples"]
    assert chunks.lengths == case["chunk_valid_lens"]
    assert chunks.audio.shape == (len(chunks.starts), chunks.chunk_size)
    for row, start, n in zip(chunks.audio, chunks.starts, chunks.lengths):
        np.testing.assert_array_equal(row[:n], samples[start : start + n])
        assert not row[n:].any()  # zero padding


def test_chunking_recorded_in_transcribe():
    seen = 0
    for run in RUNS:
        for rec in run["captured"].get("chunking", []):
            total = rec["total_samples"]
            chunks = plan.chunk_waveform(torch.zeros(total), overlap=rec["overlap_samples"])
            assert chunks.chunk_size == rec["chunk_size_samples"]
            assert chunks.starts == rec["chunk_start_samples"]
            assert chunks.lengths == rec["chunk_valid_lens"]
            assert isinstance(chunks.audio, torch.Tensor) and chunks.audio.shape[0] == len(chunks.starts)
            seen += 1
    assert seen >= 10


def test_find_chunk_size_rules():
    sr = 16000
    assert plan.find_chunk_size(40 * sr - 1) == 40 * sr - 1  # under 40 s: one chunk
    assert plan.find_chunk_size(40 * sr) == 30 * sr  # 40 s is already split: 30 s + 11 s beats 40 s + 1 s
    # 60 s: 30 s chunks leave 2 s, 31 s leave 30 s, ... 40 s chunks leave 21 s -> 31 s wins
    assert plan.find_chunk_size(60 * sr) == 31 * sr
    # brute force: the longest last chunk, the smallest size on a tie
    for total in (41 * sr, 77 * sr + 123, 3600 * sr):
        best = max(range(30, 41), key=lambda s: (total - (s - 1) * sr * (-(-total // ((s - 1) * sr)) - 1), -s))
        assert plan.find_chunk_size(total) == best * sr


def test_lcs_merges_recorded_by_nemo():
    calls = [m for c in SYNTH for mode in ("no_timestamps", "timestamps") for m in c[mode]["lcs_merges"]]
    calls += [m for run in RUNS for m in run["captured"].get("lcs_merges", [])]
    assert len(calls) >= 20
    for call in calls:
        buffer = list(call["buffer"])
        assert merge.lcs_merge(buffer, call["data"], delay=call["delay"], **call["kwargs"]) == call["result"]
        assert buffer == call["buffer"]  # inputs are not modified


def test_lcs_alignment_partial_matches():
    # complete match at the end of X: walked back to its start
    assert merge.lcs_alignment([1, 2, 3, 4], [3, 4, 5]) == (2, 0, 2)
    # a single-token match is too short to trust: nothing is cut
    assert merge.lcs_alignment([1, 2, 3, 9], [3, 7, 8]) == (3, 0, 0)
    assert merge.lcs_merge([1, 2, 3, 9], [3, 7, 8]) == [1, 2, 3, 9, 3, 7, 8]
    # a match not reaching the end of X, stretched across one mismatch
    assert merge.lcs_merge([5, 1, 2, 3, 4, 6], [1, 2, 3, 4, 7, 8]) == [5, 1, 2, 3, 4, 7, 8]
    assert merge.lcs_merge([], [1, 2]) == [1, 2]
    assert merge.lcs_merge([1, 2], [2, 3], parallel_chunking=False) == [1, 2, 3]


@pytest.mark.parametrize("case", SYNTH, ids=lambda c: c["file"])
@pytest.mark.parametrize("mode", ["no_timestamps", "timestamps"])
def test_merge_parallel_chunks_synthetic(case, mode, sp):
    rec = case[mode]
    hyps = rec["per_chunk_hypotheses"]
    if mode == "timestamps":
        tokens = [[c["token_id"] for c in h["timestamp"]["char"]] for h in hyps]
    else:
        tokens = [h["y_sequence"] for h in hyps]
    merged = merge.merge_chunk_tokens(tokens, subsampling_factor=8)
    assert sp.decode_ids(merged) == rec["merged"]["text"]
    assert [t for h in hyps for t in h["y_sequence"]] == rec["merged"]["y_sequence"]
    if mode == "timestamps":
        got = merge.merge_chunk_timestamps(
            [tokens_of(h) for h in hyps], case["encoded_len"], merged, sp.decode_pieces
        ).to_nemo()
        want = rec["merged"]["timestamp"]
        assert got == want
        for key in want:  # same key order too
            assert [list(x) for x in got[key]] == [list(x) for x in want[key]]


def _chunked_runs():
    return [r for r in RUNS if "merge_parallel_chunks" in r["captured"]]


@pytest.mark.parametrize("run", _chunked_runs(), ids=lambda r: r["name"])
def test_merge_inside_transcribe(run, sp):
    rec = run["captured"]["merge_parallel_chunks"][0]
    with_ts = bool(rec["timestamps"])
    chunks = rec["chunks"]
    tokens = [[c["token_id"] for c in h["timestamp"]["char"]] if with_ts else h["y_sequence"] for h in chunks]
    merged = merge.merge_chunk_tokens(tokens, rec["subsampling_factor"])
    assert sp.decode_ids(merged) == rec["result"]["text"]
    assert [t for h in chunks for t in h["y_sequence"]] == rec["result"]["y_sequence"]
    timestamp = None
    if with_ts:
        timestamp = merge.merge_chunk_timestamps(
            [tokens_of(h) for h in chunks], rec["encoded_len"], merged, sp.decode_pieces,
            rec["subsampling_factor"], rec["window_stride"])
        assert timestamp.to_nemo() == rec["result"]["timestamp"]
    # then merge_all_hypotheses with the file's single hour window
    text, ts = merge.merge_hour_results([rec["result"]["text"]], [timestamp] if with_ts else None, [0.0])
    assert text == run["hyps"][0]["text"]
    if with_ts:
        assert ts.to_nemo() == run["hyps"][0]["timestamp"]


def tokens_of(hyp: dict) -> list[TimedToken]:
    """A recorded chunk hypothesis' aligned tokens as records."""
    return [TimedToken(**c) for c in hyp["timestamp"]["char"]]


def test_words_and_segments_from_chars():
    def item(piece, text, s, e):
        return TimedToken(text, 0, piece, s, e, s * 0.08, e * 0.08)

    chars = [item("▁He", "He", 0, 1), item("y", "y", 1, 2), item(",", ",", 3, 3), item("▁", "", 4, 5),
             item("yo", "yo", 5, 6), item(".", ".", 6, 6), item("▁Ok", "Ok", 9, 10)]
    words = merge.words_from_chars(chars, lambda p: "".join(p).replace("▁", " ").strip())
    assert [(w.text, w.start_offset, w.end_offset) for w in words] == [("Hey,", 0, 3), ("yo.", 4, 6), ("Ok", 9, 10)]
    segments = segments_from_words(words)
    assert [(s.text, s.start_offset, s.end_offset) for s in segments] == [("Hey, yo.", 0, 6), ("Ok", 9, 10)]


def test_join_chunk_chars_shift_and_clamp():
    a = [TimedToken("a", 1, "▁a", 480, 490, 38.4, 39.2)]
    b = [TimedToken("b", 2, "▁b", 0, 5, 0.0, 0.4), TimedToken("c", 3, "▁c", 10, 12, 0.8, 0.96)]
    assert merge.chunk_frame_shifts([500, 475, 400]) == [0, 487, 949]
    out = merge.join_chunk_chars([a, b], [500, 475], merged_tokens=[1, 2, 3])
    assert [(c.start_offset, c.end_offset) for c in out] == [(480, 490), (490, 490), (497, 499)]
    assert out[2].start == 497 * 0.01 * 8  # unrounded, as NeMo
    # the greedy cursor drops tokens that are not next in the merged list
    assert [c.token_id for c in merge.join_chunk_chars([a, b], [500, 475], [1, 3])] == [1, 3]


def test_split_hours_and_hour_merge():
    sr, hour = 16000, 3600 * 16000
    assert plan.split_hours(10 * sr) == [(0, 10 * sr)]
    assert plan.split_hours(2 * hour + 5) == [(0, hour), (hour, 2 * hour), (2 * hour, 2 * hour + 5)]
    assert plan.split_hours(2 * hour) == [(0, hour), (hour, 2 * hour)]
    assert plan.split_hours(np.zeros(3)) == [(0, 3)]
    assert plan.split_hours(0) == []

    w = TimedWord("hi", 1, 2, 0.08, 0.16)
    unseen = TimedWord("x", -1, -1, -1, -1)
    text, ts = merge.merge_hour_results([" one ", "", "two"], [Timestamps([w], []), None, Timestamps([w, unseen], [])],
                                        [0.0, 3600.0, 7200.0])
    assert text == "one two"
    # k*3600 s and k*45000 frames of 80 ms (NeMo shifts offsets by 450000 an hour, 10x too many)
    assert ts.words[1] == TimedWord("hi", 90001, 90002, 7200.08, 7200.16)
    assert ts.words[2] == unseen and ts.words[0] == w
    assert merge.merge_hour_results(["a"], None, [0.0]) == ("a", None)


def test_pad_min_duration_matches_nemo_model_input():
    samples, sr = sf.read(str(AUDIO / "en_short.wav"), dtype="float32")
    assert len(samples) == 8000
    want = np.load(REF / "transcribe_arrays.npz")["en_short_bs1_greedy__model_input_audio"][0]
    padded = pad_min_duration(samples)
    np.testing.assert_array_equal(padded, want)
    assert torch.equal(pad_min_duration(torch.ones(5), 10), torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 0, 0, 0]))
    long = np.ones(20000, dtype=np.float32)
    assert pad_min_duration(long) is long
