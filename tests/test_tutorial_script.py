"""examples/canary_tutorial.py --fast runs every step of NeMo's Canary tutorial and prints each
step's header and a real result (transcripts, timestamps, losses, bucket bins, batch sizes)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import DATA, FIXTURES, REPO, SHARED

SCRIPT = REPO / "examples" / "canary_tutorial.py"
STEPS = ["0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "2", "3.1", "3.2", "3.3", "4", "5.1", "5.2",
         "6.1", "6.2", "6.3", "6.4", "7", "8", "9"]
WORD_LINE = re.compile(r"^\S+\s+\[\d+\.\d\ds, \d+\.\d\ds\]$", re.M)
LOSS_LINE = re.compile(r"^step\s+(\d+)\s+loss (\d+\.\d+)", re.M)

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "tiny_canary2_v2style.nemo").is_file() or not (DATA / "synth-v1" / "asr_train.jsonl").is_file(),
    reason=f"shared fixtures / synth-v1 data not found under {SHARED}",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tutorial")
    env = {**os.environ, "SERINUS_SHARED": str(SHARED)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--fast", "--out-dir", str(out_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    parts = re.split(r"^## Step (\S+): ", proc.stdout, flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2]))
    return out_dir, sections, proc.stdout


def test_every_step_in_the_tutorials_order(run):
    _, sections, stdout = run
    assert list(sections) == STEPS
    for step, text in sections.items():
        assert "NeMo: " in text.splitlines()[1], step  # each header names the NeMo call it replaces
    assert "tutorial finished in" in stdout


def test_inference_results(run):
    _, s, _ = run
    assert re.search(r'English speech recognition:\n  "\S.*"', s["1.2"])
    assert re.search(r'English to Spanish.*:\n  "\S.*"', s["1.3"])
    assert re.search(r"Segment start: \d+\.\d\ds\nSegment end: \d+\.\d\ds", s["1.4"])
    assert len(WORD_LINE.findall(s["1.4"])) >= 3
    minutes, seconds = map(int, re.search(r"(\d+) min (\d+) sec audio file saved", s["1.5"]).groups())
    assert 60 * minutes + seconds > 40  # long enough to be chunked
    assert re.search(r"--- Audio 1 ---\n\S.*[.!?]\n", s["1.6"])
    assert len(WORD_LINE.findall(s["1.7"])) >= 3


def test_data_and_tokenizers(run):
    out_dir, s, _ = run
    n = int(re.search(r"^(\d+) lines, [\d.]+ s of audio", s["2"], re.M).group(1))
    manifest = out_dir / "datasets" / "LibriLight" / "train_manifest.json"
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert len(lines) == n > 0 and lines[0]["pnc"] == "no" and lines[0]["text"] == lines[0]["text"].lower()
    assert "1152 pieces" in s["3.1"]
    assert re.search(r"aggregate tokenizer: .* -> \d+ tokens", s["3.2"])
    assert ("<|startofcontext|><|startoftranscript|><|emo:undefined|><|en|><|en|><|nopnc|><|noitn|>"
            "<|notimestamp|><|nodiarize|>") in s["3.3"]


def test_training_from_scratch_and_fine_tuning(run):
    out_dir, s, _ = run
    assert "encoder 2x" in s["4"] and "decoder 2x" in s["4"]
    steps = LOSS_LINE.findall(s["4"])
    assert [int(k) for k, _ in steps] == list(range(1, 11)) and all(float(v) > 0 for _, v in steps)
    config = out_dir / "config" / "canary-180m-flash-finetune.yaml"
    assert config.is_file() and "init_from:" in s["5.1"] and "prompt_format: canary2" in s["5.1"]
    assert re.search(r"init_from .*: \d+ tensors loaded, \d+ loaded by token row, 0 skipped", s["5.2"])
    assert [int(k) for k, _ in LOSS_LINE.findall(s["5.2"])] == list(range(1, 11))


def test_new_task_recipes(run):
    _, s, _ = run
    assert re.search(r"prompt \(\d+ tokens\): <\|startofcontext\|> \S.* <\|startoftranscript\|>", s["6.1"])
    frames = json.loads(re.search(r"frame tokens in the target: (\[.*\])", s["6.2"]).group(1))
    assert len(frames) >= 2 and frames == sorted(frames)
    assert "<|timestamp|>" in s["6.2"]
    assert "--extra-tokens '<|summarize|>' '<|nosummarize|>'" in s["6.3"]
    assert re.search(r"^prompt: .*<\|summarize\|>$", s["6.3"], re.M)
    kept, total = map(int, re.search(r"retained (\d+) of (\d+) token embeddings", s["6.3"]).groups())
    assert kept == total - 2  # all but the two new tokens
    losses = [float(x) for x in re.findall(r"summarize step\s+\d+\s+loss (\d+\.\d+)", s["6.3"])]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    loaded = [tuple(map(int, m)) for m in re.findall(
        r"init_from .*: (\d+) tensors loaded, (\d+) loaded by token row, (\d+) skipped", s["6.4"])]
    # (i) all, (ii) the encoder only, (iii) all but the embeddings: (loaded, by token row, skipped)
    assert len(loaded) == 3
    (all_, _, none), (enc, _, most), (but, _, two) = loaded
    assert none == 0 and 0 < two < most and all_ > but > enc > 0


def test_buckets_oomptimizer_and_prompt_loss_mask(run):
    _, s, _ = run
    bins = json.loads(re.search(r"^bucket_duration_bins: (\[.*\])$", s["7"], re.M).group(1))
    assert len(bins) >= 2 and all(len(b) == 2 and b[0] > 0 and b[1] > 0 for b in bins)
    sizes = json.loads(re.search(r"^bucket_batch_size: (\[.*\])$", s["8"], re.M).group(1))
    assert len(sizes) == len(bins) and all(b > 0 for b in sizes)
    for flag in ("false", "true"):  # the fixture batch gives NeMo's own losses
        ours, nemo = re.search(rf"use_loss_mask_for_prompt={flag}\s+loss (\d+\.\d+)\s+\(NeMo 3.0.0 on the same "
                               rf"batch: (\d+\.\d+)\)", s["9"]).groups()
        assert float(ours) == pytest.approx(float(nemo), rel=1e-3, abs=1e-6)
    first_steps = [float(v) for k, v in LOSS_LINE.findall(s["9"]) if k == "1"]
    assert len(first_steps) == 2 and first_steps[0] != first_steps[1]  # prompt tokens in or out of the loss
