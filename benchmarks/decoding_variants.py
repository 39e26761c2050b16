"""Dev and held-out English WER of one trained model under several decodings (joint CTC/attention).

    python benchmarks/decoding_variants.py --model runs/synth_en/model

Dev: the English lines of synth-v1/asr_dev.jsonl (the recipe's validation set). Held-out: the
sentences and voices of benchmarks/heldout_english.py (needs espeak-ng). Each row also gives the
decoding's wall time over both sets, on this machine's threads. Synthetic speech is easy: never
quote these WERs as real-world figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT.parent / "shared" / "data" / "synth-v1" / "asr_dev.jsonl"

# (name, beam, ctc_weight); ctc_weight 0 is the decoder alone
VARIANTS = [
    ("attention only, greedy", 1, 0.0),
    ("attention only, beam 4", 4, 0.0),
    ("joint 0.3, beam 1", 1, 0.3),
    ("joint 0.3, beam 4", 4, 0.3),
    ("joint 0.5, beam 4", 4, 0.5),
    ("joint 0.7, beam 4", 4, 0.7),
    ("joint 0.5, beam 8", 8, 0.5),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--variants", help="comma-separated indices into the table (default: all)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jiwer

    from heldout_english import synthesize
    from serinus import CanaryModel
    from serinus.train import normalize_text

    model = CanaryModel.from_pretrained(args.model)
    dev_rows = [json.loads(x) for x in DEV.read_text().splitlines()]
    dev_rows = [dict(r, audio_filepath=str(DEV.parent / r["audio_filepath"])) for r in dev_rows
                if r.get("source_lang") == "en" and r.get("target_lang", "en") == "en"]
    held = synthesize()
    held_rows = [dict(r, audio_filepath=str(held.parent / r["audio_filepath"]))
                 for r in map(json.loads, held.read_text().splitlines())]
    base = model.cfg.decoding
    chosen = VARIANTS if not args.variants else [VARIANTS[int(i)] for i in args.variants.split(",")]
    print(f"model {args.model}: {len(dev_rows)} dev lines, {len(held_rows)} held-out sentences")
    print("\n| decoding | dev WER % | held-out WER % | seconds |\n|---|---|---|---|")
    for name, beam, weight in chosen:
        model.cfg.decoding = dataclasses.replace(base, beam_size=beam, ctc_weight=weight)
        t0 = time.perf_counter()
        wers = []
        for rows in (dev_rows, held_rows):
            hyps = model.transcribe([r["audio_filepath"] for r in rows], batch_size=8, source_lang="en",
                                    target_lang="en", pnc="yes")
            wers.append(100 * jiwer.wer([normalize_text(r["text"]) for r in rows],
                                        [normalize_text(h.text) for h in hyps]))
        print(f"| {name} | {wers[0]:.1f} | {wers[1]:.1f} | {time.perf_counter() - t0:.1f} |", flush=True)
    model.cfg.decoding = base
    return 0


if __name__ == "__main__":
    sys.exit(main())
