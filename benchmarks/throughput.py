"""Inference speed of a released architecture (random weights; run by hand, CPU or GPU).

Encoder time for a batch of 20 s clips and greedy decoding speed (KV cache) for a fixed
100 new tokens per item, in float32 and (on GPU) bfloat16.

    python benchmarks/throughput.py --preset canary-180m-flash --batch 8 [--device cuda]
"""

import argparse
import time

import torch

from serinus.decoding import greedy_decode
from serinus.model.canary import CanaryModel, preset_config


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="canary-180m-flash")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CanaryModel(preset_config(args.preset, 16384)).to(args.device).eval()
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device.startswith("cuda") else [])
    audio = 0.1 * torch.randn(args.batch, int(args.seconds * 16000), device=args.device)
    lengths = torch.full((args.batch,), audio.shape[1], device=args.device)
    prompts = torch.full((args.batch, 9), 5, device=args.device)
    print(f"{args.preset}, batch {args.batch} x {args.seconds:.0f} s, {args.device}")
    print(f"{'dtype':<9} {'encoder s':>9} {'RTF enc':>8} {'decode s':>9} {'tokens/s':>9} {'RTF total':>9}")
    for dtype in dtypes:
        model.to(dtype)
        x = audio.to(dtype)
        with torch.inference_mode():
            for _ in range(2):  # warm-up, then timed
                sync(args.device)
                t0 = time.perf_counter()
                states, mask, _ = model.encode(x, lengths)
                sync(args.device)
                t1 = time.perf_counter()
                out = greedy_decode(model.decoder, states, mask, prompts, [args.tokens] * args.batch, eos_id=-1)
                sync(args.device)
                t2 = time.perf_counter()
        n = sum(len(o) for o in out)
        total_audio = args.batch * args.seconds
        print(f"{str(dtype)[6:]:<9} {t1 - t0:9.3f} {(t1 - t0) / total_audio:8.4f} {t2 - t1:9.3f} {n / (t2 - t1):9.0f} "
              f"{(t2 - t0) / total_audio:9.4f}")


if __name__ == "__main__":
    main()
