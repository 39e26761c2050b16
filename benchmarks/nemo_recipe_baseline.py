"""NeMo 3.0.0's own AED recipe (fast-conformer_aed.yaml + speech_to_text_aed.py, in its own venv) on the
data, model size and wall-clock budget of configs/synth_en.yaml, for the note beside Serinus's curve.

    python benchmarks/nemo_recipe_baseline.py --nemo-python /work/nemo_venv/bin/python [--minutes 30]

Same as configs/synth_en.yaml where NeMo has the setting: the 1,933 English training lines, the
15 English lines of synth-v1/asr_dev.jsonl for validation, the tokenizer of runs/synth_en (spl_tokens
+ English BPE-128; train configs/synth_en.yaml once first), a 4 x 176 FastConformer (4 heads, 4x
subsampling with 64 channels) and a 2 x 256 decoder, 40 s batches, AdamW 3e-3 with 300 warm-up steps,
SpecAugment 2 x 27 / 5 x 0.05, label smoothing 0.1, the prompt-loss mask, float32 on the CPU.
NeMo has no CTC loss. Printed: NeMo's validation WER at each validation, steps, and audio seconds per
wall second of training (from its TensorBoard events: num_frames, train_step_timing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CONFIGS = ROOT.parent / "shared" / "fixtures" / "nemo" / "configs"
OUT = ROOT / "runs" / "nemo_baseline"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_vs_nemo import english_lines, english_manifest  # noqa: E402


def events(folder: Path) -> list[tuple[int, str, float, float]]:
    """(step, tag, value, wall time) of every scalar in NeMo's TensorBoard event files."""
    from tensorboardX.proto import event_pb2 as pb

    out = []
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i + 12 <= len(data):
            n = int.from_bytes(data[i:i + 8], "little")
            e = pb.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(e.step, v.tag, v.simple_value, e.wall_time) for v in e.summary.value]
    return out


NEMO_TRANSCRIBE = r"""
import json, sys, logging
logging.disable(logging.WARNING)
from nemo.collections.asr.models import EncDecMultiTaskModel
model = EncDecMultiTaskModel.restore_from(sys.argv[1], map_location="cpu").eval()
hyps = model.transcribe(sys.argv[2], batch_size=8, num_workers=0, verbose=False)
print("RESULT " + json.dumps([h.text if hasattr(h, "text") else str(h) for h in hyps]))
"""


def final_wer(nemo_python: str, exp: Path, dev: Path) -> str:
    """The WER of the .nemo NeMo saved at the end, decoded by NeMo itself (its default decoding)."""
    import jiwer

    sys.path.insert(0, str(ROOT))
    from serinus.train import normalize_text

    files = sorted(exp.rglob("*.nemo"), key=lambda f: f.stat().st_mtime)
    if not files:
        return "no .nemo was saved"
    out = subprocess.run([nemo_python, "-c", NEMO_TRANSCRIBE, str(files[-1]), str(dev)], capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return f"NeMo could not decode: {out.stderr[-500:]}"
    hyps = json.loads(line[len("RESULT "):])
    refs = [json.loads(x)["text"] for x in dev.read_text().splitlines() if x]
    wer = jiwer.wer([normalize_text(r) for r in refs], [normalize_text(h) for h in hyps])
    pairs = "; ".join(f"{r!r} -> {h!r}" for r, h in list(zip(refs, hyps))[:3])
    return f"{100 * wer:.1f}% on {len(refs)} dev lines ({files[-1].name}); e.g. {pairs}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nemo-python", required=True)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--val-every", type=int, default=500)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    train = english_manifest()  # the same 1,933 lines as benchmarks/seed_vs_nemo.py
    dev = OUT / "dev_en.jsonl"
    dev.write_text("\n".join(english_lines(DATA / "synth-v1" / "asr_dev.jsonl")) + "\n")
    tok = ROOT / "runs" / "synth_en" / "tokenizer"
    en = next((tok / "en").rglob("tokenizer.model")).parent
    minutes = int(args.minutes)
    line = [
        "name=nemo-synth-en", "model.prompt_format=canary2", "model.use_loss_mask_for_prompt=true",
        f"model.train_ds.manifest_filepath={train}", f"model.validation_ds.manifest_filepath={dev}",
        "~model.test_ds", f"model.tokenizer.langs.en.dir={en}",
        f"model.tokenizer.langs.spl_tokens.dir={tok / 'spl_tokens'}", f"spl_tokens.model_dir={tok / 'spl_tokens'}",
        "model.model_defaults.asr_enc_hidden=176", "model.model_defaults.lm_enc_hidden=256",
        "model.model_defaults.lm_dec_hidden=256", "model.encoder.n_layers=4", "model.encoder.n_heads=4",
        "model.encoder.subsampling_factor=4", "model.encoder.subsampling_conv_channels=64",
        "model.transf_decoder.config_dict.num_layers=2", "model.transf_decoder.config_dict.num_attention_heads=4",
        "model.transf_decoder.config_dict.max_sequence_length=256",
        "model.train_ds.batch_duration=40", "model.train_ds.num_workers=0", "model.validation_ds.num_workers=0",
        "model.label_smoothing=0.1", "model.spec_augment.time_masks=5",
        "model.optim.lr=3e-3", "model.optim.sched.warmup_steps=300",
        f"+trainer.max_time=00:00:{minutes:02d}:00", "trainer.max_steps=100000", f"trainer.val_check_interval={args.val_every}",
        "trainer.log_every_n_steps=100", "trainer.num_sanity_val_steps=0",
        # an epoch here is ~150 steps: without this, an int val_check_interval counts within one epoch
        # and NeMo never validates
        "trainer.check_val_every_n_epoch=null",
        f"exp_manager.exp_dir={OUT / 'exp'}", "exp_manager.resume_if_exists=false",
        "trainer.devices=1", "trainer.accelerator=cpu", "trainer.precision=32", "trainer.sync_batchnorm=false",
    ]
    subprocess.run(["rm", "-rf", str(OUT / "exp")])
    t = time.time()
    proc = subprocess.run([args.nemo_python, str(CONFIGS / "speech_to_text_aed.py"), "--config-path", str(CONFIGS),
                           "--config-name", "fast-conformer_aed.yaml", *line], capture_output=True, text=True)
    wall = time.time() - t
    (OUT / "stderr.txt").write_text(proc.stderr)
    ev = events(OUT / "exp")
    steps = [(s, v, w) for s, tag, v, w in ev if tag == "train_step_timing in s"]
    frames = [v for _, tag, v, _ in ev if tag == "num_frames"]
    t0 = min(w for _, tag, _, w in ev) if ev else t
    print(f"NeMo exit {proc.returncode}, {wall / 60:.1f} min in all; steps logged up to {max((s for s, _, _ in steps), default=0)}")
    print("\n| minutes (since its first event) | step | NeMo val WER % |\n|---|---|---|")
    for s, tag, v, w in ev:
        if tag in ("val_wer", "val_en_wer") or tag.endswith("wer") and tag.startswith("val"):
            print(f"| {(w - t0) / 60:.1f} | {s} | {100 * v:.1f} |")
    print(f"\nfinal model: {final_wer(args.nemo_python, OUT / 'exp', dev)}")
    if steps and frames:
        per = sum(v for _, v, _ in steps) / len(steps)
        audio = sum(frames) / len(frames) / 16000
        print(f"\ntraining: {per:.3f} s per logged step, {audio:.1f} audio s per step, {audio / per:.1f} audio s "
              "per wall s (sampled every 100 steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
