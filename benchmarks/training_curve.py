"""The learning curve of one or more `serinus train` runs, from their log.jsonl (run by hand).

    python benchmarks/training_curve.py runs/synth_en [runs/other ...]

Prints one table per run: minutes, step, validation WER (overall, per language, on dev lines whose
sentence is not in the training data), BLEU where there are translation lines, and the mean
training losses over the steps since the previous validation, plus the training throughput.
"""

import json
import sys
from pathlib import Path


def curve(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    print(f"\n{run}: {len(steps)} steps, {len(vals)} validations")
    if not vals:
        return
    metric_keys = sorted({k for v in vals for k in v if k.startswith(("wer_", "bleu_")) and k != "wer_unseen"})
    head = ["min", "step", "WER %", "unseen %"] + [k.replace("wer_", "WER ").replace("bleu_", "BLEU ") for k in metric_keys]
    head += ["train loss", "ctc", "attention", "val loss"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    last = 0
    for v in vals:
        window = [s for s in steps if last < s["step"] <= v["step"]]
        last = v["step"]

        def mean(key):
            xs = [s[key] for s in window if key in s]
            return f"{sum(xs) / len(xs):.3f}" if xs else "-"

        pct = lambda k: f"{100 * v[k]:.1f}" if k in v else "-"  # noqa: E731
        cells = [f"{v.get('minutes', 0):.1f}", str(v["step"]), pct("wer"), pct("wer_unseen")]
        cells += [pct(k) if k.startswith("wer") else f"{v[k]:.1f}" if k in v else "-" for k in metric_keys]
        cells += [mean("loss"), mean("ctc"), mean("attention"), f"{v['val_loss']:.3f}"]
        print(" | ".join(cells))


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["runs/synth_en"]:
        curve(Path(arg))
