"""Serinus against NeMo on a CPU, side by side: one table. Run by hand, never in the test suite.

    flock /tmp/serinus-cpu.lock python benchmarks/vs_nemo.py [--threads 2] [--nemo-python PATH] [--dtypes ...]

The model is the canary-180m-flash architecture (17-layer FastConformer d512, 4-layer decoder d1024,
tokenizer 1152 special + 4 x 1024 BPE) with random weights, built once by NeMo itself
(benchmarks/_nemo_side.py build) and cached under runs/vs_nemo/. NeMo runs in its own virtual
environment (`pip install torch==2.13.0 "nemo_toolkit[asr]==3.0.0"`; never a Serinus dependency).
Every measurement is a fresh process per side (run the whole script under the shared CPU lock),
on the same audio with the same greedy settings (max_generation_delta 0: random weights never emit
EOS, so each item decodes to its length limit) and threads; in each process, after a warm-up, the
encoder and the 9 clips are timed `--repeat` times (3) and the best counts, on both sides alike
(a shared host's speed moves ~10% from minute to minute; the 77 s clip is timed once). Beside each figure is the floor this
machine allows, from its own measured memory bandwidth and GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SERINUS_SHARED", REPO.parent / "shared"))
AUDIO = SHARED / "fixtures" / "nemo" / "audio"
CACHE = REPO / "runs" / "vs_nemo"
MODEL = CACHE / "canary-180m-flash-random.nemo"
# every transcribe run warms up on this short clip first (not on its own first input: for the 77 s
# task that would be the whole clip again, doubling its wall time), the same on both sides
WARMUP = AUDIO / "en_01.wav"


def best_of(repeat: int, fn):
    """(the fastest of `repeat` calls of fn in seconds, fn's last result): timeit's rule."""
    best, result = float("inf"), None
    for _ in range(max(repeat, 1)):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


# -- Serinus's side (this file, run with --serinus-side in a fresh process) --------------------

def serinus_side(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from serinus import CanaryModel

    t_import = time.perf_counter() - T0
    dtype, _, variant = spec["dtype"].partition("-")  # "float32-nodraft": float32, one token per pass
    t = time.perf_counter()
    model = CanaryModel.from_pretrained(spec["model"], dtype=dtype)
    out = {"import_s": t_import, "load_s": time.perf_counter() - t}
    if spec["task"] == "encoder":
        import soundfile

        audio = torch.stack([torch.from_numpy(soundfile.read(p, dtype="float32")[0]) for p in spec["audio"]])
        lengths = torch.full((audio.shape[0],), audio.shape[1])
        with torch.inference_mode():
            model.preprocessor(audio[:1, :16000], lengths[:1].clamp(max=16000))  # warm-up
            repeat = spec.get("repeat", 1)
            out["features_s"], (feats, flen) = best_of(repeat, lambda: model.preprocessor(audio, lengths))
            out["encoder_s"], _ = best_of(repeat, lambda: model.encoder(feats, flen))
    else:
        kwargs = dict(batch_size=spec["batch_size"], beam_size=1, max_generation_delta=spec["max_generation_delta"],
                      source_lang="en", target_lang="en", pnc="yes", enable_chunking=False,
                      speculative=variant != "nodraft")
        model.transcribe([spec["warmup"]], **kwargs)  # warm-up on a short clip, as on NeMo's side
        out["wall_s"], hyps = best_of(spec.get("repeat", 1), lambda: model.transcribe(spec["audio"], **kwargs))
        out["ids"] = [h.y_sequence for h in hyps]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# -- machine floors -------------------------------------------------------------------------

def machine_floors(threads: int) -> dict:
    """Memory read bandwidth (GB/s) and GEMM rates (GFLOP/s) of this machine, best of a few tries."""
    import warnings

    import torch

    torch.set_num_threads(threads)

    def best(f):  # seconds of the fastest of 7 tries
        return best_of(7, f)[0]

    x = torch.ones(64 * 2**20)  # 256 MB, far beyond the caches
    out = {"bandwidth_gbs": x.numel() * 4 / best(x.sum) / 1e9}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048**3
    # the faster of torch's default matmul (MKL for float32) and oneDNN with a packed weight (what
    # Serinus's Linear layers run: on an AMD CPU MKL's float32 path is far from this machine's peak)
    out["gemm_fp32_gflops"] = flops / best(lambda: a @ b) / 1e9
    a16, b16 = a.bfloat16(), b.bfloat16()
    out["gemm_bf16_gflops"] = flops / best(lambda: a16 @ b16) / 1e9
    from serinus.precision import onednn_packing_available

    if onednn_packing_available():
        linear = torch.ops.mkldnn._linear_pointwise
        for name, x, w in (("fp32", a, b), ("bf16", a16, b16)):
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            rate = flops / best(lambda: linear(x, packed, None, "none", [], "")) / 1e9
            out[f"gemm_{name}_gflops"] = max(out[f"gemm_{name}_gflops"], rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from serinus.precision import quantize_int8

        lin = quantize_int8(torch.nn.Sequential(torch.nn.Linear(2048, 2048)))
        with torch.inference_mode():
            out["gemm_int8_gflops"] = 2 * 2048**3 / best(lambda: lin(a)) / 1e9
    return out


# -- the orchestration ------------------------------------------------------------------------

def run_side(cmd: list[str], spec: dict, env: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(cmd + [f.name], capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"vs_nemo: {' '.join(cmd[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def build_model(nemo_python: str, env: dict) -> None:
    if MODEL.is_file():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"building {MODEL} with NeMo (once) ...", file=sys.stderr)
    proc = subprocess.run([nemo_python, str(REPO / "benchmarks" / "_nemo_side.py"), "build", str(MODEL),
                           str(CACHE / "build")], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"vs_nemo: building the model with NeMo failed:\n{proc.stderr[-3000:]}")


def crops_30s() -> list[str]:
    """4 x 30 s of speech cut from the 130 s fixture clip (written once into the cache)."""
    import soundfile

    data, sr = soundfile.read(str(AUDIO / "en_long2.wav"), dtype="float32")
    paths = []
    for i in range(4):
        path = CACHE / f"crop30_{i}.wav"
        if not path.is_file():
            soundfile.write(str(path), data[i * 30 * sr : (i + 1) * 30 * sr], sr)
        paths.append(str(path))
    return paths


def agreement(ref: list[list[int]], ids: list[list[int]]) -> dict:
    prefix = 0
    for a, b in zip(ref, ids):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
    return {"exact": sum(a == b for a, b in zip(ref, ids)), "items": len(ref), "prefix": prefix,
            "ref_tokens": sum(map(len, ref)), "tokens": sum(map(len, ids))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nemo-python", default="/work/nemo_venv/bin/python")
    p.add_argument("--dtypes", default="float32,float32-nodraft,bfloat16,int8",
                   help="Serinus columns; float32-nodraft: float32 without speculative decoding")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed calls per task in each process, after its warm-up; the best counts, on both sides "
                        "(the 77 s clip is timed once: NeMo takes ~90 s over it)")
    p.add_argument("--json", help="also write every raw measurement here")
    p.add_argument("--nemo-from", help="reuse NeMo's measurements from an earlier --json file (same machine) "
                                       "instead of running NeMo again; the table says so")
    p.add_argument("--serinus-side", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serinus_side:
        print(json.dumps(serinus_side(json.loads(Path(args.serinus_side).read_text()))))
        return 0

    env = {**os.environ, "SERINUS_SHARED": str(SHARED), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    build_model(args.nemo_python, env)
    short = sorted(str(p) for p in AUDIO.glob("*_0*.wav"))
    long = [str(AUDIO / "en_long.wav")]
    tasks = {"encoder": dict(task="encoder", audio=crops_30s(), repeat=args.repeat),
             "b1": dict(task="transcribe", audio=short, batch_size=1, repeat=args.repeat),
             "b8": dict(task="transcribe", audio=short, batch_size=8, repeat=args.repeat),
             "long": dict(task="transcribe", audio=long, batch_size=1)}
    sides = {"nemo": [args.nemo_python, str(REPO / "benchmarks" / "_nemo_side.py"), "time", str(MODEL)]}
    results: dict = {}
    if args.nemo_from:  # NeMo's side as measured before: only Serinus runs now
        earlier = json.loads(Path(args.nemo_from).read_text())["runs"]
        results = {("nemo", name): earlier[f"nemo:{name}"] for name in tasks}
        del sides["nemo"]
    for dtype in args.dtypes.split(","):
        sides[dtype] = [sys.executable, str(Path(__file__).resolve()), "--serinus-side"]
    for side, cmd in sides.items():
        for name, task in tasks.items():
            spec = {**task, "threads": args.threads, "max_generation_delta": 0, "model": str(MODEL), "dtype": side,
                    "warmup": str(WARMUP)}
            print(f"{side:>9} {name} ...", file=sys.stderr, flush=True)
            results[(side, name)] = run_side(cmd, spec, env)
    measured = subprocess.run([sys.executable, "-c",
                                "import json,sys; sys.path.insert(0, %r); from benchmarks.vs_nemo import machine_floors; "
                                "print(json.dumps(machine_floors(%d)))" % (str(REPO), args.threads)],
                               capture_output=True, text=True, env=env)
    floors = json.loads(measured.stdout.strip().splitlines()[-1])
    if args.json:
        Path(args.json).write_text(json.dumps({"floors": floors, "runs": {f"{s}:{n}": r for (s, n), r in results.items()}}))
    print(render(results, floors, short, long, [s for s in sides if s != "nemo"], args.threads))
    print(f"timings: per process, after a warm-up, the best of {args.repeat} calls (encoder, 9 clips), on both "
          "sides; the 77 s clip once")
    if args.nemo_from:
        print(f"\nNeMo's column: measured earlier on this machine, reused from {args.nemo_from}")
    return 0


# -- the table --------------------------------------------------------------------------------

# decoder weights one step reads at batch 1 (cross-attention K/V are computed once per utterance):
# 4 layers x (self-attn 4 h^2 + cross-attn q/out 2 h^2 + FFN 8 h^2) + head h x V, h = 1024, V = 5248
STEP_PARAMS = 4 * 14 * 1024**2 + 1024 * 5248
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
GEMM = {"float32": "gemm_fp32_gflops", "bfloat16": "gemm_bf16_gflops", "int8": "gemm_int8_gflops"}
ENCODER_PARAMS = 17 * 6.3e6  # per frame, 2 flops per weight: the encoder's matmuls (attention scores aside)


def render(results, floors, short, long, dtypes, threads) -> str:
    import soundfile

    dur_short = sum(soundfile.info(p).duration for p in short)
    dur_long = soundfile.info(long[0]).duration
    r = lambda side, name: results[(side, name)]  # noqa: E731
    cols = ["nemo"] + dtypes

    def step_ms(side):
        run, enc = r(side, "long"), r(side, "encoder")
        tokens = sum(map(len, run["ids"]))  # decoder steps: one per token plus the final one
        enc_long = (enc["features_s"] + enc["encoder_s"]) * dur_long / 120.0  # encoder time scaled to the clip
        return 1000 * (run["wall_s"] - enc_long) / (tokens + 1)

    def step_floor(dtype):
        return 1000 * STEP_PARAMS * BYTES[dtype] / (floors["bandwidth_gbs"] * 1e9)

    def enc_floor(dtype):
        frames = 4 * 30 / 0.08
        return 2 * ENCODER_PARAMS * frames / (floors[GEMM[dtype]] * 1e9)

    rows = []

    def row(label, values, fmt, better="lower", floor=None):
        nemo = values[0]
        cells = [fmt(nemo)]
        for v in values[1:]:
            ratio = (nemo / v if better == "lower" else v / nemo) if v else float("nan")
            cells.append(f"{fmt(v)} ({ratio:.2f}x)")
        rows.append([label] + cells + [floor or ""])

    row("import (s)", [r(c, "b1")["import_s"] for c in cols], lambda v: f"{v:.2f}")
    row("load (s)", [r(c, "b1")["load_s"] for c in cols], lambda v: f"{v:.2f}")
    row("cold start: import + load (s)", [r(c, "b1")["import_s"] + r(c, "b1")["load_s"] for c in cols],
        lambda v: f"{v:.2f}")
    row("features, 4 x 30 s (s)", [r(c, "encoder")["features_s"] for c in cols], lambda v: f"{v:.3f}")
    row("encoder, 4 x 30 s (s)", [r(c, "encoder")["encoder_s"] for c in cols], lambda v: f"{v:.2f}",
        floor=" / ".join(f"{d[:4]} {enc_floor(d):.2f}" for d in ("float32", "bfloat16", "int8")))
    row("ms per token, batch 1 (77 s clip, encoder aside)", [step_ms(c) for c in cols], lambda v: f"{v:.1f}",
        floor=" / ".join(f"{d[:4]} {step_floor(d):.1f}" for d in ("float32", "bfloat16", "int8")) + " a step")
    for name, label, dur in (("b1", f"9 clips ({dur_short:.1f} s), batch 1", dur_short),
                             ("b8", "same clips, batch 8", dur_short),
                             ("long", f"{dur_long:.0f} s clip whole", dur_long)):
        row(f"{label}: wall (s)", [r(c, name)["wall_s"] for c in cols], lambda v: f"{v:.2f}")
        row(f"{label}: RTFx", [dur / r(c, name)["wall_s"] for c in cols], lambda v: f"{v:.1f}", better="higher")
        ref = r("nemo", name)["ids"]
        cells = [f"{sum(map(len, ref))} tokens"]
        for c in cols[1:]:
            a = agreement(ref, r(c, name)["ids"])
            per_token = (r("nemo", name)["wall_s"] / max(a["ref_tokens"], 1)) / (r(c, name)["wall_s"] / max(a["tokens"], 1))
            cells.append(f"{a['tokens']} tok, exact {a['exact']}/{a['items']}, prefix {a['prefix']}, "
                         f"{per_token:.2f}x/token")
        rows.append([f"{label}: tokens, agreement with NeMo"] + cells + [""])
    row("peak RSS, worst run (MB)", [max(r(c, n)["peak_rss_mb"] for n in ("b1", "b8", "long", "encoder")) for c in cols],
        lambda v: f"{v:.0f}")
    if "float32" in dtypes:
        for c in dtypes:
            if c == "float32":
                continue
            cells = []
            for name in ("b1", "b8", "long"):
                a = agreement(r("float32", name)["ids"], r(c, name)["ids"])
                cells.append(f"{name}: exact {a['exact']}/{a['items']}, prefix {a['prefix']}/{a['ref_tokens']}")
            rows.append([f"{c} vs Serinus float32 tokens", "; ".join(cells)] + [""] * (len(cols)))
    header = ["measure", "NeMo float32"] + [f"Serinus {c} (vs NeMo)" for c in dtypes] + ["floor (fp32 / bf16 / int8)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row_) + " |" for row_ in rows]
    lines.append("")
    lines.append(f"machine: {floors['bandwidth_gbs']:.1f} GB/s memory read, GEMM {floors['gemm_fp32_gflops']:.0f} "
                 f"GFLOP/s fp32, {floors['gemm_bf16_gflops']:.0f} bf16, {floors['gemm_int8_gflops']:.0f} int8 "
                 f"(dynamic); {threads} threads; greedy, max_generation_delta 0")
    if "float32" in dtypes:
        lines.append("float32: greedy decoding checks an int8 draft's proposals in one pass, runs of 8 doubling to 32 "
                     "while all are accepted (speculative decoding; every token is float32's own argmax), so its ms "
                     "per token can go under one step's floor; float32-nodraft: one token per pass")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
