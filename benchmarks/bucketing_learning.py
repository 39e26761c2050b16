"""How batching changes how fast a CTC model learns on the English lines of ../shared/data (run by hand).

Trains the CTC model of configs/synth_en_ctc.yaml (SpecAugment off, so only the batching differs) for
--steps steps with the trainer's own sampler, once per batching variant, and prints the mean training
CTC loss (per token) of every 100 steps:

    flock /tmp/serinus-cpu.lock python benchmarks/bucketing_learning.py [--steps 600]

Variants: `1-D` (duration buckets: train_ds.num_subbuckets=1, the default), `2-D` (each duration
bucket split in 2 by token count, NeMo's 2-D bucketing, the earlier default), and `sorted` (all
utterances sorted by duration with 0.5 s of jitter and cut into 40 s batches, then shuffled).
About 4-5 minutes per variant on a 2-core CPU.
"""

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from serinus.model.ctc import ctc_loss
from serinus.train import loop
from serinus.train.config import load_config
from serinus.train.optim import build_optimizer
from serinus.train.tasks import make_task

REPO = Path(__file__).resolve().parents[1]


def sorted_batches(cuts, budget: float, seed: int = 0):
    rng = random.Random(seed)
    cuts = list(cuts)
    while True:
        order = sorted(range(len(cuts)), key=lambda i: cuts[i].duration + rng.random() * 0.5)
        batches, cur, longest = [], [], 0.0
        for i in order:
            d = cuts[i].duration
            if cur and (len(cur) + 1) * max(d, longest) > budget:
                batches.append(cur)
                cur, longest = [], 0.0
            cur.append(i)
            longest = max(longest, d)
        batches.append(cur)
        rng.shuffle(batches)
        for b in batches:
            yield [cuts[i] for i in b]


def run(variant: str, steps: int, tokenizer_dir: str) -> list[float]:
    overrides = ["model.spec_augment=null", f"tokenizer.dir={tokenizer_dir}",
                 f"train_ds.num_subbuckets={2 if variant == '2-D' else 1}"]
    cfg = load_config(str(REPO / "configs" / "synth_en_ctc.yaml"), overrides)
    torch.manual_seed(0)
    task = make_task(cfg)
    tokenizer = loop.build_tokenizer(cfg)
    model = task.build_model(tokenizer).train()
    dataset = task.dataset(model, audio_cache={})
    cuts = task.attach_num_tokens(loop.load_cuts(cfg["train_ds"]), model)
    if variant == "sorted":
        source = sorted_batches(cuts, float(cfg["train_ds"]["batch_duration"]))
    else:
        sampler = loop.build_sampler(cfg["train_ds"], cuts, 0, 1, 0)
        source = (b for _, _, b in loop.batch_stream(sampler, 0, 0))
    opt, sched = build_optimizer(model, cfg["optim"], int(cfg["trainer"]["max_steps"]))
    losses, t0 = [], time.time()
    for step, cut_batch in enumerate(source, 1):
        batch = dataset[cut_batch]
        log_probs, lengths = model(batch.audio, batch.audio_lens)
        loss = ctc_loss(log_probs, lengths, batch.transcript, batch.transcript_lens, blank=model.blank_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step >= steps:
            break
    print(f"{variant}: {steps} steps in {(time.time() - t0) / 60:.1f} min", flush=True)
    return losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--variants", default="1-D,2-D,sorted")
    p.add_argument("--tokenizer-dir", default=str(REPO / "runs" / "synth_en_ctc" / "tokenizer"),
                   help="a BPE-128 tokenizer folder (serinus train builds one on its first run of synth_en_ctc)")
    args = p.parse_args()
    torch.set_num_threads(2)
    variants = args.variants.split(",")
    curves = {v: run(v, args.steps, args.tokenizer_dir) for v in variants}
    print("\n| steps | " + " | ".join(f"{v} CTC loss" for v in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for start in range(0, args.steps, 100):
        cells = [f"{np.mean(curves[v][start:start + 100]):.2f}" for v in variants]
        print(f"| {start + 1}-{min(start + 100, args.steps)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
