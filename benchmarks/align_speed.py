"""Viterbi forced-alignment speed: frames of 80 ms vs. a realistic token count (~5 tokens/s).

    python benchmarks/align_speed.py [--device cuda] [--repeats 3]

Prints one row per audio length: frames T, target states U = 2N+1, best wall time of `viterbi_align`
and of the whole `forced_align_batch` (text -> timestamps).
"""

from __future__ import annotations

import argparse
import time

import torch

from serinus.align import forced_align_batch, viterbi_align

VOCAB = 1535  # blank = vocab size, as in canary-1b-v2's aux CTC model
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches".split()


class WordTokenizer:
    """Stand-in tokenizer: one token per word (the timing only depends on the number of tokens)."""

    def __init__(self):
        self.vocab = {w: i + 1 for i, w in enumerate(sorted(set(WORDS)))}
        self.inv = {i: w for w, i in self.vocab.items()}

    def text_to_ids(self, text):
        return [self.vocab[w] for w in text.split()]

    def text_to_tokens(self, text):
        return ["▁" + w for w in text.split()]

    def ids_to_tokens(self, ids):
        return ["<unk>" if i == 0 else "▁" + self.inv[i] for i in ids]

    def ids_to_text(self, ids):
        return " ".join(self.inv.get(i, "⁇") for i in ids)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--minutes", type=float, nargs="*", default=[0.5, 2, 10])
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = WordTokenizer()
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'audio':>8} {'T':>6} {'U':>6} {'viterbi_align':>14} {'forced_align':>13}")
    for minutes in args.minutes:
        T = int(minutes * 60 / 0.08)
        n_tokens = int(minutes * 60 * 5)  # ~5 tokens/s of speech
        text = " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens))
        log_probs = torch.randn(1, T, VOCAB + 1, device=args.device).log_softmax(-1)
        ids = tok.text_to_ids(text)
        y = torch.full((1, 2 * len(ids) + 1), VOCAB)
        y[0, 1::2] = torch.tensor(ids)
        t_vit = best_of(lambda: viterbi_align(log_probs, [T], y, [y.shape[1]]), args.repeats)
        t_all = best_of(lambda: forced_align_batch([text], log_probs, [T], tok, VOCAB, 0.08), args.repeats)
        print(f"{minutes:>6.1f}min {T:>6} {y.shape[1]:>6} {t_vit:>13.3f}s {t_all:>12.3f}s")


if __name__ == "__main__":
    main()
