"""Token agreement of the bfloat16 and int8 modes with float32. Run by hand (under the CPU lock).

    python benchmarks/precision_agreement.py [--model runs/synth_en/model] [--lang en] [--limit 56]

On the fixture clips (the 9 short clips) and on the synthetic corpus (../shared/data/synth-v1,
asr_dev.jsonl), for the three fixture Canary checkpoints and every trained model given with
--model: items whose ids equal float32's, tokens of float32's that the mode reproduces at the same
position, and, for the trained models, WER of each mode against the references (jiwer), so a
precision mode's cost in accuracy is read beside float32's. (The fixture checkpoints were tuned
on the 9 clips only, so their WER on the corpus would say nothing.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SERINUS_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "nemo"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default="tiny_canary2,tiny_canary2_unified,tiny_canary2_v2style",
                   help="fixture checkpoints (names in ../shared/fixtures/nemo)")
    p.add_argument("--model", action="append", default=[], help="a trained checkpoint (path or Hub id); repeatable")
    p.add_argument("--limit", type=int, default=56, help="synthetic dev items (default: all 56)")
    p.add_argument("--lang", help="only the dev items of this source language (e.g. en, for an English model)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import jiwer

    from serinus import CanaryModel
    from serinus.precision import cpu_has_bf16
    from serinus.train import normalize_text

    clips = sorted(str(x) for x in (FIXTURES / "audio").glob("*_0*.wav"))
    dev_rows = [json.loads(line) for line in open(SHARED / "data" / "synth-v1" / "asr_dev.jsonl")]
    dev_rows = [r for r in dev_rows if args.lang in (None, r.get("source_lang"))][: args.limit]
    dev = [str(SHARED / "data" / "synth-v1" / r["audio_filepath"]) for r in dev_rows]
    refs = [normalize_text(r["text"]) for r in dev_rows]  # lower-cased, no punctuation: the trainer's WER
    dtypes = ["float32", "int8"] + (["bfloat16"] if cpu_has_bf16() else [])
    models = [str(FIXTURES / f"{m}.nemo") for m in args.fixtures.split(",") if m] + args.model
    trained = set(args.model)
    dev_name = f"synth-v1 asr_dev ({args.lang})" if args.lang else "synth-v1 asr_dev"
    print("| model | set | dtype | exact items | tokens as float32 | WER | seconds |")
    print("|---|---|---|---|---|---|---|")
    for path in models:
        outs = {}
        for dtype in dtypes:
            model = CanaryModel.from_pretrained(path, dtype=dtype)
            for name, audio in (("fixture clips", clips), (dev_name, dev)):
                t = time.perf_counter()
                hyps = model.transcribe(audio, batch_size=8, source_lang="en", target_lang="en", pnc="yes")
                outs[(dtype, name)] = (hyps, time.perf_counter() - t)
        for name in ("fixture clips", dev_name):
            base = [h.y_sequence for h in outs[("float32", name)][0]]
            for dtype in dtypes:
                hyps, seconds = outs[(dtype, name)]
                ids = [h.y_sequence for h in hyps]
                exact = sum(a == b for a, b in zip(base, ids))
                same = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(base, ids))
                wer = ""
                if path in trained and name != "fixture clips":
                    wer = f"{100 * jiwer.wer(refs, [normalize_text(h.text) or '-' for h in hyps]):.1f}"
                label = Path(path).stem if path.endswith(".nemo") else path
                print(f"| {label} | {name} | {dtype} | {exact}/{len(ids)} | {same}/{sum(map(len, base))} "
                      f"| {wer} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
