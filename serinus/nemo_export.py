"""Write a Serinus model as a NeMo `.nemo` archive that NeMo's `EncDecMultiTaskModel.restore_from` loads.

    CanaryModel -> model_config.yaml   (NeMo's layout: preprocessor, encoder, transf_decoder, head, ...)
                -> model_weights.ckpt  (NeMo's parameter names, via checkpoint.rename; derived tensors
                                        such as the mel filterbank and the tied head weight added back)
                -> <hash>_tokenizer.model / .vocab / vocab.txt per sub-tokenizer ("nemo:" paths)
                -> timestamps_asr_model_{config.yaml,weights.ckpt} when a CTC aligner is packed

NeMo has no auxiliary CTC head on its AED model, so a Serinus `ctc_head` is left out (and said so).
`serinus export MODEL OUT.nemo` is the command-line form.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time
import uuid
from pathlib import Path

import torch

from serinus.weights import (ALIGNER_CONFIG_FILE, ALIGNER_WEIGHTS_FILE, CONFIG_FILE, WEIGHTS_FILE,
                             CheckpointError, rename)

NEMO_VERSION = "3.0.0"
AED_TARGET = "nemo.collections.asr.models.aed_multitask_models.EncDecMultiTaskModel"
CTC_TARGET = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"


# ---------------------------------------------------------------------------------------------
# config sections


def preprocessor_section(features) -> dict:
    """FeatureConfig -> NeMo's AudioToMelSpectrogramPreprocessor arguments (our field names are its own,
    except n_mels, which NeMo calls `features`)."""
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": features.sample_rate, "normalize": features.normalize,
        "window_size": features.window_size, "window_stride": features.window_stride,
        "window": features.window, "features": features.n_mels, "n_fft": features.n_fft,
        "log": features.log, "frame_splicing": 1, "dither": features.dither, "pad_to": features.pad_to,
        "pad_value": features.pad_value, "preemph": features.preemph, "lowfreq": features.lowfreq,
        "highfreq": features.highfreq, "log_zero_guard_type": features.log_zero_guard_type,
        "log_zero_guard_value": features.log_zero_guard_value, "mag_power": features.mag_power,
    }


def encoder_section(encoder) -> dict:
    import dataclasses

    return {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_out": -1,
            "causal_downsampling": False, "reduction": None, "att_context_size": [-1, -1],
            "conv_context_size": None, **dataclasses.asdict(encoder)}


def spec_augment_section(spec) -> dict | None:
    if spec is None:
        return None
    return {"_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": spec.freq_masks, "freq_width": spec.freq_width,
            "time_masks": spec.time_masks, "time_width": spec.time_width}


def canary_config(model, tokenizer_section: dict) -> dict:
    """The model_config.yaml of a CanaryModel, in NeMo's layout (as NeMo writes it for Canary)."""
    cfg = model.cfg
    enc, dec = cfg.encoder, cfg.decoder
    return {
        "sample_rate": cfg.features.sample_rate,
        "label_smoothing": cfg.label_smoothing,
        "use_loss_mask_for_prompt": cfg.use_loss_mask_for_prompt,
        "log_prediction": True,
        "prompt_format": cfg.prompt_format,
        "prompt_defaults": None,
        "multitask_metrics_cfg": {
            "log_predictions": True,
            "metrics": {
                "wer": {"_target_": "nemo.collections.asr.metrics.WER", "constraint": ".source_lang==.target_lang"},
                "bleu": {"_target_": "nemo.collections.asr.metrics.BLEU", "constraint": ".source_lang!=.target_lang",
                         "bleu_tokenizer": "13a", "check_cuts_for_bleu_tokenizers": False},
            },
        },
        "model_defaults": {"asr_enc_hidden": enc.d_model, "lm_enc_hidden": dec.hidden_size,
                           "lm_dec_hidden": dec.hidden_size},
        "train_ds": None, "validation_ds": None, "test_ds": None,
        "tokenizer": tokenizer_section,
        "preprocessor": preprocessor_section(cfg.features),
        "spec_augment": spec_augment_section(cfg.spec_augment),
        "encoder": encoder_section(enc),
        "transf_encoder": {  # NeMo's optional extra Transformer encoder; Canary uses none
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 0, "hidden_size": dec.hidden_size, "inner_size": dec.inner_size,
            "num_attention_heads": dec.num_attention_heads, "ffn_dropout": dec.dropout,
            "attn_score_dropout": dec.dropout, "attn_layer_dropout": dec.dropout, "mask_future": False,
            "pre_ln": True, "pre_ln_final_layer_norm": True,
        },
        "transf_decoder": {
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "model_name": None, "pretrained": False, "encoder": None, "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": dec.max_sequence_length, "num_token_types": 0,
                "embedding_dropout": dec.dropout, "learn_positional_encodings": False,
                "hidden_size": dec.hidden_size, "inner_size": dec.inner_size, "num_layers": dec.num_layers,
                "num_attention_heads": dec.num_attention_heads, "ffn_dropout": dec.dropout,
                "attn_score_dropout": dec.dropout, "attn_layer_dropout": dec.dropout,
                "hidden_act": dec.hidden_act, "pre_ln": True, "vocab_size": None,
            },
        },
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1, "activation": "relu", "log_softmax": True, "hidden_size": dec.hidden_size,
            "num_classes": dec.vocab_size, "dropout": 0.0, "use_transformer_init": True,
        },
        "decoding": {
            "strategy": "beam" if cfg.decoding.searches_beam else "greedy",
            "return_best_hypothesis": True,
            "beam": {"beam_size": cfg.decoding.beam_size, "len_pen": cfg.decoding.length_penalty,
                     "length_penalty": cfg.decoding.length_penalty,
                     "max_generation_delta": cfg.decoding.max_generation_delta},
            "greedy": {"max_generation_delta": cfg.decoding.max_generation_delta},
        },
        "loss": {"_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
                 "label_smoothing": cfg.label_smoothing, "pad_id": model.tokenizer.pad_id},
        "target": AED_TARGET,
        "nemo_version": NEMO_VERSION,
    }


def ctc_config(ctc_model, tokenizer_section: dict) -> dict:
    """The config of a FastConformer CTC model (EncDecCTCModelBPE), e.g. the packed aligner."""
    cfg = ctc_model.cfg
    vocabulary = [ctc_model.tokenizer.id_to_piece(i) for i in range(cfg.num_classes)]
    return {
        "sample_rate": cfg.features.sample_rate, "log_prediction": True, "ctc_reduction": "mean_volume",
        "skip_nan_grad": False, "train_ds": None, "test_ds": None,
        # no data, but NeMo's transcribe() of a CTC model reads validation_ds.use_start_end_token
        "validation_ds": {"manifest_filepath": None, "sample_rate": cfg.features.sample_rate, "batch_size": 16,
                          "shuffle": False, "use_start_end_token": False},
        "tokenizer": tokenizer_section,
        "preprocessor": preprocessor_section(cfg.features),
        "spec_augment": spec_augment_section(cfg.spec_augment),
        "encoder": encoder_section(cfg.encoder),
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": cfg.encoder.d_model,
                    "num_classes": cfg.num_classes, "vocabulary": vocabulary},
        "decoding": {"strategy": "greedy_batch"},
        "target": CTC_TARGET,
        "nemo_version": NEMO_VERSION,
    }


# ---------------------------------------------------------------------------------------------
# tokenizer files


def _sentencepiece_files(proto: bytes) -> dict[str, bytes]:
    """tokenizer.model plus the two text files NeMo's tokenizer builder writes beside it:
    tokenizer.vocab (SentencePiece's "piece<TAB>score") and vocab.txt (WordPiece style: a word-initial
    piece without its "▁", any other piece after "##")."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    spe_vocab = "".join(f"{p}\t{s:g}\n" for p, s in pieces)
    words = []
    for i, (p, _) in enumerate(pieces):
        if sp.is_unknown(i) or sp.is_control(i):
            continue
        words.append(p[1:] if p.startswith("\u2581") else f"##{p}")
    return {"tokenizer.model": proto, "tokenizer.vocab": spe_vocab.encode(),
            "vocab.txt": ("\n".join(words) + "\n").encode()}


def _files_entry(proto: bytes, files: dict[str, bytes]) -> dict:
    """Add one SentencePiece model's files under unique names; its config entry, NeMo's keys."""
    tag = uuid.uuid4().hex
    entry = {"dir": None, "type": "bpe"}
    contents = _sentencepiece_files(proto)
    for key, name in (("model_path", "tokenizer.model"), ("vocab_path", "vocab.txt"),
                      ("spe_tokenizer_vocab", "tokenizer.vocab")):
        archive_name = f"{tag}_{name}"
        files[archive_name] = contents[name]
        entry[key] = f"nemo:{archive_name}"
    return entry


def tokenizer_section(tokenizer, files: dict[str, bytes]) -> dict:
    """NeMo's `tokenizer:` section for our tokenizer, adding its files to `files`."""
    from serinus.tokenizer import CanaryTokenizer

    if isinstance(tokenizer, CanaryTokenizer):  # aggregate: spl_tokens + one BPE per language
        langs = {lang: _files_entry(sp.serialized_model_proto(), files) for lang, sp in tokenizer._spm.items()}
        return {"dir": None, "type": "agg", "langs": langs,
                "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer",
                                     "tokenizers": None}}
    entry = _files_entry(tokenizer._sp.serialized_model_proto(), files)
    return {**entry, "custom_tokenizer": {
        "_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryBPETokenizer"}}


def ctc_tokenizer_section(tokenizer, files: dict[str, bytes]) -> dict:
    return _files_entry(tokenizer._sp.serialized_model_proto(), files)


# ---------------------------------------------------------------------------------------------
# weights


def _featurizer_tensors(preprocessor) -> dict:
    """NeMo keeps the window and filterbank in its state dict ([1, n_mels, F] for the filterbank)."""
    return {"preprocessor.featurizer.window": preprocessor.window.detach().float().cpu().clone(),
            "preprocessor.featurizer.fb": preprocessor.fb.detach().float().cpu().unsqueeze(0).clone()}


def canary_state_dict(model) -> dict:
    """Our state dict in NeMo's names, without the aligner and the CTC head, with the derived tensors."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(("aligner.", "ctc_head.")):
            continue
        state[rename(key, to_nemo=True)] = value.detach().cpu().clone()
    state.update(_featurizer_tensors(model.preprocessor))
    state["transf_decoder._embedding.position_embedding.pos_enc"] = model.decoder.positions.detach().cpu().clone()
    state["log_softmax.mlp.layer0.weight"] = state["transf_decoder._embedding.token_embedding.weight"].clone()
    return state


def ctc_state_dict(ctc_model) -> dict:
    state = {}
    for key, value in ctc_model.state_dict().items():
        name = key.replace("head.", "decoder.decoder_layers.0.", 1) if key.startswith("head.") else key
        state[name] = value.detach().cpu().clone()
    state.update(_featurizer_tensors(ctc_model.preprocessor))
    return state


# ---------------------------------------------------------------------------------------------
# the archive


def _torch_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_nemo(model, path: str | os.PathLike) -> Path:
    """Write `model` (a CanaryModel, or a CTCModel as NeMo's EncDecCTCModelBPE) as a `.nemo` archive; returns
    its path. Written to a temporary name, then renamed, so an interrupted export leaves no archive that
    looks complete."""
    import yaml

    from serinus.model.ctc import CTCModel

    path = Path(path)
    files: dict[str, bytes] = {}
    if isinstance(model, CTCModel):
        config, state = ctc_config(model, ctc_tokenizer_section(model.tokenizer, files)), ctc_state_dict(model)
    else:
        config, state = canary_config(model, tokenizer_section(model.tokenizer, files)), canary_state_dict(model)
    files[CONFIG_FILE] = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode()
    files[WEIGHTS_FILE] = _torch_bytes(state)
    if getattr(model, "aligner", None) is not None:
        aligner_cfg = ctc_config(model.aligner, ctc_tokenizer_section(model.aligner_tokenizer, files))
        files[ALIGNER_CONFIG_FILE] = yaml.safe_dump(aligner_cfg, sort_keys=False, allow_unicode=True).encode()
        files[ALIGNER_WEIGHTS_FILE] = _torch_bytes(ctc_state_dict(model.aligner))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:") as tar:  # NeMo writes an uncompressed tar with "./" members
        now = time.time()
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`serinus export MODEL OUT.nemo`."""
    import argparse

    from serinus.checkpoint import load_any

    p = argparse.ArgumentParser(
        prog="serinus export",
        description="Write a Canary model (a Serinus folder, .nemo or Hub id) as a .nemo archive that NeMo's "
                    "EncDecMultiTaskModel.restore_from loads, with its packed CTC aligner if it has one; or a "
                    "CTC model (serinus train with model.type ctc) as one EncDecCTCModelBPE.restore_from loads.")
    p.add_argument("model", help="Serinus model folder (e.g. a training run's model/), .nemo file or Hub id")
    p.add_argument("out", help="the .nemo file to write")
    args = p.parse_args(argv)
    if not args.out.endswith(".nemo"):
        p.error(f"the output must be a .nemo file, got {args.out!r}")
    try:
        model = load_any(args.model, for_training=False)
    except CheckpointError as e:
        print(f"serinus export: error: {e}", file=sys.stderr)
        return 1
    save_nemo(model, args.out)
    dropped = " (its auxiliary CTC head is not part of NeMo's AED model and was left out)" \
        if getattr(model, "ctc_head", None) is not None else ""
    aligner = " with its CTC aligner" if getattr(model, "aligner", None) is not None else ""
    print(f"wrote {args.out}: {args.model}{aligner}{dropped}")
    return 0
