"""`serinus transcribe`: inputs, output formats, resume, bad input, Hub ids from a local cache."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus import cli, output
from serinus import transcribe as tr
from serinus.pipeline import decode
from serinus.decoding import Hypothesis
from serinus.model.canary import CanaryModel
from test_transcribe import write_bad_inputs

TINY = str(FIXTURES / "tiny_canary2.nemo")
CLIPS = ["en_01", "en_02", "en_03", "de_01", "de_02", "es_01", "es_02", "fr_01", "fr_02"]


@pytest.fixture(scope="module")
def model():
    return CanaryModel.from_pretrained(TINY)


@pytest.fixture(autouse=True)
def reuse_model(model, monkeypatch):
    """Load the tiny checkpoint once for all CLI calls in this module."""
    import serinus.checkpoint

    real = serinus.checkpoint.load_model
    monkeypatch.setattr(serinus.checkpoint, "load_model",
                        lambda name, device="cpu", **kw: model if str(name) == TINY else real(name, device=device, **kw))


def run(capsys, *args):
    code = cli.transcribe_main([*map(str, args), "--quiet"] if "--progress" not in args else [*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def lines(text):
    return [line for line in text.splitlines() if line]


def test_files_print_the_api_texts(model, capsys):
    files = [AUDIO / "en_01.wav", AUDIO / "en_02.wav", AUDIO / "de_01.wav"]
    code, out, err = run(capsys, *files, "--model", TINY)
    assert code == 0
    api = model.transcribe([str(f) for f in files])
    assert sorted(lines(out)) == sorted(f"{f}\t{' '.join(h.text.split())}" for f, h in zip(files, api))
    assert "3 file(s) transcribed" in err


def test_folder_and_translation(model, capsys, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ["en_01", "en_03"]:
        shutil.copy(AUDIO / f"{name}.wav", tmp_path / "in" / "sub" / f"{name}.wav")
    shutil.copy(AUDIO / "en_02.wav", tmp_path / "in" / "en_02.wav")
    code, out, _ = run(capsys, tmp_path / "in", "--model", TINY, "--source-lang", "en", "--target-lang", "de")
    assert code == 0
    got = dict(line.split("\t") for line in lines(out))
    files = sorted(str(p) for p in (tmp_path / "in").rglob("*.wav"))
    api = model.transcribe(files, source_lang="en", target_lang="de")
    assert got == {f: " ".join(h.text.split()) for f, h in zip(files, api)}


def test_manifest_to_jsonl_keeps_every_field_and_matches_nemo(capsys, tmp_path):
    """The fixture manifest, whole files as NeMo decodes them for a model without an aligner."""
    out_path = tmp_path / "out.jsonl"
    code, _, _ = run(capsys, AUDIO / "manifest.jsonl", "--model", TINY, "-o", out_path, "--no-chunking", "--beam-size", "1")
    assert code == 0
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    entries = [json.loads(line) for line in (AUDIO / "manifest.jsonl").read_text().splitlines()]
    ref = json.loads((REFERENCE / "tiny_canary2" / "transcribe.json").read_text())["runs"]
    ref = {e["audio_filepath"]: h["text"] for e, h in zip(entries, next(r for r in ref if r["name"] == "manifest_greedy")["hyps"])}
    assert sorted(r["audio_filepath"] for r in records) == sorted(e["audio_filepath"] for e in entries)
    for record in records:
        entry = next(e for e in entries if e["audio_filepath"] == record["audio_filepath"])
        assert {k: v for k, v in record.items() if k != "pred_text"} == entry
        assert record["pred_text"] == ref[record["audio_filepath"]]


def test_jsonl_for_plain_files_and_timestamps(capsys, tmp_path):
    out_path = tmp_path / "o.jsonl"
    code, _, _ = run(capsys, AUDIO / "en_01.wav", "--model", TINY, "-o", out_path, "--timestamps")
    assert code == 0
    (record,) = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert record["audio_filepath"] == str(AUDIO / "en_01.wav")
    assert record["duration"] == pytest.approx(3.4384, abs=1e-4)
    assert record["pred_text"] == "The quick brown fox jumps over the lazy dog."
    assert record["segment"][0]["segment"] == "The quick brown fox jumps over the lazy dog."
    assert [w["word"] for w in record["word"]][:3] == ["The", "quick", "brown"]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles(capsys, tmp_path, fmt):
    code, out, _ = run(capsys, AUDIO / "en_01.wav", "--model", TINY, "--format", fmt)
    assert code == 0
    sep = "," if fmt == "srt" else "."
    head = "1\n" if fmt == "srt" else "WEBVTT\n\n"
    assert out.startswith(head + f"00:00:00{sep}160 --> 00:00:03{sep}120\nThe quick brown fox jumps over the lazy dog.\n")
    # several inputs: one file each in the --output folder
    code, _, _ = run(capsys, AUDIO / "en_01.wav", AUDIO / "en_03.wav", "--model", TINY, "-f", fmt, "-o", tmp_path / "subs")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "subs").iterdir()) == [f"en_01.{fmt}", f"en_03.{fmt}"]
    code, _, err = run(capsys, AUDIO / "en_01.wav", AUDIO / "en_03.wav", "--model", TINY, "-f", fmt)
    assert code == 2 and "give a folder with --output" in err


def test_subtitles_need_segment_timestamps():
    with pytest.raises(output.OutputError, match="no segment timestamps"):
        output.subtitles(Hypothesis(text="hello"), "srt")
    assert output.subtitles(Hypothesis(text=""), "vtt") == "WEBVTT\n"
    assert output.format_time(3725.0456, "srt") == "01:02:05,046"


def test_model_without_timestamps_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(tr, "can_timestamp", lambda model: False)
    code, _, err = run(capsys, AUDIO / "en_01.wav", "--model", TINY, "--format", "srt")
    assert code == 2
    assert "gives no timestamps" in err and "--format srt" in err


def test_results_are_written_as_they_complete_and_resume_skips_them(capsys, tmp_path, monkeypatch):
    files = [AUDIO / f"{c}.wav" for c in ["en_01", "en_02", "en_03"]]
    out_path = tmp_path / "out.jsonl"
    real = decode.decode_batch
    calls = []

    def interrupted(*args, **kwargs):  # the second batch is "interrupted"
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_batch", interrupted)
    code, _, err = run(capsys, *files, "--model", TINY, "-o", out_path, "--batch-size", "1")
    assert code == 130 and "--resume" in err
    first = [json.loads(line)["audio_filepath"] for line in out_path.read_text().splitlines()]
    assert len(first) == 1  # the first batch's file was written before the interruption
    with open(out_path, "a") as f:
        f.write('{"audio_filepath": "half a li')  # a line cut off mid-write
    monkeypatch.setattr(decode, "decode_batch", real)

    seen = []
    monkeypatch.setattr(decode, "decode_batch", lambda m, ready, *a: seen.extend(p.item.name for p, _ in ready)
                        or real(m, ready, *a))
    code, _, err = run(capsys, *files, "--model", TINY, "-o", out_path, "--resume", "--batch-size", "1")
    assert code == 0
    assert "1 already in" in err
    assert first[0] not in seen and len(seen) == 2
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert sorted(r["audio_filepath"] for r in records) == sorted(str(f) for f in files)
    # nothing left to do: nothing decoded
    seen.clear()
    code, _, err = run(capsys, *files, "--model", TINY, "-o", out_path, "--resume")
    assert code == 0 and seen == [] and "3 already in" in err


def test_resume_txt_and_subtitles(capsys, tmp_path):
    out_path = tmp_path / "out.txt"
    run(capsys, AUDIO / "en_01.wav", "--model", TINY, "-o", out_path)
    code, _, err = run(capsys, AUDIO / "en_01.wav", AUDIO / "en_02.wav", "--model", TINY, "-o", out_path, "--resume")
    assert code == 0 and "1 already in" in err and len(lines(out_path.read_text())) == 2
    run(capsys, AUDIO / "en_01.wav", AUDIO / "en_02.wav", "--model", TINY, "-f", "vtt", "-o", tmp_path / "subs")
    code, _, err = run(capsys, AUDIO / "en_01.wav", AUDIO / "en_02.wav", "--model", TINY, "-f", "vtt", "-o", tmp_path / "subs", "--resume")
    assert code == 0 and "2 already in" in err


def test_folder_with_20_good_files_and_one_of_each_bad_kind(model, capsys, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(20):
        shutil.copy(AUDIO / f"{CLIPS[i % 9]}.wav", folder / f"good_{i:02d}_{CLIPS[i % 9]}.wav")
    expected = write_bad_inputs(folder / "bad", tmp_path)
    out_path = tmp_path / "out.jsonl"
    code, _, err = run(capsys, folder, tmp_path / "bad.jsonl", tmp_path / "nowhere.wav", "--model", TINY,
                       "-o", out_path, "--batch-size", "8")
    assert code == 1
    records = {r["audio_filepath"]: r["pred_text"] for r in map(json.loads, out_path.read_text().splitlines())}
    assert len(records) == 21  # 20 good files + the manifest's good line
    api = dict(zip(CLIPS, (h.text for h in model.transcribe([str(AUDIO / f"{c}.wav") for c in CLIPS]))))
    for path, text in records.items():
        if "good_" in path:
            assert text == api[path[-9:-4]], path
    summary = err[err.index("serinus transcribe: 21 file(s) transcribed, 9 failed:"):]
    for kind, message in expected.items():
        assert message in summary, (kind, message)
    assert f"{tmp_path / 'nowhere.wav'}: audio file not found" in summary
    assert err.count("serinus transcribe: failed:") == 9  # each reported as it happens, too


def test_bad_options(capsys):
    code, _, err = run(capsys, AUDIO / "en_01.wav", "--model", TINY, "--source-lang", "xx")
    assert code == 2 and "unknown language 'xx'" in err
    code, _, err = run(capsys, AUDIO / "en_01.wav", "--model", str(FIXTURES / "missing.nemo"))
    assert code == 2 and "cannot load model" in err and "missing.nemo" in err
    with pytest.raises(SystemExit) as e:
        cli.transcribe_main([str(AUDIO / "en_01.wav"), "--resume"])
    assert e.value.code == 2
    assert "--resume needs --output" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.transcribe_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ["--model", "--source-lang", "--target-lang", "--pnc", "--timestamps", "--slot", "--beam-size",
                   "--batch-size", "--no-chunking", "--no-speculative", "--chunk-merge", "--device", "--dtype", "--output", "--format",
                   "--resume", "--quiet", "nvidia/canary-1b-v2", "txt", "jsonl", "srt", "vtt", "exit status"]:
        assert option in text, option


def test_progress_bar_on_stderr(capsys):
    code = cli.transcribe_main([str(AUDIO / "en_01.wav"), "--model", TINY])
    out, err = capsys.readouterr()
    assert code == 0 and "transcribing" in err and "RTF" in err and "transcribing" not in out


def test_dtype_and_slot_options(capsys):
    code, out, _ = run(capsys, AUDIO / "en_01.wav", "--model", TINY, "--dtype", "bfloat16", "--slot", "itn=no")
    assert code == 0 and out.endswith("The quick brown fox jumps over the lazy dog.\n")


# -- Hub ids, offline, from a cache laid out as huggingface_hub lays it out


def fake_hub_cache(root, repo="nvidia/canary-1b-v2", nemo=FIXTURES / "tiny_canary2.nemo"):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    blob = repo_dir / "blobs" / "3f0c4d5e6a7b8c9d"
    blob.parent.mkdir()
    shutil.copy(nemo, blob)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / f"{repo.split('/')[1]}.nemo").symlink_to(os.path.relpath(blob, snapshot))
    return root


def test_hub_id_loads_offline_from_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from serinus.checkpoint import CheckpointError, load_model

    cache = fake_hub_cache(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("nvidia/canary-1b-v2")
    assert model.transcribe(str(AUDIO / "en_01.wav"))[0].text.strip() == "The quick brown fox jumps over the lazy dog."
    with pytest.raises(CheckpointError, match="nvidia/canary-1b-flash: not in the local Hugging Face cache"):
        load_model("nvidia/canary-1b-flash")


def test_cli_default_model_from_an_offline_cache(tmp_path):
    """A real `serinus transcribe` process with HF_HUB_CACHE / HF_HUB_OFFLINE set: the default
    model nvidia/canary-1b-v2 comes from the cache; a model not in it is a clear error."""
    cache = fake_hub_cache(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "serinus.cli", "transcribe", str(AUDIO / "en_01.wav"), "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{AUDIO / 'en_01.wav'}\tThe quick brown fox jumps over the lazy dog.\n"
    proc = subprocess.run([sys.executable, "-m", "serinus.cli", "transcribe", str(AUDIO / "en_01.wav"), "-q",
                           "--model", "nvidia/canary-180m-flash"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "nvidia/canary-180m-flash: not in the local Hugging Face cache" in proc.stderr
    # the error names the offline ways out: a local checkpoint, or a cached copy with HF_HUB_OFFLINE
    assert ".nemo" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
