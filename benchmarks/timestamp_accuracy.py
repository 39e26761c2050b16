"""Forced-alignment timing accuracy on the synthetic long-form recordings (run by hand).

Aligns each recording's reference transcript with a checkpoint's packed CTC aligner
(`serinus align`'s code path) and compares word start/end times with the synthesiser's
own word times. Also times the CTC forward against the Viterbi alignment.

    python benchmarks/timestamp_accuracy.py [--model ../shared/fixtures/nemo/tiny_canary2_v2style.nemo]

The fixture aligner was trained on 9 short clips only; its numbers say that the pipeline
works end to end, not how accurate a real canary-1b-v2 is.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from serinus import CanaryModel
from serinus.align import ctc_log_probs, forced_align_batch
from serinus.audio import load_audio

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(REPO.parent / "shared/fixtures/nemo/tiny_canary2_v2style.nemo"))
    parser.add_argument("--manifest", default=str(REPO.parent / "shared/data/synth-v1/longform_dev.jsonl"))
    args = parser.parse_args()
    model = CanaryModel.from_pretrained(args.model)
    tokenizer = model.aligner_tokenizer or model.tokenizer
    rows = []
    for line in open(args.manifest):
        entry = json.loads(line)
        audio = load_audio(Path(args.manifest).parent / entry["audio_filepath"])
        ref_words = entry["words"] if isinstance(entry["words"], list) else eval(entry["words"])  # noqa: S307 (our data)
        t0 = time.perf_counter()
        log_probs, lengths = ctc_log_probs(model.aligner, [audio])
        t1 = time.perf_counter()
        result = forced_align_batch([entry["text"]], log_probs, lengths, tokenizer, model.aligner.blank_id,
                                    model.aligner.frame_seconds, ["word", "segment"])[0]
        t2 = time.perf_counter()
        words = result.timestamp["word"]
        assert [w["word"] for w in words] == [w["word"] for w in ref_words], "word lists differ"
        start_err = np.abs([w["start"] - r["start"] for w, r in zip(words, ref_words)])
        end_err = np.abs([w["end"] - r["end"] for w, r in zip(words, ref_words)])
        monotonic = all(a["start"] <= b["start"] and a["end"] <= b["start"] + 1e-9 for a, b in zip(words, words[1:]))
        rows.append((entry["utt_id"], len(audio) / 16000, len(words), start_err.mean(), end_err.mean(),
                     np.median(start_err), monotonic, t1 - t0, t2 - t1))
    print("Forced alignment of the reference transcript (serinus align):")
    print(f"{'recording':<22} {'sec':>6} {'words':>5} {'mean|start|':>11} {'mean|end|':>9} {'med|start|':>10} "
          f"{'monotonic':>9} {'ctc fwd s':>9} {'viterbi s':>9}")
    for r in rows:
        print(f"{r[0]:<22} {r[1]:6.1f} {r[2]:5d} {r[3]:11.3f} {r[4]:9.3f} {r[5]:10.3f} {str(r[6]):>9} {r[7]:9.3f} {r[8]:9.3f}")

    print("\ntranscribe(timestamps=True) on the same recordings (chunked; the model's own text):")
    entries = [json.loads(line) for line in open(args.manifest)]
    paths = [str(Path(args.manifest).parent / e["audio_filepath"]) for e in entries]
    hyps = model.transcribe(paths, timestamps=True, source_lang=entries[0]["source_lang"], batch_size=1)
    print(f"{'recording':<22} {'words':>5} {'words == text':>13} {'monotonic':>9} {'timed':>6}")
    for entry, hyp in zip(entries, hyps):
        words = hyp.timestamp["word"]
        timed = [w for w in words if w["start"] is not None]
        agree = [w["word"] for w in words] == hyp.text.split()
        monotonic = all(a["start"] <= a["end"] <= b["start"] + 1e-9 for a, b in zip(timed, timed[1:]))
        print(f"{entry['utt_id']:<22} {len(words):5d} {str(agree):>13} {str(monotonic):>9} {len(timed):6d}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
