"""Long-form transcription: chunking, merging at the overlaps, hour segments, batching.

The tiny fixture models transcribe each short clip exactly but, trained on single clips only,
print one sentence for any longer input. So the acceptance test below runs the real pipeline
(reading, hour segments, chunking, batching, merging) with the real tokenizer, and swaps only the
decoder for an ideal one: a chunk "hears" the words of the per-clip decodes whose centre lies
inside it (words are spread evenly over their clip), as a real model hears the words in its
window. Words in a chunk's 1 s overlap therefore come out of both neighbours, and the merged
transcript must still hold every clip's words exactly once.
"""

import json
import random

import numpy as np
import pytest
import soundfile

from serinus import transcribe as tr
from serinus.audio import load_audio
from serinus.model.canary import CanaryModel
from serinus.pipeline import decode, inputs, merge, plan, results
from serinus.pipeline.decode import DecodedRow, Transcript
from serinus.timestamps import Timestamps, TimedWord

from conftest import AUDIO, FIXTURES, REFERENCE

SR = 16000
CLIPS = ["en_01", "en_02", "en_03", "de_01", "de_02", "es_01", "es_02", "fr_01", "fr_02"]


@pytest.fixture(scope="module")
def model():
    return CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")


@pytest.fixture(scope="module")
def clips(model):
    """Each clip's samples and its real per-clip decode (which equals the clip's transcript)."""
    audio = {name: load_audio(AUDIO / f"{name}.wav") for name in CLIPS}
    texts = {}
    for name in CLIPS:
        lang = name[:2]
        texts[name] = model.transcribe([audio[name]], source_lang=lang, target_lang=lang)[0].text.strip()
    return audio, texts


def build_layout(rng: random.Random, seconds: float, clips_audio: dict) -> tuple[int, list[tuple[str, int, int]]]:
    """Clips in random order with random pauses (none, a few ms, up to 5 s). Returns the total
    length and each clip's (name, start, end) in samples. A clip does not come back within three
    places: a passage repeated word for word right across a seam looks, as text, just like the
    overlap itself (NeMo's merge and ours both keep it once)."""
    total = int(seconds * SR)
    spans, pos = [], int(rng.uniform(0, 2) * SR)
    while True:
        recent = [name for name, _, _ in spans[-3:]]
        name = rng.choice([c for c in CLIPS if c not in recent])
        n = len(clips_audio[name])
        if pos + n > total:
            return total, spans
        spans.append((name, pos, pos + n))
        pos += n + int(rng.choice([0, 0.01, 0.3, 1.0, 2.5, 5.0]) * rng.random() * SR)


def render(total: int, spans, clips_audio) -> np.ndarray:
    audio = np.zeros(total, dtype=np.float32)
    for name, start, end in spans:
        audio[start:end] = clips_audio[name]
    return audio


def words_between(spans, texts, a: int, b: int) -> list[tuple[str, str]]:
    """(word, language) of every word whose centre lies in [a, b)."""
    out = []
    for name, start, end in spans:
        words = texts[name].split()
        for i, word in enumerate(words):
            centre = start + (i + 0.5) * (end - start) / len(words)
            if a <= centre < b:
                out.append((word, name[:2]))
    return out


class IdealDecoder:
    """Stands in for the model (decode.run_decoder): knows each file's layout, checks that every
    row it is given holds exactly that stretch of the file, and returns the words heard in it."""

    def __init__(self, model, layouts, texts, audio):
        self.model, self.layouts, self.texts, self.audio = model, layouts, texts, audio
        self.batches = []

    def __call__(self, model, rows, decoding, encode_rows=None):
        self.batches.append([(r.item, r.segment, r.chunk, r.start, len(r.samples)) for r in rows])
        transcripts = []
        for r in rows:
            spans = self.layouts[r.item]
            first = r.segment * plan.HOUR_SECONDS * SR + r.start
            np.testing.assert_array_equal(r.samples, self.audio[r.item][first : first + len(r.samples)])
            ids = []
            for word, lang in words_between(spans, self.texts, first, first + len(r.samples)):
                ids += self.model.tokenizer.text_to_ids(word, lang)
            transcripts.append(Transcript(self.model.tokenizer.ids_to_text(ids), ids))
        return transcripts, [len(r.samples) // 1280 + 1 for r in rows]


def make_files(tmp_path, clips, seeds, seconds):
    audio_by_name, texts = clips
    paths, layouts, audios = [], [], []
    for seed, secs in zip(seeds, seconds):
        total, spans = build_layout(random.Random(seed), secs, audio_by_name)
        audio = render(total, spans, audio_by_name)
        path = tmp_path / f"long_{seed}.wav"
        soundfile.write(path, audio, SR, subtype="FLOAT")
        paths.append(path)
        layouts.append(spans)
        audios.append(audio)
    return paths, layouts, audios


def seam_kinds(layouts, audios) -> tuple[int, int]:
    """How many chunk seams (overlap middles) fall inside a clip, and how many in a pause."""
    inside = pause = 0
    for spans, audio in zip(layouts, audios):
        for start, _ in plan.chunk_spans(len(audio))[1:]:
            mid = start + SR // 2
            if any(s <= mid < e for _, s, e in spans):
                inside += 1
            else:
                pause += 1
    return inside, pause


@pytest.mark.parametrize("batch_size", [1, 8])
def test_merged_transcript_has_every_word_once(model, clips, tmp_path, monkeypatch, batch_size):
    seeds = [11, 12, 13, 14, 15, 16, 17]
    seconds = [120, 150, 180, 210, 240, 270, 300]
    paths, layouts, audios = make_files(tmp_path, clips, seeds, seconds)
    inside, pause = seam_kinds(layouts, audios)
    assert inside >= 10 and pause >= 3, (inside, pause)  # the layouts do test both kinds of seam

    fake = IdealDecoder(model, layouts, clips[1], audios)
    monkeypatch.setattr(decode, "run_decoder", fake)
    hyps = tr.transcribe(model, [str(p) for p in paths], batch_size=batch_size)

    for hyp, spans, audio in zip(hyps, layouts, audios):
        assert hyp.error is None
        expected = [w for w, _ in words_between(spans, clips[1], 0, len(audio))]
        assert expected == " ".join(clips[1][name] for name, _, _ in spans).split()
        assert hyp.text.split() == expected
    # every file's chunks went through the decoder in one batch; batch_size 8 packs several files
    for path_index, audio in enumerate(audios):
        rows = [b for b in fake.batches if any(r[0] == path_index for r in b)]
        assert len(rows) == 1
        assert [r[3:] for r in rows[0] if r[0] == path_index] == plan.chunk_spans(len(audio))
    if batch_size == 1:
        assert len(fake.batches) == len(paths)
    else:
        assert len(fake.batches) < len(paths)


def test_nemo_merge_repeats_a_word_where_overlap_merge_does_not(model):
    """Why "overlap" is the default merge for checkpoints without an aligner. The overlap holds
    only "Das" (a chunk ends on it, the next starts with it), and the same sentence was spoken
    a little earlier: NeMo's LCS picks the longer, older match, finds it too far from the data's
    start, and merges nothing, so "Das" comes out twice. (NeMo's merge stays the one used for
    canary-1b-v2 style checkpoints, whose reference runs it reproduces.)"""
    tok = model.tokenizer
    de = tok.text_to_ids("Das Wetter in Berlin ist heute sehr schön.", "de")
    first = de + tok.text_to_ids("El tren sale a las ocho de la mañana.", "es") + tok.text_to_ids("Das", "de")
    second = de + tok.text_to_ids("Bonjour", "fr")
    want = "Das Wetter in Berlin ist heute sehr schön. El tren sale a las ocho de la mañana. " \
           "Das Wetter in Berlin ist heute sehr schön. Bonjour"
    assert tok.ids_to_text(merge.merge_overlap(first, second)).strip() == want
    nemo = tok.ids_to_text(merge.merge_chunk_tokens([first, second])).strip()
    assert nemo == want.replace("mañana. Das", "mañana. Das Das")


def test_hour_segments_are_read_and_joined(model, clips, tmp_path, monkeypatch):
    """Past HOUR_SECONDS a file is processed one segment at a time (here 100 s stands in for the
    hour): each segment read on its own from the file, chunked, merged, then joined."""
    monkeypatch.setattr(plan, "HOUR_SECONDS", 100)
    paths, layouts, audios = make_files(tmp_path, clips, [21, 22], [250, 75])
    fake = IdealDecoder(model, layouts, clips[1], audios)
    monkeypatch.setattr(decode, "run_decoder", fake)
    reads = []
    real_read = inputs.read_span
    monkeypatch.setattr(inputs, "read_span", lambda item, a, b: reads.append((item.index, a, b)) or real_read(item, a, b))

    hyps = tr.transcribe(model, [str(p) for p in paths], batch_size=4)

    total = len(audios[0])
    assert sorted(r for r in reads if r[0] == 0) == [(0, 0, 1_600_000), (0, 1_600_000, 3_200_000), (0, 3_200_000, total)]
    assert [r for r in reads if r[0] == 1] == [(1, 0, len(audios[1]))]
    segments = {r[1] for b in fake.batches for r in b if r[0] == 0}
    assert segments == {0, 1, 2}
    # a segment's words: those centred in it; the hour cut is a hard cut, as in NeMo
    expected = []
    for k, (a, b) in enumerate(plan.split_hours(total, 100)):
        expected += [w for w, _ in words_between(layouts[0], clips[1], a, b)]
    assert hyps[0].text.split() == expected
    assert hyps[1].text.split() == [w for w, _ in words_between(layouts[1], clips[1], 0, len(audios[1]))]


def test_two_hour_segments_are_not_read_ahead(model, tmp_path, monkeypatch):
    """A batch over PREFETCH_SECONDS (an hour segment) is read only after the previous one
    has been decoded and freed."""
    monkeypatch.setattr(plan, "HOUR_SECONDS", 50)
    monkeypatch.setattr(plan, "PREFETCH_SECONDS", 20)
    audio = np.full(130 * SR, 0.01, dtype=np.float32)
    path = tmp_path / "hum.wav"
    soundfile.write(path, audio, SR, subtype="FLOAT")
    order = []
    real_read = inputs.read_span

    def run_decoder(model, rows, decoding, encode_rows=None):
        order.append(("decode", rows[0].segment))
        return [Transcript("x", []) for _ in rows], [len(r.samples) // 1280 + 1 for r in rows]

    monkeypatch.setattr(inputs, "read_span", lambda item, a, b: order.append(("read", a)) or real_read(item, a, b))
    monkeypatch.setattr(decode, "run_decoder", run_decoder)
    tr.transcribe(model, str(path), batch_size=2)
    assert order == [("read", 0), ("decode", 0), ("read", 800_000), ("decode", 1), ("read", 1_600_000), ("decode", 2)]


def test_merge_overlap_cases():
    A = [1, 2, 3, 4, 5, 6]
    assert merge.merge_overlap(A, [5, 6, 7, 8]) == [1, 2, 3, 4, 5, 6, 7, 8]  # overlap kept once
    assert merge.merge_overlap(A, [7, 8]) == A + [7, 8]  # pause in the overlap: nothing in common
    assert merge.merge_overlap(A + [99], [98, 5, 6, 7]) == [1, 2, 3, 4, 5, 6, 7]  # a cut word on each side
    assert merge.merge_overlap([1, 2, 3, 9, 9, 9, 9, 9, 9], [2, 3, 10]) == [1, 2, 3, 9, 9, 9, 9, 9, 9, 2, 3, 10]  # far back: no
    assert merge.merge_overlap([], [1, 2]) == [1, 2]
    assert merge.merge_overlap([1, 2], []) == [1, 2]


def test_real_model_long_files_batch_size_independent(model, clips, tmp_path):
    """The real model on long files with a short one between them: results in input order, and a
    file's result the same whatever batch it shares (batch_size 1 decodes each file alone)."""
    paths, _, _ = make_files(tmp_path, clips, [31, 32], [42, 50])
    files = [str(paths[0]), str(AUDIO / "en_01.wav"), str(paths[1])]
    alone = tr.transcribe(model, files, batch_size=1)
    shared = tr.transcribe(model, files, batch_size=8)
    assert [h.text for h in shared] == [h.text for h in alone]
    assert [h.y_sequence for h in shared] == [h.y_sequence for h in alone]
    assert alone[1].text.strip() == clips[1]["en_01"]
    assert all(h.error is None and h.text for h in alone)


def test_enable_chunking_false_decodes_whole(model):
    hyps = tr.transcribe(model, str(AUDIO / "en_long.wav"), enable_chunking=False)
    ref = json.loads((REFERENCE / "tiny_canary2" / "transcribe.json").read_text())["runs"]
    long_ref = next(r for r in ref if r["name"] == "long_greedy")
    assert hyps[0].text == long_ref["hyps"][0]["text"]
    assert hyps[0].y_sequence == long_ref["hyps"][0]["y_sequence"]


def test_translation_of_long_audio_is_chunked_and_merged(model, monkeypatch):
    seen = []
    real_decode = decode.run_decoder
    monkeypatch.setattr(decode, "run_decoder", lambda m, rows, d, encode_rows=None: seen.append(rows) or real_decode(m, rows, d, encode_rows))
    hyp = tr.transcribe(model, str(AUDIO / "en_long.wav"), source_lang="en", target_lang="de")[0]
    assert hyp.error is None and hyp.text
    assert len(seen[0]) == 2  # 77 s: two 40 s chunks
    prompt = model.tokenizer.token_to_id("<|de|>")
    assert all(prompt in u.prompt for u in seen[0])


def test_frame_token_timestamps_are_merged_by_time(model):
    """Flash-style models write times into the text: chunks are joined at the overlap's middle,
    each word kept from the chunk on whose side of it its centre lies."""

    def chunk(k, start, n, *items):
        words = [TimedWord(w, round(a / 0.08), round(b / 0.08), a, b) for w, a, b in items]
        return DecodedRow(plan.Row(0, k, np.zeros(n, np.float32), [], start=start),
                          Transcript(" ".join(w.text for w in words), [], timestamps=Timestamps(words, [], [])), n // 1280)

    first = chunk(0, 0, 640000, ("one", 1.0, 1.5), ("two.", 38.2, 38.9), ("three", 39.2, 39.6))
    second = chunk(1, 624000, 100000, ("two.", 0.0, 0.4), ("three", 0.2, 0.6), ("four.", 2.0, 2.5))
    hyp = results.to_hypothesis(merge.merge_piece(model, [first, second], "overlap", False, True), True)
    assert hyp.text == "one two. three four."
    assert [(w["word"], w["start"]) for w in hyp.timestamp["word"]] == [("one", 1.0), ("two.", 38.2), ("three", 39.2), ("four.", 41.0)]
    assert hyp.timestamp["word"][-1]["start_offset"] == 25 + 624000 // 1280
    assert [s["segment"] for s in hyp.timestamp["segment"]] == ["one two.", "three four."]
