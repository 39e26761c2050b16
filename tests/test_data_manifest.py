"""NeMo manifests: validation with file:line errors, skip counting, LibriSpeech trees, lhotse cuts."""

import json

import numpy as np
import pytest
import soundfile

from conftest import AUDIO, DATA
from serinus.data import manifest as mf


def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.zeros(16000, dtype=np.float32), 16000)
    return path


GOOD = {"audio_filepath": "a.wav", "duration": 1.0, "text": "hi", "source_lang": "en", "target_lang": "en"}
GOOD["pnc"] = "yes"

BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"duration": 1.0, "text": "hi"}, "missing field(s) audio_filepath"),
    ({"audio_filepath": "a.wav", "text": "hi"}, "missing field(s) duration"),
    ({"audio_filepath": "a.wav", "duration": 1.0}, "missing field(s) text"),
    ({**GOOD, "duration": "1.5"}, "duration must be a number"),
    ({**GOOD, "duration": True}, "duration must be a number"),
    ({**GOOD, "duration": -1}, "duration must be positive"),
    ({**GOOD, "offset": "x"}, "offset must be"),
    ({**GOOD, "text": 5}, "text must be a string"),
    ({**GOOD, "audio_filepath": "missing.wav"}, "audio file not found"),
    ({**GOOD, "target_lang": "xx"}, "unknown language target_lang='xx'"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, wav, bad, message):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(mf.ManifestError) as e:
        mf.read_manifest(path, langs=["en", "de"])
    assert str(e.value).startswith(f"{path}:3: ")  # the blank line still counts
    assert message in str(e.value)


def test_skip_invalid_counts_and_reports(tmp_path, wav, capsys):
    lines = [GOOD] + [b for b, _ in BAD_LINES] + [GOOD]
    path = write_lines(tmp_path / "m.jsonl", lines)
    m = mf.read_manifest(path, langs=["en"], skip_invalid=True)
    assert len(m) == 2 and m.num_lines == len(lines)
    assert len(m.skipped) == len(BAD_LINES)
    assert [s.split(": ")[0] for s in m.skipped] == [f"{path}:{i}" for i in range(2, len(lines))]
    assert f"skipped {len(BAD_LINES)} invalid line(s) of {len(lines)}" in capsys.readouterr().err


def test_entry_fields_and_relative_paths(tmp_path, wav):
    sub = tmp_path / "sub"
    sub.mkdir()
    entry = {**GOOD, "audio_filepath": "../a.wav", "decodercontext": "ctx", "summarize": "yes"}
    path = write_lines(sub / "m.jsonl", [entry])
    (e,) = mf.read_manifest(path)
    assert e.audio_filepath == str(wav) and e.duration == 1.0 and e.text == "hi" and e.lang == "en"
    assert e.extra == {k: v for k, v in entry.items() if k not in ("audio_filepath", "duration", "text")}
    out = mf.write_manifest(tmp_path / "out.jsonl", [e])
    assert json.loads(out.read_text())["audio_filepath"] == "a.wav"  # relative to the new manifest
    assert mf.read_manifest(out)[0].audio_filepath == str(wav)


def test_librispeech_tree(tmp_path, capsys):
    spk = tmp_path / "LibriSpeech" / "train" / "19" / "198"
    spk.mkdir(parents=True)
    for utt, n in [("19-198-0000", 16000), ("19-198-0001", 24000)]:
        soundfile.write(spk / f"{utt}.flac", np.zeros(n, dtype=np.float32), 16000)
    soundfile.write(spk / "19-198-0002.flac", np.zeros(100, dtype=np.float32), 16000)  # no transcript
    (spk / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 GOOD  MORNING\n")
    out = tmp_path / "manifest.jsonl"
    assert mf.main(["build", str(tmp_path / "LibriSpeech"), str(out)]) == 0
    items = [json.loads(l) for l in out.read_text().splitlines()]
    assert [i["text"] for i in items] == ["hello world", "good morning"]
    assert [i["duration"] for i in items] == [1.0, 1.5]
    assert items[0]["audio_filepath"] == "LibriSpeech/train/19/198/19-198-0000.flac"
    assert (items[0]["source_lang"], items[0]["target_lang"], items[0]["pnc"]) == ("en", "en", "no")
    assert "1 .flac file(s) have no transcript" in capsys.readouterr().err
    m = mf.build_librispeech_manifest(tmp_path / "LibriSpeech", out, lowercase=False)
    assert m[0].text == "HELLO WORLD" and m[0].extra["pnc"] == "yes"
    (spk / "19-198.trans.txt").write_text("19-198-0000 HELLO\n19-198-0009 NO AUDIO\n")
    with pytest.raises(mf.ManifestError, match=r"19-198\.trans\.txt:2: audio file not found"):
        mf.build_librispeech_manifest(tmp_path / "LibriSpeech", out)


def test_check_cli_reports_every_bad_line(tmp_path, wav, capsys):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, {**GOOD, "duration": "x"}, GOOD, "{oops"])
    assert mf.main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "2 valid entries of 4 lines" in out and f"{path}:2:" in out and f"{path}:4:" in out
    write_lines(path, [GOOD])
    assert mf.main(["check", str(path)]) == 0


def test_cuts_point_at_files_with_slots(tmp_path):
    cuts = mf.manifest_to_cuts(AUDIO / "manifest.jsonl")
    cut = cuts[0]
    assert cut.id == "manifest-1" and cut.custom["origin"] == f"{AUDIO / 'manifest.jsonl'}:1"
    assert cut.recording.sources[0].source == str(AUDIO / "en_01.wav")  # not copied
    assert cut.duration == cut.recording.duration == 55015 / 16000
    sup = cut.supervisions[0]
    assert sup.text == "The quick brown fox jumps over the lazy dog." and sup.language == "en"
    assert sup.custom["source_lang"] == "en" and sup.custom["pnc"] == "yes" and sup.custom["timestamp"] == "no"
    assert cut.load_audio().shape == (1, 55015)


def test_cuts_reuse_recordings_and_check_durations(tmp_path, wav):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, {**GOOD, "target_lang": "de", "text": "hallo"}])
    cuts = mf.manifest_to_cuts(path)
    assert cuts[0].recording is cuts[1].recording  # AST manifests repeat audio: one Recording
    write_lines(path, [{**GOOD, "duration": 3.0}])
    with pytest.raises(mf.ManifestError, match=rf"{path}:1: duration 3.0s does not match"):
        mf.manifest_to_cuts(path)
    write_lines(path, [{**GOOD, "offset": 0.25, "duration": 0.5}])
    (cut,) = mf.manifest_to_cuts(path)
    assert (cut.start, cut.duration) == (0.25, 0.5) and cut.load_audio().shape == (1, 8000)
    # an offset of 0 is still a span, as in NeMo's reader: its duration need not be the file's
    write_lines(path, [{**GOOD, "offset": 0, "duration": 0.5}])
    (cut,) = mf.manifest_to_cuts(path)
    assert (cut.start, cut.duration) == (0.0, 0.5) and cut.load_audio().shape == (1, 8000)


def test_shar_roundtrip(tmp_path):
    from lhotse import CutSet

    cuts = mf.manifest_to_cuts(AUDIO / "manifest.jsonl").subset(first=3)
    mf.write_shar(cuts, tmp_path / "shar", shard_size=2)
    back = CutSet.from_shar(in_dir=tmp_path / "shar").to_eager()
    assert [c.id for c in back] == [c.id for c in cuts]
    assert back[0].supervisions[0].custom["pnc"] == "yes"
    np.testing.assert_allclose(back[1].load_audio(), cuts[1].load_audio(), atol=1e-4)


def test_synth_manifests_are_valid():
    for name in ("asr_train", "ast_train", "asr_dev"):
        m = mf.read_manifest(DATA / "synth-v1" / f"{name}.jsonl", langs=["en", "de", "es", "fr"])
        assert len(m) > 0 and not m.skipped


def test_cut_ids_stay_unique_across_same_named_manifests():
    paths = [DATA / "synth-v1" / "asr_dev.jsonl", DATA / "synth-v1-large" / "asr_train.jsonl"]
    paths.append(DATA / "synth-v1" / "asr_train.jsonl")
    m = [mf.read_manifest(p) for p in paths]
    m[1].entries = m[1].entries[:5]
    cuts = mf.manifests_to_cuts(m)
    ids = [c.id for c in cuts]
    assert len(set(ids)) == len(ids) == len(m[0]) + 5 + len(m[2])
    assert ids[0] == "asr_dev-1" and ids[len(m[0])] == "synth-v1-large-asr_train-1"
