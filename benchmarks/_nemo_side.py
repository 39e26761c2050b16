"""NeMo's side of benchmarks/vs_nemo.py, run with NeMo's own Python (never imported by Serinus).

    python _nemo_side.py build OUT.nemo WORKDIR    # the canary-180m-flash architecture, random weights
    python _nemo_side.py time MODEL.nemo SPEC.json # timings of one run, as JSON on the last stdout line
"""

import json
import os
import resource
import sys
import time

from vs_nemo import best_of  # the same timing rule on both sides (vs_nemo imports the standard library only)

T0 = time.perf_counter()
SHARED = os.environ["SERINUS_SHARED"]
FIXTURES = os.path.join(SHARED, "fixtures", "nemo")


def build(out, work):
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model
    from omegaconf import OmegaConf, open_dict

    import torch
    from nemo.collections.asr.models import EncDecMultiTaskModel

    langs = {}
    for lang in ("en", "de", "es", "fr"):  # NeMo's own BPE builder, 1024 pieces, on the project's text
        text = [open(os.path.join(FIXTURES, "tokenizers", "text_corpus", f"{lang}.txt")).read()]
        for name in ("asr_train.jsonl", "ast_train.jsonl", "asr_dev.jsonl", "ast_dev.jsonl"):
            path = os.path.join(SHARED, "data", "synth-v1", name)
            for line in open(path):
                row = json.loads(line)
                if row.get("target_lang", row.get("source_lang")) == lang:
                    text.append(row["text"])
        d = os.path.join(work, f"tok_{lang}")
        os.makedirs(d, exist_ok=True)
        data = os.path.join(d, "text.txt")
        open(data, "w").write("\n".join(text) + "\n")
        create_spt_model(data, 1024, -1, False, tokenizer_type="bpe", output_dir=d)
        langs[lang] = {"dir": d, "type": "bpe"}
    cfg = OmegaConf.load(os.path.join(FIXTURES, "configs", "fast-conformer_aed.yaml")).model
    with open_dict(cfg):
        cfg.prompt_format = "canary2"
        cfg.model_defaults.asr_enc_hidden = 512
        cfg.model_defaults.lm_dec_hidden = 1024
        cfg.encoder.n_layers = 17
        cfg.encoder.n_heads = 8
        cfg.encoder.subsampling_conv_channels = 256
        cfg.encoder.conv_kernel_size = 9
        cfg.transf_decoder.config_dict.num_layers = 4
        cfg.transf_decoder.config_dict.num_attention_heads = 8
        cfg.transf_decoder.config_dict.max_sequence_length = 1024
        cfg.tokenizer.langs = {"spl_tokens": {"dir": os.path.join(FIXTURES, "tokenizers", "spl_tokens"), "type": "bpe"},
                               **langs}
        for key in ("train_ds", "validation_ds", "test_ds"):
            cfg.pop(key, None)
    torch.manual_seed(0)
    model = EncDecMultiTaskModel(cfg=cfg)
    model.save_to(out)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "vocab": model.tokenizer.vocab_size}))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_run(model_path, spec):
    spec = json.load(open(spec))
    import torch

    torch.set_num_threads(spec["threads"])
    from nemo.collections.asr.models import EncDecMultiTaskModel

    t_import = time.perf_counter() - T0
    t = time.perf_counter()
    model = EncDecMultiTaskModel.restore_from(model_path, map_location="cpu").eval()
    t_load = time.perf_counter() - t
    from nemo.collections.asr.parts.submodules.multitask_decoding import MultiTaskDecodingConfig
    from omegaconf import OmegaConf

    decoding = OmegaConf.structured(MultiTaskDecodingConfig(strategy="greedy"))
    decoding.greedy.max_generation_delta = spec["max_generation_delta"]
    model.change_decoding_strategy(decoding)
    out = {"import_s": t_import, "load_s": t_load}
    task = spec["task"]
    if task == "encoder":  # features + encoder on a padded batch
        import soundfile

        audio = torch.stack([torch.from_numpy(soundfile.read(p, dtype="float32")[0]) for p in spec["audio"]])
        lengths = torch.full((audio.shape[0],), audio.shape[1])
        with torch.inference_mode():
            model.preprocessor(input_signal=audio[:1, :16000], length=lengths[:1])  # warm-up
            repeat = spec.get("repeat", 1)
            out["features_s"], (feats, flen) = best_of(repeat, lambda: model.preprocessor(input_signal=audio,
                                                                                          length=lengths))
            out["encoder_s"], _ = best_of(repeat, lambda: model.encoder(audio_signal=feats, length=flen))
    else:  # transcribe the files
        kwargs = dict(batch_size=spec["batch_size"], return_hypotheses=True, num_workers=0, verbose=False,
                      source_lang="en", target_lang="en", pnc="yes")
        model.transcribe([spec["warmup"]], **kwargs)  # warm-up: first-call allocations, lazy imports
        out["wall_s"], hyps = best_of(spec.get("repeat", 1), lambda: model.transcribe(spec["audio"], **kwargs))
        hyps = hyps[0] if isinstance(hyps, tuple) else hyps
        out["ids"] = [[int(i) for i in h.y_sequence] for h in hyps]
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], sys.argv[3])
    else:
        time_run(sys.argv[2], sys.argv[3])
