"""Serinus against NeMo on Canary architectures the fixtures do not cover: other widths, heads, kernels,
subsampling, norms, front-end settings, both prompt formats and both tokenizer layouts.

Each variant is built by NeMo itself (random weights, seed 0) from NeMo's own fast-conformer_aed.yaml
with a few overrides, and run by NeMo (`_nemo_variants_side.py`, in NeMo's virtual environment:
`python3 -m venv X && X/bin/pip install torch==2.13.0 "nemo_toolkit[asr]==3.0.0"`); Serinus then loads
the same .nemo and compares features, encoder output, teacher-forced log-probs and transcribe() token
ids (batch 1, and Serinus's batch 3 against its batch 1). Run by hand, never in the test suite:

    python tools/nemo_variants_check.py --nemo-python /path/to/nemo_venv/bin/python [--only NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
AUDIO = SHARED / "fixtures" / "nemo" / "audio"

GREEDY = {"strategy": "greedy", "max_generation_delta": 20}
BEAM = {"strategy": "beam", "beam_size": 3, "length_penalty": 0.5, "max_generation_delta": 10}
ASR_EN = {"source_lang": "en", "target_lang": "en", "pnc": "yes"}

VARIANTS = [
    # canary-1b's layout: the v1 prompt, equal encoder and decoder widths (no projection)
    {"name": "v1_k31_xscaling_striding4", "overrides": {
        "prompt_format": "canary", "model_defaults.asr_enc_hidden": 96, "model_defaults.lm_dec_hidden": 96,
        "encoder.n_layers": 2, "encoder.n_heads": 2, "encoder.conv_kernel_size": 31, "encoder.xscaling": True,
        "encoder.subsampling": "striding", "encoder.subsampling_factor": 4, "encoder.subsampling_conv_channels": 32,
        "encoder.ff_expansion_factor": 2, "transf_decoder.config_dict.num_layers": 3,
        "transf_decoder.config_dict.num_attention_heads": 3, "transf_decoder.config_dict.max_sequence_length": 512},
     "transcribe": [{"kwargs": ASR_EN, "decoding": GREEDY},
                    # the task given: NeMo 3.0.0 transcribes when it is missing, Serinus follows the languages
                    {"kwargs": {"source_lang": "en", "target_lang": "de", "pnc": "no", "taskname": "ast"},
                     "decoding": BEAM}]},
    # layer-norm conv modules, shared position biases, no biases, 16x subsampling, another front end
    {"name": "ln_tied_nobias_16x_80mel", "overrides": {
        "prompt_format": "canary2", "model_defaults.asr_enc_hidden": 128, "model_defaults.lm_dec_hidden": 64,
        "encoder.n_layers": 2, "encoder.n_heads": 4, "encoder.conv_norm_type": "layer_norm",
        "encoder.untie_biases": False, "encoder.use_bias": False, "encoder.subsampling_factor": 16,
        "encoder.subsampling_conv_channels": 48, "encoder.feat_in": 80, "preprocessor.features": 80,
        "preprocessor.window": "hamming", "preprocessor.normalize": "all_features",
        "preprocessor.log_zero_guard_type": "clamp", "preprocessor.n_fft": 400,
        "transf_decoder.config_dict.num_layers": 1, "transf_decoder.config_dict.num_attention_heads": 4,
        "transf_decoder.config_dict.hidden_act": "gelu"},
     "transcribe": [{"kwargs": ASR_EN, "decoding": GREEDY},
                    {"kwargs": {**ASR_EN, "timestamps": True}, "decoding": GREEDY}]},
    # canary-1b-v2's tokenizer layout, a narrow encoder under a wide decoder, padded features
    {"name": "unified_proj_pad16_k5", "tokenizer": "unified", "overrides": {
        "prompt_format": "canary2", "model_defaults.asr_enc_hidden": 64, "model_defaults.lm_dec_hidden": 160,
        "encoder.n_layers": 3, "encoder.n_heads": 8, "encoder.conv_kernel_size": 5,
        "encoder.subsampling_conv_channels": -1, "preprocessor.pad_to": 16, "preprocessor.window_size": 0.02,
        "preprocessor.n_fft": None, "preprocessor.mag_power": 1.0,
        "transf_decoder.config_dict.num_layers": 2, "transf_decoder.config_dict.num_attention_heads": 5},
     "transcribe": [{"kwargs": ASR_EN, "decoding": GREEDY},
                    {"kwargs": {"source_lang": "en", "target_lang": "fr", "pnc": "yes"}, "decoding": BEAM}]},
    # every item runs into a short decoder's max_sequence_length (delta -1); no feature normalisation, a band
    {"name": "maxlen40_nonorm_band", "overrides": {
        "prompt_format": "canary2", "model_defaults.asr_enc_hidden": 128, "model_defaults.lm_dec_hidden": 128,
        "encoder.n_layers": 1, "encoder.n_heads": 4, "preprocessor.normalize": "NA", "preprocessor.lowfreq": 100,
        "preprocessor.highfreq": 7000, "transf_decoder.config_dict.num_layers": 1,
        "transf_decoder.config_dict.max_sequence_length": 40},
     "transcribe": [{"kwargs": ASR_EN, "decoding": {**GREEDY, "max_generation_delta": -1}},
                    {"kwargs": ASR_EN, "decoding": {**BEAM, "length_penalty": 1.0, "max_generation_delta": -1}}]},
    # no pre-emphasis, a position table shorter than the clips (NeMo extends it), a narrow conv kernel
    {"name": "nopreemph_short_posemb_k3", "overrides": {
        "prompt_format": "canary2", "model_defaults.asr_enc_hidden": 128, "model_defaults.lm_dec_hidden": 128,
        "encoder.n_layers": 2, "encoder.n_heads": 4, "encoder.pos_emb_max_len": 16, "encoder.conv_kernel_size": 3,
        "preprocessor.preemph": None, "transf_decoder.config_dict.num_layers": 1},
     "transcribe": [{"kwargs": ASR_EN, "decoding": GREEDY},
                    {"kwargs": {"source_lang": "en", "target_lang": "es", "pnc": "no"}, "decoding": BEAM}]},
]
CLIPS = ["en_01.wav", "de_01.wav", "en_short.wav"]


def serinus_kwargs(run: dict) -> dict:
    dec = run["decoding"]
    kwargs = dict(run["kwargs"])
    if dec["strategy"] == "beam":
        kwargs.update(beam_size=dec["beam_size"], length_penalty=dec["length_penalty"],
                      max_generation_delta=dec["max_generation_delta"])
    else:
        kwargs.update(beam_size=1, max_generation_delta=dec["max_generation_delta"])
    return kwargs


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max()) if ours.size else 0.0


def compare(name: str, out: Path) -> dict:
    from serinus import CanaryModel

    ref = np.load(out / f"{name}.npz")
    info = json.loads((out / f"{name}.json").read_text())
    model = CanaryModel.from_pretrained(out / f"{name}.nemo")
    row = {"variant": name}
    audio, lens = torch.from_numpy(ref["audio"]), torch.from_numpy(ref["audio_lens"])
    with torch.inference_mode():
        feats, flen = model.preprocessor(audio, lens)
        row["feature lengths"] = flen.tolist() == ref["feat_lens"].tolist()
        row["features max abs"] = max(max_diff(feats[i, :, :n].numpy(), ref["feats"][i, :, :n])
                                      for i, n in enumerate(ref["feat_lens"].tolist()))
        encoded, elen = model.encoder(torch.from_numpy(ref["feats"]), torch.from_numpy(ref["feat_lens"]))
        row["encoder lengths"] = elen.tolist() == ref["encoded_lens"].tolist()
        row["encoder max abs"] = max(max_diff(encoded[i, :, :n].numpy(), ref["encoded"][i, :, :n])
                                     for i, n in enumerate(ref["encoded_lens"].tolist()))
        tokens, token_lens = torch.from_numpy(ref["tokens"]), torch.from_numpy(ref["token_lens"])
        log_probs = model(audio, lens, tokens, token_lens)
        row["log-probs max abs"] = max(max_diff(log_probs[i, :n].numpy(), ref["log_probs"][i, :n])
                                       for i, n in enumerate(token_lens.tolist()))
    paths = [str(AUDIO / c) for c in CLIPS]
    exact, total, batch_same = 0, 0, True
    for run in info["runs"]:
        kwargs = serinus_kwargs(run)
        one = model.transcribe(paths, batch_size=1, **kwargs)
        three = model.transcribe(paths, batch_size=3, **kwargs)
        for h, h3, ids in zip(one, three, run["ids"]):
            exact += list(h.y_sequence) == ids
            total += 1
            batch_same &= list(h3.y_sequence) == list(h.y_sequence)
        row.setdefault("tokens", []).append(sum(len(i) for i in run["ids"]))
    row["transcribe ids = NeMo"] = f"{exact}/{total}"
    row["batch 3 = batch 1"] = batch_same
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo-python", default=os.environ.get("NEMO_PYTHON", "/work/nemo_venv/bin/python"))
    p.add_argument("--out", default=str(ROOT / "runs" / "nemo_variants"))
    p.add_argument("--only", help="one variant's name")
    p.add_argument("--reuse", action="store_true", help="compare against NeMo outputs already in --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in VARIANTS:
        if args.only and variant["name"] != args.only:
            continue
        if not (args.reuse and (out / f"{variant['name']}.json").exists()):
            spec = {**variant, "audio": [str(AUDIO / c) for c in CLIPS]}
            spec_path = out / f"{variant['name']}.spec.json"
            spec_path.write_text(json.dumps(spec))
            env = {**os.environ, "SERINUS_SHARED": str(SHARED)}
            print(f"NeMo builds and runs {variant['name']} ...", file=sys.stderr, flush=True)
            subprocess.run([args.nemo_python, str(ROOT / "tools" / "_nemo_variants_side.py"), str(spec_path), str(out)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
        rows.append(compare(variant["name"], out))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2e}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
