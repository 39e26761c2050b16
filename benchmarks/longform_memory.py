"""Peak memory (RSS) of transcribing long files: it must not grow with the file's length past one
hour segment, since audio over an hour is read, chunked and decoded one hour at a time.

    python benchmarks/longform_memory.py [--hours 0.5 1 2] [--model tiny_canary2.nemo] [--device cpu]

Builds each file from the fixture's short clips (repeated, in varied order, with pauses), then
transcribes it in a fresh process and prints one row per file: hour segments, chunks, RSS after
loading the model, peak RSS while transcribing, their difference, wall time and real-time factor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

SR = 16000
FIXTURES = Path(os.environ.get("SERINUS_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "fixtures" / "nemo"
CLIPS = ["en_01", "en_02", "en_03", "de_01", "de_02", "es_01", "es_02", "fr_01", "fr_02"]

CHILD = r"""
import json, resource, sys, time
import torch
from serinus.checkpoint import load_model
from serinus import transcribe as tr
from serinus.pipeline import decode

def rss_mib():  # current RSS (VmRSS) and peak (VmHWM) from /proc
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

model_path, audio_path, device, batch_size = sys.argv[1:5]
torch.set_grad_enabled(False)
model = load_model(model_path, device=device)
base, _ = rss_mib()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
rows = []
real = decode.run_decoder
def count(m, units, d, encode_rows=None):
    rows.append(len(units))
    return real(m, units, d, encode_rows)
decode.run_decoder = count
start = time.perf_counter()
hyp = tr.transcribe(model, audio_path, batch_size=int(batch_size))[0]
wall = time.perf_counter() - start
_, peak = rss_mib()
print(json.dumps({"base": base, "peak": peak, "wall": wall, "batches": len(rows), "chunks": sum(rows),
                  "error": hyp.error, "words": len(hyp.text.split())}))
"""


def build(path: Path, seconds: float, seed: int) -> None:
    """Clips in varied order with 0-3 s pauses, written in 10-minute blocks (PCM16)."""
    clips = {c: soundfile.read(FIXTURES / "audio" / f"{c}.wav", dtype="float32")[0] for c in CLIPS}
    rng = random.Random(seed)
    total = int(seconds * SR)
    with soundfile.SoundFile(path, "w", SR, 1, subtype="PCM_16") as out:
        written, block, last = 0, [], None
        while written < total:
            name = rng.choice([c for c in CLIPS if c != last])
            last = name
            piece = np.concatenate([clips[name], np.zeros(int(rng.uniform(0, 3) * SR), dtype=np.float32)])
            piece = piece[: total - written]
            block.append(piece)
            written += len(piece)
            if sum(len(b) for b in block) > 600 * SR or written >= total:
                out.write(np.concatenate(block))
                block = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--model", default=str(FIXTURES / "tiny_canary2.nemo"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workdir", help="where to write the test files (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print(f"model {Path(args.model).name}, device {args.device}, batch size {args.batch_size}")
        print(f"{'audio':>8} {'segments':>8} {'chunks':>7} {'model RSS':>10} {'peak RSS':>9} {'peak-model':>10} "
              f"{'wall':>8} {'RTF':>6}")
        for hours in args.hours:
            path = Path(tmp) / f"long_{hours}h.wav"
            build(path, hours * 3600, seed=int(hours * 100))
            proc = subprocess.run([sys.executable, "-c", CHILD, args.model, str(path), args.device, str(args.batch_size)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"child failed for {hours} h:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if r["error"]:
                sys.exit(f"{hours} h: {r['error']}")
            segments = int(np.ceil(hours))
            print(f"{hours:>7.2f}h {segments:>8d} {r['chunks']:>7d} {r['base']:>8.0f} MiB {r['peak']:>5.0f} MiB "
                  f"{r['peak'] - r['base']:>6.0f} MiB {r['wall']:>7.0f}s {r['wall'] / (hours * 3600):>6.3f}")
            path.unlink()


if __name__ == "__main__":
    main()
