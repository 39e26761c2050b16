"""Dev WER of trained models, split by whether each dev line's sentence occurs in any training manifest.

    python benchmarks/dev_overlap.py --model runs/synth_en/model [--model ...] [--lang en]

The trainer's `wer_unseen` counts a dev line as unseen when its text is not in the run's own training
data (for the English recipe: the English transcription lines). The corpus's translation manifests hold
more text: their English side translates German, Spanish and French audio, and some of those sentences
are dev sentences verbatim. Here a line counts as seen when its sentence occurs anywhere in a training
manifest of ../shared/data (transcripts, translations, source texts, any language; normalised), so the
WER of the lines in no manifest at all is read apart. Decoding: the model's own settings, batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT.parent / "shared" / "data" / "synth-v1" / "asr_dev.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--lang", default="en", help="dev lines of this language (transcription lines)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jiwer

    from heldout_english import training_texts
    from serinus import CanaryModel
    from serinus.train import normalize_text

    rows = [json.loads(x) for x in DEV.read_text().splitlines()]
    rows = [r for r in rows if r["source_lang"] == args.lang and r.get("target_lang", args.lang) == args.lang]
    refs = [normalize_text(r["text"]) for r in rows]
    seen = training_texts()
    groups = {"all": range(len(rows)),
              "in no training manifest": [i for i, r in enumerate(refs) if r not in seen],
              "in a training manifest": [i for i, r in enumerate(refs) if r in seen]}
    print("\n| model | " + " | ".join(f"{k} ({len(v)} lines)" for k, v in groups.items()) + " |")
    print("|---|" + "---|" * len(groups))
    for name in args.model:
        model = CanaryModel.from_pretrained(name)
        hyps = model.transcribe([str(DEV.parent / r["audio_filepath"]) for r in rows], source_lang=args.lang,
                                target_lang=args.lang, batch_size=1)
        hyps = [normalize_text(h.text) for h in hyps]
        cells = [f"{100 * jiwer.wer([refs[i] for i in v], [hyps[i] for i in v]):.1f}%" if v else "-"
                 for v in groups.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
