"""NeMo's side of tools/nemo_variants_check.py, run with NeMo's own Python (never imported by Serinus).

    python _nemo_variants_side.py SPEC.json OUT_DIR

SPEC: {"name", "overrides": {dotted key under `model`: value}, "tokenizer": "aggregate" | "unified",
"audio": [wav paths], "transcribe": [{"kwargs": ..., "decoding": {...}}]}. Writes OUT_DIR/<name>.nemo
(random weights, seed 0) and OUT_DIR/<name>.npz / <name>.json: NeMo's features, encoder output,
teacher-forced log-probs and transcribe() token ids, all from the model restored from the .nemo.
"""

import json
import os
import sys

import numpy as np

SHARED = os.environ["SERINUS_SHARED"]
FIXTURES = os.path.join(SHARED, "fixtures", "nemo")
TOKENIZERS = os.path.join(FIXTURES, "tokenizers")


def set_dotted(cfg, key, value):
    *parents, last = key.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[last] = value


def build(spec, out_dir):
    import torch
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(os.path.join(FIXTURES, "configs", "fast-conformer_aed.yaml")).model
    with open_dict(cfg):
        for key in ("train_ds", "validation_ds", "test_ds"):
            cfg.pop(key, None)
        if spec.get("tokenizer", "aggregate") == "unified":
            cfg.tokenizer = {"dir": os.path.join(TOKENIZERS, "unified", "tokenizer_spe_bpe_v1535"), "type": "bpe",
                             "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer."
                                                              "CanaryBPETokenizer"}}
        else:
            spl = os.path.join(TOKENIZERS, "spl_tokens")
            if spec["overrides"].get("prompt_format") == "canary":  # canary-1b's own special tokens
                from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer

                spl = os.path.join(out_dir, "spl_tokens_v1")
                CanaryTokenizer.build_special_tokenizer(
                    ["<|transcribe|>", "<|translate|>", "<|en|>", "<|es|>", "<|de|>", "<|fr|>"], spl)
            langs = {"spl_tokens": {"dir": spl, "type": "bpe"}}
            for lang in ("en", "de", "es", "fr"):
                langs[lang] = {"dir": os.path.join(TOKENIZERS, lang, "tokenizer_spe_bpe_v256"), "type": "bpe"}
            cfg.tokenizer.langs = langs
        for key, value in spec["overrides"].items():
            set_dotted(cfg, key, value)
    torch.manual_seed(0)
    model = EncDecMultiTaskModel(cfg=cfg)
    path = os.path.join(out_dir, spec["name"] + ".nemo")
    model.save_to(path)
    return path


def main(spec_path, out_dir):
    import soundfile
    import torch
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.collections.asr.parts.submodules.multitask_decoding import MultiTaskDecodingConfig
    from omegaconf import OmegaConf

    spec = json.load(open(spec_path))
    torch.set_num_threads(2)
    path = build(spec, out_dir)
    model = EncDecMultiTaskModel.restore_from(path, map_location="cpu").eval()
    arrays, info = {}, {"name": spec["name"], "vocab_size": model.tokenizer.vocab_size}

    clips = [soundfile.read(p, dtype="float32")[0] for p in spec["audio"]]
    lens = torch.tensor([len(c) for c in clips])
    audio = torch.zeros(len(clips), int(lens.max()))
    for i, c in enumerate(clips):
        audio[i, : len(c)] = torch.from_numpy(c)
    with torch.inference_mode():
        feats, flen = model.preprocessor(input_signal=audio, length=lens)
        encoded, elen = model.encoder(audio_signal=feats, length=flen)
        g = torch.Generator().manual_seed(1)
        vocab = model.tokenizer.vocab_size
        tokens = torch.randint(0, vocab, (len(clips), 12), generator=g)
        token_lens = torch.tensor([12 - i % 3 for i in range(len(clips))])
        log_probs, *_ = model.forward(input_signal=audio, input_signal_length=lens, transcript=tokens,
                                      transcript_length=token_lens)
    arrays.update(audio=audio.numpy(), audio_lens=lens.numpy(), feats=feats.numpy(), feat_lens=flen.numpy(),
                  encoded=encoded.numpy(), encoded_lens=elen.numpy(), tokens=tokens.numpy(),
                  token_lens=token_lens.numpy(), log_probs=log_probs.float().numpy())

    runs = []
    for run in spec["transcribe"]:
        dec = run["decoding"]
        # a plain config, not the dataclass: NeMo reads beam.length_penalty, a key its dataclass lacks
        decoding = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(
            MultiTaskDecodingConfig(strategy=dec["strategy"]))))
        if dec["strategy"] == "greedy":
            decoding.greedy.max_generation_delta = dec["max_generation_delta"]
        else:
            decoding.beam.beam_size = dec["beam_size"]
            decoding.beam.length_penalty = dec["length_penalty"]
            decoding.beam.max_generation_delta = dec["max_generation_delta"]
        model.change_decoding_strategy(decoding)
        hyps = model.transcribe(spec["audio"], batch_size=1, return_hypotheses=True, num_workers=0, verbose=False,
                                **run["kwargs"])
        hyps = hyps[0] if isinstance(hyps, tuple) else hyps
        runs.append({**run, "ids": [[int(i) for i in h.y_sequence] for h in hyps], "text": [h.text for h in hyps]})
        model.eval()  # NeMo's decoding leaves the decoder in train mode
    info["runs"] = runs
    np.savez(os.path.join(out_dir, spec["name"] + ".npz"), **arrays)
    json.dump(info, open(os.path.join(out_dir, spec["name"] + ".json"), "w"), indent=1)
    print(json.dumps({"name": spec["name"], "nemo": path}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
