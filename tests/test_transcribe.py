"""transcribe(): inputs (files, folders, globs, manifests, arrays), bad input. (NeMo's reference
runs are replayed in test_transcribe_parity.py.)"""

import json
import shutil

import numpy as np
import pytest
import soundfile
import torch

from conftest import AUDIO, FIXTURES
from serinus import transcribe as tr
from serinus.audio import load_audio, pad_min_duration
from serinus.model.canary import CanaryModel

@pytest.fixture(scope="module")
def model():
    return CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")


def test_short_audio_is_padded_to_one_second_both_sides():
    samples = np.arange(1, 8001, dtype=np.float32)
    padded = pad_min_duration(samples)
    assert len(padded) == 16000
    assert (padded[:4000] == 0).all() and (padded[12000:] == 0).all()
    np.testing.assert_array_equal(padded[4000:12000], samples)
    assert pad_min_duration(np.ones(16001, dtype=np.float32)).shape == (16001,)


def test_arrays_and_paths_mixed_come_back_in_input_order(model):
    clips = ["en_02", "es_01", "de_01", "en_03"]
    inputs = [load_audio(AUDIO / f"{c}.wav") if i % 2 else str(AUDIO / f"{c}.wav") for i, c in enumerate(clips)]
    seen = []
    hyps = model.transcribe(inputs, batch_size=2, on_result=lambda item, hyp: seen.append(item.index))
    singles = [model.transcribe([x])[0].text for x in inputs]
    assert [h.text for h in hyps] == singles
    assert sorted(seen) == [0, 1, 2, 3]


def test_folder_glob_and_manifest_inputs(model, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(AUDIO / "en_01.wav", tmp_path / "a" / "x.wav")
    shutil.copy(AUDIO / "de_01.wav", tmp_path / "a" / "b" / "y.wav")
    (tmp_path / "a" / "notes.txt").write_text("not audio")
    items = tr.collect_items(str(tmp_path / "a"))
    assert [i.name for i in items] == [str(tmp_path / "a" / "b" / "y.wav"), str(tmp_path / "a" / "x.wav")]
    items = tr.collect_items(str(tmp_path / "a" / "**" / "*.wav"))
    assert sorted(i.name for i in items) == sorted([str(tmp_path / "a" / "b" / "y.wav"), str(tmp_path / "a" / "x.wav")])
    assert [i.index for i in items] == [0, 1]
    assert tr.collect_items(str(tmp_path / "nothing*.wav"))[0].error.endswith("no file matches this pattern")
    (tmp_path / "empty").mkdir()
    assert "folder holds no audio files" in tr.collect_items(str(tmp_path / "empty"))[0].error

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a/x.wav", "source_lang": "en"}) + "\n\n"
                        + json.dumps({"audio_filepath": str(tmp_path / "a" / "b" / "y.wav"), "source_lang": "de",
                                      "target_lang": "de"}) + "\n")
    hyps = model.transcribe([str(manifest), str(AUDIO / "fr_01.wav")], batch_size=2, pnc="yes")
    assert [h.text.strip() for h in hyps[:2]] == ["The quick brown fox jumps over the lazy dog.",
                                                  "Guten Morgen, wie geht es Ihnen heute?"]
    assert hyps[2].text == model.transcribe(str(AUDIO / "fr_01.wav"))[0].text  # en -> en by default


def test_manifest_offset_and_duration_select_a_span(model, tmp_path):
    """en_long2.wav holds en_01 at samples 254932..309947 (long_segments_v2style.json)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": str(AUDIO / "en_long2.wav"), "offset": 254932 / 16000,
                                    "duration": 55015 / 16000}) + "\n")
    span = model.transcribe(str(manifest))[0]
    clip = model.transcribe(str(AUDIO / "en_01.wav"))[0]
    assert span.text == clip.text and span.y_sequence == clip.y_sequence
    # NeMo reads a span wherever `offset` is given, 0 included (and the whole file where it is not: checked
    # against NeMo 3.0.0): en_long2.wav from 0 for en_01's length is not en_01, and not the whole file
    start = load_audio(AUDIO / "en_long2.wav")[:55015]
    manifest.write_text(json.dumps({"audio_filepath": str(AUDIO / "en_long2.wav"), "offset": 0,
                                    "duration": 55015 / 16000}) + "\n")
    span = model.transcribe(str(manifest))[0]
    assert span.y_sequence == model.transcribe(start)[0].y_sequence
    assert span.y_sequence != model.transcribe(str(AUDIO / "en_long2.wav"))[0].y_sequence


def write_bad_inputs(folder, manifest_dir):
    """One file or manifest line of each bad kind; returns {kind: what its message must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + bytes(range(200)))
    (folder / "zero_bytes.wav").write_bytes(b"")
    soundfile.write(folder / "no_samples.wav", np.zeros(0, dtype=np.float32), 16000)
    nan = load_audio(AUDIO / "en_01.wav").copy()
    nan[1000:1003] = [np.nan, np.inf, -np.inf]
    soundfile.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    manifest = manifest_dir / "bad.jsonl"
    good = str(AUDIO / "en_02.wav")
    manifest.write_text("\n".join([
        json.dumps({"audio_filepath": good, "source_lang": "xx"}),  # line 1: unknown language
        json.dumps({"audio_filepath": good, "pnc": "maybe"}),  # line 2: invalid slot value
        '{"audio_filepath": "x.wav", ',  # line 3: malformed
        json.dumps({"audio_filepath": "sub/missing.wav"}),  # line 4: relative path, not there
        json.dumps({"audio_filepath": good}),  # line 5: fine
    ]) + "\n")
    return {
        "corrupt": f"{folder / 'corrupt.wav'}: unreadable or corrupt",
        "zero_bytes": f"{folder / 'zero_bytes.wav'}: empty file (0 bytes)",
        "no_samples": f"{folder / 'no_samples.wav'}: audio is empty (0 samples)",
        "nan": f"{folder / 'nan.wav'}: audio contains 3 NaN/inf sample(s)",
        "language": f"{good} ({manifest}:1): unknown language 'xx'",
        "slot": f"{good} ({manifest}:2): slot 'pnc' does not accept 'maybe'",
        "malformed": f"{manifest}:3: malformed manifest line",
        "relative": f"{manifest_dir / 'sub' / 'missing.wav'} ({manifest}:4): audio file not found",
    }


def test_bad_inputs_are_reported_and_the_rest_transcribed(model, tmp_path):
    expected = write_bad_inputs(tmp_path / "bad", tmp_path)
    inputs = [str(AUDIO / "en_01.wav"), str(tmp_path / "missing.wav"), *sorted(str(p) for p in (tmp_path / "bad").iterdir()),
              str(tmp_path / "bad.jsonl"), load_audio(AUDIO / "en_03.wav"), np.array([0.0, np.nan], dtype=np.float32)]
    hyps = tr.transcribe(model, inputs, batch_size=3)
    errors = [h.error for h in hyps if h.error]
    texts = [h.text.strip() for h in hyps if not h.error]
    assert texts == ["The quick brown fox jumps over the lazy dog.", "It's almost nine o'clock, and the meeting has not started yet.",
                     "Please send me the report by Friday afternoon."]
    assert f"{tmp_path / 'missing.wav'}: audio file not found" in errors
    for kind, message in expected.items():
        assert any(e.startswith(message) for e in errors), (kind, message, errors)
    assert "<array 12>: audio contains 1 NaN/inf sample(s)" in errors
    assert len(errors) == len(expected) + 2


def test_invalid_call_options_raise_once(model):
    with pytest.raises(tr.TranscribeError, match="unknown language 'xx'"):
        tr.transcribe(model, str(AUDIO / "en_01.wav"), source_lang="xx")
    with pytest.raises(tr.TranscribeError, match="slot 'pnc' does not accept"):
        tr.transcribe(model, str(AUDIO / "en_01.wav"), pnc="maybe")
    with pytest.raises(tr.TranscribeError, match="unknown slot.*'itnn'"):
        tr.transcribe(model, str(AUDIO / "en_01.wav"), itnn="yes")
    with pytest.raises(ValueError, match="batch_size"):
        tr.transcribe(model, str(AUDIO / "en_01.wav"), batch_size=0)
    with pytest.raises(ValueError, match="chunk_merge"):
        tr.transcribe(model, str(AUDIO / "en_01.wav"), chunk_merge="best")


def test_half_precision_weights_run(tmp_path):
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo").to(torch.bfloat16)
    hyp = model.transcribe(str(AUDIO / "en_01.wav"))[0]
    assert hyp.error is None
    assert hyp.text.strip() == "The quick brown fox jumps over the lazy dog."


def test_progress_bar_reports_files_hours_and_rtf(model, capsys):
    tr.transcribe(model, [str(AUDIO / "en_01.wav"), str(AUDIO / "de_01.wav")], progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "audio 0:00:06/0:00:06 h" in err and "RTF" in err


def test_resampled_and_stereo_files(model, tmp_path):
    samples = load_audio(AUDIO / "en_01.wav")
    soundfile.write(tmp_path / "stereo.flac", np.stack([samples, samples], axis=1), 16000)
    import soxr

    soundfile.write(tmp_path / "r44.wav", soxr.resample(samples, 16000, 44100), 44100, subtype="FLOAT")
    hyps = model.transcribe([str(tmp_path / "stereo.flac"), str(tmp_path / "r44.wav")])
    assert [h.text.strip() for h in hyps] == ["The quick brown fox jumps over the lazy dog."] * 2
