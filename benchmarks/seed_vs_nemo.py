"""The seed tutorial's from-scratch training command, through `serinus train` and through NeMo's own
`speech_to_text_aed.py` (NeMo 3.0.0 in its own venv), on the same data, tokenizers and model.

    python benchmarks/seed_vs_nemo.py --nemo-python /work/nemo_venv/bin/python [--steps 10] [--threads 2]

Data: the English ASR lines of ../shared/data (synth-v1 + synth-v1-large + synth-v1-xl train; the seed
uses LibriLight 1 h), one manifest written under runs/seed_vs_nemo/. Tokenizers: `serinus tokenizer
special` + `serinus tokenizer train --vocab-size 1024` (the seed's en_libri1h_1024). The command line
is the seed's (2 encoder + 2 decoder layers on fast-conformer_aed.yaml's 1024-wide defaults); NeMo
gets `trainer.devices=1 trainer.accelerator=cpu trainer.precision=32` added, without which it fails on
a CPU; Serinus runs the seed's line as it is and says what it chose. Each side runs alone, in a fresh
process, with the same threads. Printed: wall time of the whole command, time of the training steps
(first step start to last step end, data loading included), seconds per step, audio seconds per step
and audio seconds per wall second of training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CONFIGS = ROOT.parent / "shared" / "fixtures" / "nemo" / "configs"
OUT = ROOT / "runs" / "seed_vs_nemo"

# NeMo's script, unchanged, run with a Lightning callback that records each training batch's end time
# and audio seconds (added to the Trainer NeMo's script builds).
NEMO_DRIVER = r"""
import json, runpy, sys, time
import lightning.pytorch as pl
records, start = [], {}
class StepClock(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        start.setdefault("t", time.time())
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        records.append({"end": time.time(), "audio": float(batch.audio_lens.sum()) / 16000})
        json.dump({"start": start.get("t"), "steps": records}, open(out, "w"))  # readable while it runs
_init = pl.Trainer.__init__
def init(self, *a, **k):
    k["callbacks"] = list(k.get("callbacks") or []) + [StepClock()]
    _init(self, *a, **k)
pl.Trainer.__init__ = init
script, out = sys.argv[1], sys.argv[2]  # (out is read by the callback above)
sys.argv = [script] + sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    json.dump({"start": start.get("t"), "steps": records}, open(out, "w"))
"""


def english_manifest() -> Path:
    out = OUT / "train_en.jsonl"
    if out.is_file():
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [x for name in ("synth-v1", "synth-v1-large", "synth-v1-xl")
             for x in english_lines(DATA / name / "asr_train.jsonl")]
    out.write_text("\n".join(lines) + "\n")
    return out


def english_lines(src: Path) -> list[str]:
    """The English ASR lines of a manifest, with absolute audio paths (so a copy elsewhere still works)."""
    rows = []
    for line in src.read_text().splitlines():
        e = json.loads(line)
        if e.get("source_lang") == "en" and e.get("target_lang") == "en":
            e["audio_filepath"] = str((src.parent / e["audio_filepath"]).resolve())
            rows.append(json.dumps(e))
    return rows


def tokenizers(manifest: Path) -> tuple[Path, Path]:
    spl, en = OUT / "tokenizers" / "spl_tokens", OUT / "tokenizers" / "en_1024"
    serinus = [sys.executable, "-m", "serinus.cli", "tokenizer"]
    if not (spl / "tokenizer.model").is_file():
        subprocess.run(serinus + ["special", str(spl)], check=True, env=_env())
    if not en.is_dir():
        subprocess.run(serinus + ["train", "--manifest", str(manifest), str(en), "--vocab-size", "1024", "--lang", "en"],
                       check=True, env=_env())
    model = next(en.rglob("tokenizer.model"))
    return spl, model.parent


def seed_line(manifest: Path, spl: Path, en: Path, exp_dir: Path, steps: int) -> list[str]:
    """The seed's overrides, paths pointed here."""
    return [
        "name=canary-small", "model.prompt_format=canary2",
        f"model.train_ds.manifest_filepath={manifest}", f"model.validation_ds.manifest_filepath={manifest}",
        f"model.test_ds.manifest_filepath={manifest}", f"model.tokenizer.langs.en.dir={en}",
        f"model.tokenizer.langs.spl_tokens.dir={spl}", f"spl_tokens.model_dir={spl}",
        "model.encoder.n_layers=2", "model.transf_decoder.config_dict.num_layers=2",
        f"exp_manager.exp_dir={exp_dir}", "exp_manager.resume_ignore_no_checkpoint=true",
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
    ]


def _env(threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_serinus(line: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "serinus.train", "--config-path", str(CONFIGS), "--config-name",
           "fast-conformer_aed.yaml", *line]
    t = time.time()
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(f"serinus train failed:\n{proc.stderr[-3000:]}")
    exp = Path(next(x.split("=", 1)[1] for x in line if x.startswith("exp_manager.exp_dir=")))
    steps = [json.loads(x) for x in (exp / "canary-small" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    # like NeMo's side: from the end of step 1 to the end of the last step (data loading included)
    return {"wall": wall, "steps": len(steps), "span": steps[-1]["elapsed"] - steps[0]["elapsed"],
            "span_steps": len(steps) - 1,
            "audio_per_step": sum(r["audio_seconds"] for r in steps[1:]) / max(len(steps) - 1, 1),
            "stderr": proc.stderr, "stdout": proc.stdout}


def run_nemo(nemo_python: str, line: list[str], threads: int, steps: int, wait_after: float) -> dict:
    """NeMo's script with the seed's line; after training it runs its test pass over model.test_ds,
    which with an untrained model can take far longer than training: it gets `wait_after` seconds to
    finish, then is stopped (and the row says so)."""
    clock = OUT / "nemo_steps.json"
    clock.unlink(missing_ok=True)
    cmd = [nemo_python, "-c", NEMO_DRIVER, str(CONFIGS / "speech_to_text_aed.py"), str(clock),
           "--config-path", str(CONFIGS), "--config-name", "fast-conformer_aed.yaml", *line,
           "trainer.devices=1", "trainer.accelerator=cpu", "trainer.precision=32",
           # the YAML's sync_batchnorm=true makes Lightning's DDP strategy wrap SyncBatchNorm, which
           # "only works with GPU modules": NeMo needs this fourth flag on a CPU as well
           "trainer.sync_batchnorm=false"]
    t = time.time()
    proc = subprocess.Popen(cmd, env={**_env(threads), "HYDRA_FULL_ERROR": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    trained_at, finished = None, True
    while proc.poll() is None:
        time.sleep(1)
        if trained_at is None and clock.is_file() and len(json.loads(clock.read_text() or "{}").get("steps", [])) >= steps:
            trained_at = time.time()
        if trained_at is not None and time.time() - trained_at > wait_after:
            proc.kill()
            finished = False
            break
    wall = time.time() - t
    failed = None
    if finished and proc.returncode != 0:
        if not clock.is_file() or len(json.loads(clock.read_text())["steps"]) < steps:
            raise SystemExit(f"NeMo failed:\n{proc.stderr.read()[-3000:]}")
        failed = proc.stderr.read().strip().splitlines()[-1][-160:]  # after its training steps (its test pass)
    rec = json.loads(clock.read_text())["steps"]
    return {"wall": wall, "finished": finished, "failed": failed, "trained": (trained_at or time.time()) - t,
            "steps": len(rec),
            "span": rec[-1]["end"] - rec[0]["end"], "span_steps": len(rec) - 1,
            "audio_per_step": sum(r["audio"] for r in rec[1:]) / max(len(rec) - 1, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nemo-python", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", nargs="*", default=[],
                   help="overrides added on both sides after the seed's line, e.g. model.train_ds.use_bucketing=false "
                        "model.train_ds.batch_size=16 (equal batches for a throughput comparison)")
    p.add_argument("--tag", default="", help="suffix of the cached results, for runs with --extra")
    p.add_argument("--wait-after", type=float, default=120,
                   help="seconds NeMo's test pass may take after its training steps before it is stopped")
    p.add_argument("--sides", default="serinus,serinus_fp32,nemo,nemo_nolog",
                   help="which to run now; the others are read from the last run's results")
    args = p.parse_args()
    manifest = english_manifest()
    spl, en = tokenizers(manifest)
    rows = {}
    cpu32 = ["trainer.devices=1", "trainer.accelerator=cpu", "trainer.precision=32"]  # what NeMo needs here
    # nemo_nolog: the same, with log_every_n_steps above the step count: NeMo's training_step then skips
    # decoding the training batch for its WER metric (it does that every log_every_n_steps steps)
    for side in ("serinus", "serinus_fp32", "nemo", "nemo_nolog"):
        cached = OUT / f"result_{side}{args.tag}.json"
        if side not in args.sides.split(","):
            rows[side] = json.loads(cached.read_text())
            continue
        exp = OUT / f"exp_{side}"
        subprocess.run(["rm", "-rf", str(exp)])
        line = seed_line(manifest, spl, en, exp, args.steps) + list(args.extra)
        if side.startswith("nemo"):
            if side == "nemo_nolog":
                line = [x for x in line if not x.startswith("trainer.log_every_n_steps=")] + [
                    f"trainer.log_every_n_steps={args.steps + 1}"]
            rows[side] = run_nemo(args.nemo_python, line, args.threads, args.steps, args.wait_after)
        else:
            rows[side] = run_serinus(line + (cpu32 if side == "serinus_fp32" else []), args.threads)
        r = rows[side]
        cached.write_text(json.dumps(r))
        print(f"{side}: {r['wall']:.1f} s for the command, {r['steps']} steps", flush=True)
    n, q = rows["nemo"], rows["nemo_nolog"]
    print("\n| | NeMo, the seed's line + 4 CPU flags (fp32) | NeMo, same, log_every_n_steps > steps | Serinus, the "
          "seed's line as is (bf16-mixed from the YAML) | Serinus with NeMo's CPU flags (fp32) |\n|---|---|---|---|---|")

    def cells(r, ref):
        per = r["span"] / r["span_steps"]
        ref_per = ref["span"] / ref["span_steps"]
        aps, ref_aps = r["audio_per_step"] / per, ref["audio_per_step"] / ref_per
        wall = f"{r['wall']:.1f}" + ("" if r.get("finished", True) else " (stopped in its test pass)")
        if r.get("failed"):
            wall = f"failed after training: {r['failed']}"
        trained = r.get("trained", r["wall"])
        return {"wall": wall, "trained": f"{trained:.1f}" if trained == trained else "-", "per": f"{per:.2f}", "audio": f"{r['audio_per_step']:.0f}",
                "aps": f"{aps:.1f}" + (f" ({aps / ref_aps:.2f}x)" if r is not ref else "")}

    table = [cells(n, n), cells(q, q), cells(rows["serinus"], q), cells(rows["serinus_fp32"], q)]
    for key, title in (("wall", "whole command, s"), ("trained", "start to the end of the last step, s"),
                       ("per", f"s per training step (steps 2..{args.steps}, data loading included)"),
                       ("audio", "audio s per step"), ("aps", "audio s per wall s of training (vs NeMo without per-step WER)")):
        print(f"| {title} | " + " | ".join(c[key] for c in table) + " |")
    print("\nSerinus's notes on the seed line:\n" + "\n".join(
        "  " + x for x in rows["serinus"]["stderr"].splitlines() if x.startswith("serinus train")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
