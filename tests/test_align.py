"""CTC forced alignment (serinus.align) against NeMo 3.0.0's canary-1b-v2 style timestamps.

All inputs are the stored CTC log-probs of the tiny v2-style aligner, so no model runs here.
"""

import json
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import FIXTURES, REFERENCE
from serinus import align

REF = REFERENCE / "tiny_canary2_v2style"
BLANK = 1535
FRAME = 0.08
ALIGNMENT_GT = json.loads((REF / "alignment_gt.json").read_text())["cases"]


@pytest.fixture(scope="module")
def sp():
    path = FIXTURES / "tokenizers" / "unified" / "tokenizer_spe_bpe_v1535" / "tokenizer.model"
    return spm.SentencePieceProcessor(model_file=str(path))


class NemoStyleTokenizer:
    """The NeMo tokenizer interface (SentencePieceTokenizer) over the same model, for the duck typing."""

    def __init__(self, sp):
        self.sp = sp
        self.unk_id = sp.unk_id()

    def text_to_ids(self, text):
        return self.sp.encode_as_ids(text)

    def text_to_tokens(self, text):
        return self.sp.encode_as_pieces(text)

    def ids_to_tokens(self, ids):
        return [self.sp.id_to_piece(i) for i in ids]

    def ids_to_text(self, ids):
        return self.sp.decode_ids(ids)


@pytest.fixture(scope="module")
def ctc():
    return np.load(REF / "ctc_outputs.npz")


def _log_probs(ctc, case):
    key = case["log_probs_used"].split("[", 1)[1].rstrip("]")
    return torch.from_numpy(ctc[key])


def assert_same(got, want, where=""):
    """Identical structure, key order and types; floats equal (and certainly within 1 ms)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (where, list(got), list(want))
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert abs(got - want) < 1e-3, (where, got, want)
        assert got == want, (where, got, want)
    else:
        assert got == want and type(got) is type(want), (where, got, want)


def _tree(utt_object):
    """NeMo's Utterance tree -> [(kind, text, s_start, s_end, t_start, t_end)] without blank tokens."""
    rows = []
    for seg in utt_object["segments_and_tokens"]:
        if seg["type"] != "segment":
            continue
        rows.append(("segment", seg["text"], seg["s_start"], seg["s_end"], seg["t_start"], seg["t_end"]))
        for word in seg["words_and_tokens"]:
            if word["type"] != "word":
                continue
            rows.append(("word", word["text"], word["s_start"], word["s_end"], word["t_start"], word["t_end"]))
            for tok in word["tokens"]:
                if tok["text"] != "<b>":
                    rows.append(("token", tok["text"], tok["s_start"], tok["s_end"], tok["t_start"], tok["t_end"]))
    return rows


def _our_tree(utt):
    rows = []
    for seg in utt.segments:
        rows.append(("segment", seg.text, seg.s_start, seg.s_end, seg.t_start, seg.t_end))
        for word in seg.words:
            rows.append(("word", word.text, word.s_start, word.s_end, word.t_start, word.t_end))
            rows += [("token", t.text, t.s, t.s, t.t_start, t.t_end) for t in word.tokens]
    return rows


@pytest.mark.parametrize("case", ALIGNMENT_GT, ids=lambda c: f"{c['name']}-{c['timestamp_type']}")
def test_alignment_gt(case, sp, ctc):
    log_probs = _log_probs(ctc, case)
    (res,) = align.forced_align_batch(
        [case["text"]], log_probs[None], [log_probs.shape[0]], sp, BLANK, FRAME, case["timestamp_type"]
    )
    U = case["U_batch"][0]
    assert res.utterance.y == case["y_batch"][0][:U]
    assert res.path == case["alignments"][0]
    assert_same(res.timestamp, case["timestamp"])

    # the tree before the punctuation rule: rebuild it, since timestamp_records pins punctuation in place
    utt = align.build_utterance(" ".join(case["text"].split()), sp, log_probs.shape[0], BLANK,
                                *align._separators(case["timestamp_type"]))
    align.utterance_times(utt, res.path, FRAME)
    assert _our_tree(utt) == _tree(case["utt_objects"][0])


def test_single_utterance_entry_point_and_nemo_style_tokenizer(sp, ctc):
    case = next(c for c in ALIGNMENT_GT if c["name"] == "multi_segment" and c["timestamp_type"] == "all")
    got = align.forced_align_timestamps(case["text"], _log_probs(ctc, case), NemoStyleTokenizer(sp), BLANK)
    assert_same(got, case["timestamp"])


def test_frame_duration_is_a_parameter(sp, ctc):
    case = next(c for c in ALIGNMENT_GT if c["name"] == "en_01" and c["timestamp_type"] == "char")
    got = align.forced_align_timestamps(case["text"], _log_probs(ctc, case), sp, BLANK, 0.04, "char")
    for ours, ref in zip(got["char"], case["timestamp"]["char"]):
        if ref["token"] in align.PUNCTUATION:
            continue
        assert ours["start"] == round(round(ref["start"] / FRAME) * 0.04, 2)
        assert ours["end"] == round(round(ref["end"] / FRAME) * 0.04, 2)


def _clip_key(cut_id):
    clip = cut_id.rsplit("-", 1)[0] if cut_id.endswith("-0") else cut_id
    return clip + ("__pad1s" if clip == "en_short" else "") + "__logprobs"


def _transcribe_runs():
    runs = json.loads((REF / "transcribe.json").read_text())["runs"]
    return [r for r in runs if "ctc_batches" in r["captured"]]


@pytest.mark.parametrize("run", _transcribe_runs(), ids=lambda r: r["name"])
def test_transcribe_ctc_batches(run, sp, ctc):
    """Every aligner batch recorded inside NeMo's transcribe(): targets, paths and timestamps."""
    cap = run["captured"]
    chunked = "merge_parallel_chunks" in cap
    for i, batch in enumerate(cap["ctc_batches"]):
        ttype = "char" if batch["segment_separators"] is None else ["word", "segment"]
        texts, T = batch["gt_text_batch"], batch["T_batch"]
        for b, (text, T_b) in enumerate(zip(texts, T)):
            utt = align.build_utterance(" ".join(text.split()), sp, T_b, BLANK, *align._separators(ttype))
            assert utt.y == batch["y_batch"][b][: batch["U_batch"][b]]
            # timestamps from the recorded path
            align.utterance_times(utt, batch["alignments"][b], FRAME)
            want = cap["merge_parallel_chunks"][0]["chunks"][b] if chunked else cap["batch_outputs"][i][b]
            assert_same(align.timestamp_records(utt, sp, FRAME, ttype).to_nemo(align._normalise_types(ttype)), want["timestamp"])

        cut_ids = cap["forward"][i]["cut_ids"]
        if chunked or cut_ids is None or not all(_clip_key(c) in ctc for c in cut_ids):
            continue
        # the whole batch from the stored per-clip log-probs (NeMo's batch differs by ~1e-5)
        clips = [torch.from_numpy(ctc[_clip_key(c)]) for c in cut_ids]
        assert [len(c) for c in clips] == T
        log_probs = torch.full((len(clips), max(T), clips[0].shape[1]), align.PAD_LOGPROB)
        for b, c in enumerate(clips):
            log_probs[b, : len(c)] = c
        results = align.forced_align_batch(texts, log_probs, T, sp, BLANK, FRAME, ttype)
        for b, res in enumerate(results):
            assert res.path == batch["alignments"][b]
            assert_same(res.timestamp, cap["batch_outputs"][i][b]["timestamp"])


# --- Viterbi against a plain port of NeMo's viterbi_decoding, on random inputs with ties -----------------


def nemo_viterbi(log_probs, y, T, U):
    """NeMo 3.0.0 `viterbi_decoding`, step by step (pad id V reads a -3.4e38 column)."""
    pad = align.PAD_LOGPROB
    B, T_max, _ = log_probs.shape
    U_max = y.shape[1]
    lp = torch.cat((log_probs, pad * torch.ones((B, T_max, 1))), dim=2)
    v = pad * torch.ones((B, U_max))
    v[:, :2] = torch.gather(lp[:, 0, :], 1, y[:, :2])
    bps = torch.zeros((B, T_max, U_max), dtype=torch.int8)
    rep = y - torch.roll(y, 2, 1)
    rep[:, :2] = 1
    rep = rep == 0
    ar = torch.arange(U_max)[None]
    for t in range(1, T_max):
        e = torch.gather(lp[:, t, :], 1, y)
        e = e * (~((t >= T)[:, None] & ((ar == U[:, None]) | (ar == U[:, None] - 1)))).long()
        s1 = torch.roll(v, 1, 1)
        s1[:, 0] = pad
        s2 = torch.roll(v, 2, 1)
        s2[:, :2] = pad
        s2.masked_fill_(rep, pad)
        v, bp = torch.max(torch.stack((v, s1, s2), 2) + e[..., None], dim=2)
        bps[:, t] = bp
    paths = []
    for b in range(B):
        u = 0 if int(U[b]) == 1 else int(torch.argmax(v[b, U[b] - 2 : U[b]])) + int(U[b]) - 2
        path = [u]
        for t in range(T_max - 1, 0, -1):
            u -= int(bps[b, t, u])
            path.insert(0, u)
        paths.append(path[: int(T[b])])
    return paths


def test_viterbi_matches_nemo_on_random_batches():
    rng = random.Random(0)
    torch.manual_seed(0)
    checked = 0
    for _ in range(60):
        B, V = rng.randint(1, 4), rng.choice([3, 5, 12])
        T_list = [rng.randint(1, 16) for _ in range(B)]
        ys = []
        for T_b in T_list:
            toks = [rng.randrange(V - 1) for _ in range(rng.randint(0, min(T_b, 8)))]
            if len(toks) > 1 and rng.random() < 0.4:
                toks = [toks[0]] * len(toks)  # repeated tokens cannot skip their blank
            ys.append([V - 1] + [x for t in toks for x in (t, V - 1)])
        T, U = torch.tensor(T_list), torch.tensor([len(y) for y in ys])
        y = torch.full((B, int(U.max())), V)
        for b, yy in enumerate(ys):
            y[b, : len(yy)] = torch.tensor(yy)
        log_probs = torch.randn(B, max(T_list), V)
        if rng.random() < 0.5:
            log_probs = (log_probs * 2).round() / 2  # many exact ties
        log_probs = log_probs.log_softmax(-1) if rng.random() < 0.5 else -log_probs.abs()
        for b, T_b in enumerate(T_list):
            log_probs[b, T_b:] = align.PAD_LOGPROB
        want = nemo_viterbi(log_probs, y, T, U)
        got = align.viterbi_align(log_probs, T, y, U, time_block=rng.choice([1, 3, 256]))
        assert got == want
        checked += 1
    assert checked == 60


def test_padded_item_prefers_final_blank_on_tie():
    # one token, two frames, everything equally likely: alone the path ends on the token, in a batch with a
    # longer item (so the loop runs past its end) it ends on the final blank, exactly as NeMo
    lp = torch.zeros(1, 2, 2).log_softmax(-1)
    y = torch.tensor([[1, 0, 1]])
    alone = align.viterbi_align(lp, [2], y, [3])
    batch_lp = torch.cat((torch.cat((lp, torch.full((1, 1, 2), align.PAD_LOGPROB)), 1), torch.zeros(1, 3, 2)))
    yy = torch.cat((y, y))
    padded = align.viterbi_align(batch_lp, [2, 3], yy, [3, 3])
    assert alone == [[1, 1]] == nemo_viterbi(lp, y, torch.tensor([2]), torch.tensor([3]))
    assert padded[0] == [1, 2] == nemo_viterbi(batch_lp, yy, torch.tensor([2, 3]), torch.tensor([3, 3]))[0]


def test_segment_split_rule():
    assert align.split_segments("It is 9 a.m. and... the end. Next? Yes!") == ["It is 9 a.m.", "and...", "the end.",
                                                                                "Next?", "Yes!"]
    assert align.split_segments("a.m.x b") == ["a.m.x b"]
    assert align.split_segments("one. two", None) == ["one. two"]
