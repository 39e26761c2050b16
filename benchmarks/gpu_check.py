"""CUDA path check (run by hand on a GPU machine): same token ids as the CPU in float32,
bf16 output, and timings of the encoder + greedy decoding.

    python benchmarks/gpu_check.py --fixtures ../shared/fixtures/nemo
"""

import argparse
import time
from pathlib import Path

import torch

from serinus import CanaryModel


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return out, best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "shared/fixtures/nemo"))
    args = parser.parse_args()
    fixtures = Path(args.fixtures)
    files = sorted(str(p) for p in (fixtures / "audio").glob("*_0*.wav"))
    print(f"{'model':<22} {'device':<6} {'dtype':<9} {'same ids as cpu fp32':>20} {'seconds':>8}")
    for name in ["tiny_canary2", "tiny_canary2_v2style"]:
        cpu = CanaryModel.from_pretrained(fixtures / f"{name}.nemo")
        ref, t_cpu = timed(lambda: cpu.transcribe(files, batch_size=9, beam_size=1, timestamps=True))
        print(f"{name:<22} {'cpu':<6} {'float32':<9} {'-':>20} {t_cpu:8.3f}")
        if not torch.cuda.is_available():
            continue
        gpu = CanaryModel.from_pretrained(fixtures / f"{name}.nemo", device="cuda")
        for dtype in (torch.float32, torch.bfloat16):
            model = gpu.to(dtype)
            out, t = timed(lambda: model.transcribe(files, batch_size=9, beam_size=1, timestamps=True))
            same = sum(a.y_sequence == b.y_sequence for a, b in zip(out, ref))
            print(f"{name:<22} {'cuda':<6} {str(dtype)[6:]:<9} {f'{same}/{len(ref)}':>20} {t:8.3f}")
            if dtype == torch.bfloat16:
                for a, b in zip(out[:2], ref[:2]):
                    print("   bf16:", a.text[:70], "| cpu:", b.text[:70])


if __name__ == "__main__":
    main()
