"""Timestamps of chunked long audio: words agree with the text, times are monotonic, and a chunk
the aligner cannot align keeps its text (its words get no times, and the result says so)."""

import pytest

import serinus.transcribe as tr
from serinus import align
from serinus.pipeline.merge import times_for_words
from serinus.timestamps import Timestamps, TimedWord
from conftest import AUDIO, FIXTURES
from serinus import CanaryModel


def _check_words_agree(hyp):
    words = hyp.timestamp["word"]
    assert [w["word"] for w in words] == hyp.text.split()
    timed = [w for w in words if w["start"] is not None]
    for a, b in zip(timed, timed[1:]):
        assert a["start"] <= a["end"] <= b["start"] + 1e-9 <= b["end"] + 1e-9
    segments = hyp.timestamp["segment"]
    assert " ".join(s["segment"] for s in segments).split() == hyp.text.split()


def test_flash_model_long_audio_timestamps_are_consistent():
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    hyp = model.transcribe([str(AUDIO / "en_long.wav")], timestamps=True, beam_size=1)[0]
    assert hyp.error is None and hyp.text
    assert hyp.timestamp["word"][-1]["end"] > 40  # times are global, past the first chunk
    _check_words_agree(hyp)


def test_v2_unaligned_chunk_keeps_its_text(monkeypatch):
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2_v2style.nemo")
    audio = [str(AUDIO / "en_long2.wav")]
    plain = model.transcribe(audio, batch_size=1, beam_size=1)[0]
    original = align.align_texts

    def skip_chunk_1(model, samples, texts, timestamp_type="all"):
        found = original(model, samples, texts, timestamp_type)
        if timestamp_type == "char" and len(texts) > 1:  # as if chunk 1 had more tokens than frames
            found[1] = Timestamps(tokens=[])
        return found

    monkeypatch.setattr(align, "align_texts", skip_chunk_1)
    hyp = model.transcribe(audio, batch_size=1, beam_size=1, timestamps=True)[0]
    assert hyp.text == plain.text  # NeMo would drop chunk 1's text here
    _check_words_agree(hyp)
    assert hyp.warnings and "chunk(s) 1" in hyp.warnings[0]


def test_words_without_aligned_counterpart_get_no_times():
    timed = [TimedWord(w, i, i + 1, i * 0.08, (i + 1) * 0.08) for i, w in enumerate(["one", "two", "five", "six."])]
    words = times_for_words("one two three four five six.".split(), timed)
    assert [w.text for w in words] == ["one", "two", "three", "four", "five", "six."]
    assert [w.start_offset for w in words] == [0, 1, None, None, 2, 3]


def test_timestamps_refused_when_the_checkpoint_has_no_way(monkeypatch):
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    model.cfg.prompt_format = "canary"  # v1 prompt: no timestamp slot, and no aligner packed
    with pytest.raises(tr.TranscribeError, match="cannot produce timestamps"):
        model.transcribe([str(AUDIO / "en_01.wav")], timestamps=True)
