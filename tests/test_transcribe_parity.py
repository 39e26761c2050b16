"""Every recorded NeMo run, replayed end to end through the public `transcribe()`.

Each `reference/<model>/transcribe.json` run is given to `transcribe()` as NeMo was given it
(paths, a manifest or an array; its slots, timestamps and decoding config; its batch size), and
every field NeMo returned must come back: text, y_sequence, score, timestamps and n-best lists.
Serinus chunks where NeMo chunks: only with a packed CTC aligner, and then (NeMo's rule) only for
one file or batch size 1, never for an array; there the chunks, the decoded batches and every LCS
merge call must be NeMo's too.

The default overlap merge of flash-style models (no aligner, so NeMo has no chunked reference)
is checked with the real decoder: the long file's result must equal its chunks decoded one by
one and joined by the merge rules.
"""

import json
import re

import numpy as np
import pytest
import torch

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus.audio import collate_audio, load_audio
from serinus.decoding import DecodingConfig, greedy_decode, max_new_tokens
from serinus.model.canary import CanaryModel
from serinus.prompt import encode_prompt
from serinus.pipeline import decode, merge, plan
from serinus.timestamps import TimedWord, parse_timestamp_tokens, segments_from_words
from serinus.transcribe import transcribe

MODELS = ["tiny_canary2", "tiny_canary2_unified", "tiny_canary2_v2style"]
_models = {}


def get_model(name):
    if name not in _models:
        _models[name] = CanaryModel.from_pretrained(FIXTURES / f"{name}.nemo")
    return _models[name]


def all_runs():
    out = []
    for name in MODELS:
        for run in json.loads((REFERENCE / name / "transcribe.json").read_text())["runs"]:
            out.append(pytest.param(name, run, id=f"{name}:{run['name']}"))
    return out


def decoding_kwargs(run) -> dict:
    d = run["decoding"]
    if d["strategy"] == "greedy_batch":
        return {"beam_size": 1, "max_generation_delta": d["greedy"]["max_generation_delta"]}
    beam = d["beam"]
    return {"beam_size": beam["beam_size"], "length_penalty": beam.get("length_penalty", 0.0) or 0.0,
            "max_generation_delta": beam["max_generation_delta"],
            "return_nbest": not beam.get("return_best_hypothesis", True)}


def batch_size_of(run) -> int:
    found = re.search(r"bs(\d+)", run["name"])
    return int(found.group(1)) if found else 4


def reports_beam_score(run) -> bool:
    """NeMo's beam search gives the best hypothesis its score only when it returns n-best lists
    (`return_best_hypothesis: false`); otherwise `pack_hypotheses` gets no scores and leaves 0.0.
    Greedy results (and chunk merges) score 0.0 on both sides."""
    beam = run["decoding"]["beam"]
    return run["decoding"]["strategy"] != "beam" or beam["beam_size"] == 1 or not beam.get("return_best_hypothesis", True)


@pytest.mark.parametrize("name,run", all_runs())
def test_every_recorded_run_end_to_end(name, run, monkeypatch):
    model = get_model(name)
    audio = run["audio"]
    is_array = isinstance(audio, str) and audio.startswith("numpy array of ")
    if is_array:
        audio = load_audio(AUDIO / audio.removeprefix("numpy array of ").split()[0])
    elif isinstance(audio, list):
        audio = [str(FIXTURES / a) for a in audio]
    else:
        audio = str(FIXTURES / audio)
    batch_size = batch_size_of(run)
    one_input = isinstance(audio, str) and not audio.endswith(".jsonl") or isinstance(audio, list) and len(audio) == 1
    nemo_chunks = model.aligner is not None and not is_array and (one_input or batch_size == 1)
    kwargs = dict(run["kwargs"])
    if not is_array:
        # NeMo 3.0.0 drops decodercontext for path inputs (_may_be_make_dict_and_fix_paths copies
        # only source_lang/target_lang/taskname/pnc/context/timestamp): replay what it decoded.
        kwargs.pop("decodercontext", None)
    seen = observe_internals(monkeypatch)
    hyps = transcribe(model, audio, batch_size=batch_size, enable_chunking=nemo_chunks,
                      **kwargs, **decoding_kwargs(run))

    assert len(hyps) == len(run["hyps"])
    for k, (hyp, ref) in enumerate(zip(hyps, run["hyps"])):
        assert hyp.error is None
        assert hyp.text == ref["text"]
        assert hyp.y_sequence == ref["y_sequence"]
        if reports_beam_score(run):
            assert hyp.score == pytest.approx(ref["score"], abs=1e-3)
        else:  # a known difference: Serinus keeps the beam's score where NeMo reports 0.0
            assert ref["score"] == 0.0
        assert hyp.timestamp == (ref.get("timestamp") or {})
        if "nbest" in run:
            assert [h.y_sequence for h in hyp.nbest] == [h["y_sequence"] for h in run["nbest"][k]]
            assert [h.text for h in hyp.nbest] == [h["text"] for h in run["nbest"][k]]
            # the unlikely beams' scores sum many uncertain float32 log-probs: close, not bit-equal
            assert [h.score for h in hyp.nbest] == pytest.approx([h["score"] for h in run["nbest"][k]], rel=2e-2)
    if "chunking" in run.get("captured", {}):
        check_chunking_as_nemo(run["captured"], seen)


@pytest.mark.parametrize("name,run", [p for p in all_runs() if p.values[1]["decoding"]["strategy"] == "greedy_batch"])
def test_greedy_runs_with_speculative_decoding(name, run, monkeypatch):
    """The same runs with an int8 draft proposing tokens (used on its own only for large decoders)."""
    monkeypatch.setattr(CanaryModel, "DRAFT_MIN_BYTES", 0)
    test_every_recorded_run_end_to_end(name, run, monkeypatch)


# -- on the way: where NeMo chunks (canary-1b-v2 style), the chunks, batches and merges are NeMo's


def observe_internals(monkeypatch) -> dict:
    """Record (without changing anything) each decoded batch and each LCS merge call."""
    seen = {"batches": [], "lcs": []}
    real_decode, real_lcs = decode.decode_batch, merge.lcs_merge

    def decode_batch(model, loaded, *args):
        out = real_decode(model, loaded, *args)
        seen["batches"].append([d for piece in out for d in piece])
        return out

    monkeypatch.setattr(decode, "decode_batch", decode_batch)
    monkeypatch.setattr(merge, "lcs_merge", lambda *a, **k: seen["lcs"].append(a[:2]) or real_lcs(*a, **k))
    return seen


def check_chunking_as_nemo(captured: dict, seen: dict) -> None:
    for chunking in captured["chunking"]:  # every file cut where NeMo cut it
        spans = plan.chunk_spans(chunking["total_samples"])
        assert [s for s, _ in spans] == chunking["chunk_start_samples"]
        assert [n for _, n in spans] == chunking["chunk_valid_lens"]
    # its rows decoded as NeMo's batches were (NeMo goes in input order, Serinus longest first)
    ours = sorted((tuple(len(d.row.samples) for d in rows), tuple(d.encoded_len for d in rows), tuple(rows[0].row.prompt))
                  for rows in seen["batches"])
    nemo = sorted((tuple(f["audio_lens"]), tuple(f["encoded_lengths"]), tuple(f["decoder_input_ids"][0]))
                  for f in captured["forward"])
    assert ours == nemo
    for recorded in captured.get("merge_parallel_chunks", []):
        chunks = [d.transcript for d in next(rows for rows in seen["batches"] if len(rows) == len(recorded["chunks"]))]
        assert [t.tokens for t in chunks] == [c["y_sequence"] for c in recorded["chunks"]]
        assert [t.text for t in chunks] == [c["text"] for c in recorded["chunks"]]
        if recorded["timestamps"]:  # the chunks' token-level alignments the merge stitches together
            assert [t.timestamps.to_nemo(["char"])["char"] for t in chunks] == [c["timestamp"]["char"] for c in recorded["chunks"]]
    assert [list(b) for b, _ in seen["lcs"]] == [c["buffer"] for c in captured.get("lcs_merges", [])]
    assert [list(d) for _, d in seen["lcs"]] == [c["data"] for c in captured.get("lcs_merges", [])]


# -- flash models: the default overlap merge with the real decoder --------------------------------


def merge_overlap_reference(merged, data, window=24, max_drop=4):
    """The overlap merge rule, written out plainly: among runs common to the last `window` tokens
    of `merged` and the first `window` of `data` that start within `max_drop` tokens of `data`'s
    start and end within `max_drop` of `merged`'s end, keep the best length - dropped / 2 (> 0;
    ties to the longer run, then the first found); no such run: concatenate."""
    tail, head = list(merged[-window:]), list(data[:window])
    best = None
    for i in range(len(tail)):
        for j in range(min(len(head), max_drop + 1)):
            n = 0
            while i + n < len(tail) and j + n < len(head) and tail[i + n] == head[j + n]:
                n += 1
            if n == 0 or (i and j and tail[i - 1] == head[j - 1]):
                continue
            dropped = len(tail) - i - n
            score = n - (dropped + j) / 2
            if dropped <= max_drop and score > 0 and (best is None or (score, n) > best[0]):
                best = ((score, n), i, j, n)
    if best is None:
        return list(merged) + list(data)
    _, i, j, n = best
    return list(merged[: len(merged) - len(tail) + i + n]) + list(data[j + n:])


def decode_chunks_one_by_one(model, samples, timestamp: bool):
    """Each 30-40 s chunk of `samples` encoded and greedily decoded on its own, straight through
    the model (no transcribe()); returns the chunk starts and their token ids."""
    spans = plan.chunk_spans(len(samples))
    slots = {"source_lang": "en", "target_lang": "en", "pnc": "yes", "timestamp": "yes" if timestamp else "no"}
    prompt = encode_prompt(model.tokenizer, model.cfg.prompt_format, slots)
    out = []
    for start, n in spans:
        audio, lengths = collate_audio([samples[start:start + n]])
        with torch.inference_mode():
            states, mask, enc_len = model.encode(audio, lengths)
        cfg = DecodingConfig(**vars(model.cfg.decoding))
        limits = max_new_tokens(enc_len, len(prompt), cfg, model.cfg.decoder.max_sequence_length)
        ids = greedy_decode(model.decoder, states, mask, torch.tensor([prompt]), limits, model.tokenizer.eos_id,
                            model.tokenizer.vocab_size)[0]
        while ids and ids[-1] == model.tokenizer.pad_id:
            ids = ids[:-1]
        out.append((start, ids))
    return out


@pytest.fixture(scope="module")
def long_clip():
    return load_audio(AUDIO / "en_long.wav")


def test_flash_default_overlap_merge_with_the_real_decoder(long_clip):
    model = get_model("tiny_canary2")
    assert model.aligner is None and model.cfg.decoding.beam_size == 1
    chunks = decode_chunks_one_by_one(model, long_clip, timestamp=False)
    assert len(chunks) == 2
    merged = list(chunks[0][1])
    for _, ids in chunks[1:]:
        merged = merge_overlap_reference(merged, ids)
    hyp = transcribe(model, str(AUDIO / "en_long.wav"))[0]  # defaults: chunking on, chunk_merge auto
    assert hyp.error is None
    assert hyp.y_sequence == merged
    assert hyp.text == model.tokenizer.ids_to_text(merged).strip()
    # batch size and company do not change it
    again = transcribe(model, [str(AUDIO / "en_01.wav"), str(AUDIO / "en_long.wav")], batch_size=8)[1]
    assert again.y_sequence == merged


def test_flash_timestamp_merge_with_the_real_decoder(long_clip):
    """With frame tokens, chunk k keeps the words whose centre lies between the middles of its
    overlaps with its neighbours; times and offsets move by the chunk's start."""
    model = get_model("tiny_canary2")
    chunks = decode_chunks_one_by_one(model, long_clip, timestamp=True)
    sr, overlap, frame = 16000, 16000, model.frame_seconds
    words = []
    for k, (start, ids) in enumerate(chunks):
        _, chunk_words = parse_timestamp_tokens(model.tokenizer.ids_to_text(ids), frame, 0.01)
        lo = -np.inf if k == 0 else (start + overlap / 2) / sr
        hi = np.inf if k + 1 == len(chunks) else (chunks[k + 1][0] + overlap / 2) / sr
        for w in chunk_words or []:
            w = dict(w.to_nemo(), start=w.start + start / sr, end=w.end + start / sr,
                     start_offset=w.start_offset + start // 1280, end_offset=w.end_offset + start // 1280)
            if lo <= (w["start"] + w["end"]) / 2 < hi:
                if words and w["start"] < words[-1]["end"]:
                    w["start"], w["start_offset"] = words[-1]["end"], words[-1]["end_offset"]
                    w["end"], w["end_offset"] = max(w["end"], w["start"]), max(w["end_offset"], w["start_offset"])
                words.append(w)
    assert words and words[-1]["end"] > 40  # both chunks contribute
    hyp = transcribe(model, str(AUDIO / "en_long.wav"), timestamps=True)[0]
    assert hyp.error is None
    assert hyp.text == " ".join(w["word"] for w in words)
    assert hyp.timestamp["word"] == words
    records = [TimedWord(w["word"], w["start_offset"], w["end_offset"], w["start"], w["end"]) for w in words]
    assert hyp.timestamp["segment"] == [seg.to_nemo() for seg in segments_from_words(records)]
    assert hyp.y_sequence == [t for _, ids in chunks for t in ids]
