"""WER on English sentences no training manifest has seen: other templates, other words, other voices.

    python benchmarks/heldout_english.py --model runs/synth_en/model [--model runs/other/model ...]

The sentences below were written for this check (not from the synthetic corpus's template grammar);
each is spoken by espeak-ng voices the corpus does not use (en-us/en-gb with other variants, and
other English accents), written under runs/heldout_en/ (needs `espeak-ng` on the PATH: apt-get
install espeak-ng). WER is lower-cased with punctuation removed (serinus.train.normalize_text).
Synthetic speech is easy: never quote this as a real-world WER.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "heldout_en"

SENTENCES = [
    "My neighbour repairs old bicycles in his garage.",
    "The train to the airport leaves every twenty minutes.",
    "Please turn off the lights when you leave the office.",
    "We planted tomatoes and beans behind the house.",
    "The museum is closed on Mondays and public holidays.",
    "Her grandmother tells wonderful stories about the war.",
    "Can you recommend a good restaurant near the station?",
    "The children built a snowman in the park this morning.",
    "I forgot my umbrella, so I got completely wet.",
    "The doctor said I should drink more water.",
    "Our team won the match in the last minute.",
    "The library has thousands of books about history.",
    "He is learning to play the guitar on weekends.",
    "The bakery on the corner sells fresh bread.",
    "They moved to a small village near the mountains.",
    "Remember to water the plants while I am away.",
    "The storm knocked down several trees last night.",
    "She drives her daughter to school every day.",
    "The price of coffee has gone up again.",
    "We watched a documentary about whales yesterday.",
    "The hotel room had a beautiful view of the sea.",
    "My brother works as an engineer in a large factory.",
    "The concert starts at eight o'clock in the evening.",
    "Nobody knows where the old key was hidden.",
]
VOICES = ["en-us-nyc+m4", "en-gb-x-gbcwmd+f2", "en-029+m2", "en-gb-x-gbclan+f4", "en-us-nyc+f5", "en-029+m6"]


def synthesize() -> Path:
    manifest = OUT / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng)")
    OUT.mkdir(parents=True, exist_ok=True)
    import soundfile as sf

    rows = []
    for i, text in enumerate(SENTENCES):
        voice = VOICES[i % len(VOICES)]
        wav = OUT / f"heldout_{i:02d}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(150 + 7 * (i % 5)), "-w", str(wav), text], check=True)
        rows.append({"audio_filepath": wav.name, "duration": round(sf.info(str(wav)).duration, 3), "text": text,
                     "source_lang": "en", "target_lang": "en", "pnc": "yes", "voice": f"espeak-ng:{voice}"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def training_texts() -> set[str]:
    """Every sentence of every training manifest of ../shared/data, normalised: transcripts, translations
    and their source texts, in any language."""
    from serinus.train import normalize_text

    texts = set()
    for path in sorted((ROOT.parent / "shared" / "data").glob("*/*_train.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts.update(normalize_text(row[k]) for k in ("text", "source_text") if row.get(k))
    return texts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import jiwer

    from serinus import CanaryModel
    from serinus.train import normalize_text

    manifest = synthesize()
    seen = training_texts()
    assert not any(normalize_text(s) in seen for s in SENTENCES), "a held-out sentence occurs in a training manifest"
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    print(f"{len(rows)} held-out sentences, {sum(r['duration'] for r in rows):.0f} s, voices {', '.join(VOICES)}")
    print("\n| model | WER (held-out English) |\n|---|---|")
    for name in args.model:
        model = CanaryModel.from_pretrained(name)
        hyps = model.transcribe(str(manifest), batch_size=8, beam_size=1)
        refs = [normalize_text(r["text"]) for r in rows]
        wer = jiwer.wer(refs, [normalize_text(h.text) for h in hyps])
        print(f"| {name} | {100 * wer:.1f}% |")
        for r, h in list(zip(rows, hyps))[:3]:
            print(f"|   ref: {r['text']} / hyp: {h.text} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
