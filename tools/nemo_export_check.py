"""Check that `.nemo` archives written by Serinus's exporter restore in NeMo and decode the same tokens.

Run by hand, with NeMo in its own virtual environment (never a Serinus dependency):

    python3 -m venv /work/nemo_venv && /work/nemo_venv/bin/pip install torch==2.13.0 "nemo_toolkit[asr]==3.0.0"
    python tools/nemo_export_check.py --nemo-python /work/nemo_venv/bin/python \
        [--model runs/synth_en/model --manifest ../shared/data/synth-v1/asr_dev.jsonl --limit 15]

For each model (the three NeMo fixtures, plus any --model): Serinus loads it, writes it with
`save_nemo`, and decodes the manifest greedily (batch 1); a NeMo subprocess restores the exported
archive with `EncDecMultiTaskModel.restore_from` and decodes the same manifest the same way. The
table gives, per model, how many utterances have identical token ids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "nemo"

NEMO_SIDE = r"""
import json, sys, logging
logging.disable(logging.WARNING)
from nemo.collections.asr.models import EncDecMultiTaskModel
from omegaconf import open_dict
results = []
for path, manifest in json.loads(sys.argv[1]):
    model = EncDecMultiTaskModel.restore_from(path, map_location="cpu").eval()
    cfg = model.cfg.decoding
    with open_dict(cfg):
        cfg.strategy = "beam"; cfg.beam.beam_size = 1
    model.change_decoding_strategy(cfg)
    hyps = model.transcribe(manifest, batch_size=1, return_hypotheses=True, num_workers=0, verbose=False)
    results.append([[int(t) for t in h.y_sequence] for h in hyps])
print("RESULT " + json.dumps(results))
"""


def serinus_ids(model, manifest: str) -> list[list[int]]:
    # NeMo chunks long audio only for canary-1b-v2-style models (those with a packed CTC aligner) and
    # decodes it whole otherwise; Serinus (which chunks by default) is made to do the same work.
    # the NeMo side's decoding: a beam of size 1 (which may write one token past the length limit)
    model.cfg.decoding.strategy, model.cfg.decoding.beam_size = "beam", 1
    hyps = model.transcribe(manifest, batch_size=1, enable_chunking=model.aligner is not None)
    return [list(h.y_sequence) for h in hyps]


def nemo_ids(nemo_python: str, jobs: list[tuple[str, str]]) -> list[list[list[int]]]:
    """Token ids per (archive, manifest) job, all in one NeMo process (NeMo's import alone takes ~20 s)."""
    out = subprocess.run([nemo_python, "-c", NEMO_SIDE, json.dumps(jobs)], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"NeMo could not restore or decode {jobs}:\n{out.stderr[-3000:]}")


def limited_manifest(manifest: str, limit: int | None, tmp: Path) -> str:
    """The first `limit` lines, with audio paths made absolute (NeMo and Serinus read the copy)."""
    src = Path(manifest).resolve()
    lines = [json.loads(x) for x in src.read_text().splitlines() if x.strip()][: limit or None]
    for e in lines:
        p = Path(e["audio_filepath"])
        e["audio_filepath"] = str(p if p.is_absolute() else src.parent / p)
    out = tmp / f"{src.stem}.jsonl"
    out.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return str(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nemo-python", required=True, help="the Python of a venv with nemo_toolkit[asr]==3.0.0")
    p.add_argument("--model", action="append", default=[], help="another Serinus model folder or .nemo to check")
    p.add_argument("--manifest", default=None, help="manifest for --model (default: the fixtures' manifest)")
    p.add_argument("--limit", type=int, default=None, help="first N lines of --manifest")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from serinus.checkpoint import load_model

    fixture_manifest = str(FIXTURES / "audio" / "manifest.jsonl")
    runs = [(str(FIXTURES / f"{n}.nemo"), fixture_manifest, None)
            for n in ("tiny_canary2", "tiny_canary2_unified", "tiny_canary2_v2style")]
    runs += [(m, args.manifest or fixture_manifest, args.limit) for m in args.model]
    print("| model | utterances | NeMo on export = Serinus | tokens (Serinus / NeMo) | NeMo on export = NeMo on original |\n"
          "|---|---|---|---|---|")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours, jobs = [], []
        for i, (name, manifest, limit) in enumerate(runs):
            manifest = limited_manifest(manifest, limit, tmp)
            model = load_model(name)
            archive = tmp / f"export{i}.nemo"
            model.save_nemo(archive)
            ours.append(serinus_ids(model, manifest))
            jobs.append((str(archive), manifest))
        originals = [(name, manifest) for (name, _, _), (_, manifest) in zip(runs, jobs) if name.endswith(".nemo")]
        results = nemo_ids(args.nemo_python, jobs + originals)
        theirs_all, again_all = results[: len(jobs)], dict(zip([n for n, _ in originals], results[len(jobs):]))
    for (name, _, _), a_ids, b_ids in zip(runs, ours, theirs_all):
        same = sum(a == b for a, b in zip(a_ids, b_ids))
        ok &= same == len(a_ids) == len(b_ids)
        original = "-"
        if name in again_all:  # the archive NeMo itself wrote: does NeMo decode our export the same way?
            again = again_all[name]
            original = f"{sum(a == b for a, b in zip(b_ids, again))} of {len(again)}"
            ok &= again == b_ids
        print(f"| {name} | {len(a_ids)} | {same} | {sum(map(len, a_ids))} / {sum(map(len, b_ids))} | {original} |")
        for k, (a, b) in enumerate(zip(a_ids, b_ids)):
            if a != b:
                n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  line {k + 1}: first difference at token {n} (Serinus {len(a)}, NeMo {len(b)} tokens)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
