"""The training config: one schema (`DEFAULTS`), YAML + dotted overrides, checked key by key.

    model.type: aed (Canary: encoder + Transformer decoder, optional auxiliary CTC head) | ctc
    model.{features,encoder,decoder,decoding}: fields of the matching dataclasses
    model.spec_augment: NeMo's spec_augment section (null disables it)

Every key a config may set is in `DEFAULTS`; an unknown key is an error that names it and
suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from serinus.audio import FeatureConfig
from serinus.decoding import DecodingConfig
from serinus.model.decoder import DecoderConfig
from serinus.model.encoder import EncoderConfig


class ConfigError(ValueError):
    """A bad training config; the message names the key."""


SPEC_AUGMENT = {"freq_masks": 2, "freq_width": 27, "time_masks": 5, "time_width": 0.05}

DEFAULTS = {
    "model": {
        "type": "aed",  # aed: Canary encoder-decoder; ctc: FastConformer CTC (NeMo's EncDecCTCModelBPE)
        "preset": None,  # a released architecture (canary-180m-flash, ...), "init_from" (the init checkpoint's), or None
        "prompt_format": "canary2",
        "use_loss_mask_for_prompt": True,  # loss on answer + EOS only, not on the prompt tokens
        "label_smoothing": 0.0,
        "ctc_weight": 0.0,  # aed: loss = w * CTC(encoder) + (1 - w) * attention CE; 0: no CTC head
        "ctc_weight_start": None,  # a schedule: w goes linearly from this to ctc_weight over ctc_weight_steps
        "ctc_weight_steps": 0,
        "spec_augment": dict(SPEC_AUGMENT),  # training only; null disables it
        "features": {},
        "encoder": {},
        "decoder": {},
        "decoding": {},
    },
    "tokenizer": {
        "dir": None,  # a folder written by `serinus tokenizer` (spl_tokens/ + <lang>/, or tokenizer.model)
        "from_checkpoint": None,  # a .nemo file or Serinus model folder whose tokenizer to use
        "vocab_size": None,  # build `dir` (default: OUT_DIR/tokenizer) when it does not exist yet, from
                             # train_ds's text: spl_tokens + one model of this size per target language
                             # (aed), or one (ctc)
        "type": "bpe",  # SentencePiece model type of that build (NeMo's spe_type): bpe, unigram, char
                        # (char: vocab_size is then only an upper bound; on little data CTC learns
                        # characters far faster than BPE pieces, docs/training.md)
        "langs": None,  # or an ordered mapping {spl_tokens: DIR, en: DIR, ...}: NeMo's aggregate tokenizer, with
                        # ids in this order (NeMo's model.tokenizer.langs); each DIR holds a tokenizer.model
    },
    "init_from": {
        "path": None,  # .nemo or Serinus model folder to initialise weights from (fine-tuning)
        "include": [],  # parameter-name prefixes to load (empty: all)
        "exclude": [],  # parameter-name prefixes not to load (wins over include)
        "match": "prefix",  # prefix: include/exclude are prefixes of Serinus names; nemo_substring: substrings
                            # of NeMo's parameter names (NeMo's init_from_* rule), whatever the checkpoint's format
    },
    "train_ds": {
        "manifest_filepath": None,  # one path or a list
        "source_langs": None,  # keep only lines whose source_lang is listed (e.g. [en]); None: all
        "target_langs": None,  # keep only lines whose target_lang is listed; None: all
        "lang_pairs": None,  # keep only lines whose "source-target" is listed (ASR: "en-en"); None: all
        "limit": None,  # use only the first N lines of each manifest (smoke tests, overfitting)
        "bucket_duration_bins": None,  # [[max_duration, max_tokens], ...]; None: one bucket for all
        "bucket_batch_size": None,  # one per bin (e.g. from `serinus oomptimize`)
        "num_buckets": 8,  # with batch_duration and no bins: duration buckets estimated from the data
        # ... each split into this many token sub-buckets (2-D). 1 by default: batches that group
        # utterances by tokens per second (domain, speaking rate) learnt about half as fast (docs/training.md)
        "num_subbuckets": 1,
        "batch_size": None,  # the same batch size for every bin
        "batch_duration": None,  # or: seconds of audio per batch
        "quadratic_duration": None,
        "max_duration": None,
        "min_duration": None,
        "shuffle": True,
        "num_workers": 0,
        "allow_unk": False,
        "cache_audio": False,  # keep decoded audio in memory after its first read (small corpora)
        "perturb_speed": False,  # true: every utterance also at 0.9x and 1.1x speed (or a list of factors)
    },
    "validation_ds": {
        "manifest_filepath": None,
        "source_langs": None,
        "target_langs": None,
        "lang_pairs": None,
        "limit": None,
        "batch_size": 8,
    },
    "optim": {
        "lr": 3e-4,
        "betas": [0.9, 0.98],
        "weight_decay": 1e-3,
        "warmup_steps": 1000,
        "min_lr": 1e-6,  # NeMo's meaning: the lr after max_steps (the 1/sqrt decay itself is not floored)
        "schedule": "inverse_sqrt",  # after warm-up: inverse_sqrt or cosine (NeMo's InverseSquareRoot/CosineAnnealing)
        "decay_fraction": 0.0,  # > 0: the lr falls linearly to min_lr over this last part of max_steps/max_time
    },
    "trainer": {
        "max_steps": 1000,
        "max_time": None,  # wall clock: "DD:HH:MM:SS" (NeMo/Lightning) or minutes; stops at whichever comes first
        "val_check_interval": 500,  # steps; 0 disables validation during training
        "final_validation": True,  # validate once more when training ends (NeMo configs: false, as Lightning)
        "checkpoint_every": 500,
        "keep_checkpoints": 2,
        "log_every": 10,
        "accumulate_grad_batches": 1,  # one optimizer step per N batches (gradients summed; a step = N batches)
        "grad_clip": 1.0,
        "precision": "32",  # "32", "bf16" (autocast) or "16" (float16 autocast + gradient scaler; CUDA only)
        "progress_bar": "auto",  # a tqdm bar with loss, lr and audio s/s; auto: when stderr is a terminal
        "tensorboard": "auto",  # event files in <out_dir>/tensorboard; auto: when tensorboardX is installed
        "out_dir": "runs/canary",
        "seed": 0,
        "resume": False,
        "device": "auto",  # auto: cuda when available
        "threads": None,  # CPU threads (torch.set_num_threads); None: torch's default
    },
    "exp_manager": {
        "exp_dir": None,  # NeMo's name for the run folder: when set, it is trainer.out_dir
    },
}

MODEL_DATACLASSES = {"features": FeatureConfig, "encoder": EncoderConfig, "decoder": DecoderConfig,
                     "decoding": DecodingConfig}
MODEL_TYPES = ("aed", "ctc")


def _unknown(name: str, key: str, allowed) -> ConfigError:
    near = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"unknown config key {name!r}{hint}; allowed: {', '.join(sorted(allowed))}")


def _check_keys(cfg: dict, schema: dict, prefix: str = "") -> None:
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if prefix == "model." and key in MODEL_DATACLASSES:
            fields = {f.name for f in dataclasses.fields(MODEL_DATACLASSES[key])}
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name} must be a mapping of {MODEL_DATACLASSES[key].__name__} fields")
            for k in value:
                if k not in fields:
                    raise _unknown(f"{name}.{k}", k, fields)
            continue
        if prefix == "model." and key == "spec_augment":
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key {name} must be a mapping ({', '.join(SPEC_AUGMENT)}) or null")
            for k in value or {}:
                if k not in SPEC_AUGMENT:
                    raise _unknown(f"{name}.{k}", k, SPEC_AUGMENT)
            continue
        if key not in schema:
            raise _unknown(name, key, schema)
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name} must be a mapping, got {value!r}")
            _check_keys(value, schema[key], f"{name}.")


# Lightning's precision names (NeMo's YAMLs use them) -> Serinus's: float32 weights in every mode
PRECISIONS = {"32": "32", "32-true": "32", "fp32": "32", "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
              "16": "16", "16-mixed": "16", "fp16": "16"}


def precision_name(value) -> str:
    """trainer.precision -> "32", "bf16" (autocast) or "16" (autocast + gradient scaler). An int (`=32` on
    the command line) is accepted."""
    name = PRECISIONS.get(str(value).lower())
    if name is None:
        raise ConfigError(f"trainer.precision={value!r}: use 32, bf16 (bf16-mixed) or, on a GPU, 16 (16-mixed)")
    return name


def _check_values(cfg: dict) -> None:
    m = cfg["model"]
    if m["type"] not in MODEL_TYPES:
        raise ConfigError(f"model.type must be one of {', '.join(MODEL_TYPES)}, got {m['type']!r}")
    for key in ("ctc_weight", "ctc_weight_start"):
        if m[key] is not None and not 0.0 <= float(m[key]) <= 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1], got {m[key]!r}")
    if m["ctc_weight_start"] is not None and not float(m["ctc_weight"]) > 0:
        raise ConfigError("model.ctc_weight_start needs model.ctc_weight > 0 (the model has no CTC head otherwise)")
    if cfg["init_from"]["match"] not in ("prefix", "nemo_substring"):
        raise ConfigError(f"init_from.match must be prefix or nemo_substring, got {cfg['init_from']['match']!r}")
    accumulate = cfg["trainer"]["accumulate_grad_batches"]
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be an integer >= 1, got {accumulate!r}")
    if cfg["tokenizer"]["type"] not in ("bpe", "unigram", "char"):
        raise ConfigError(f"tokenizer.type must be bpe, unigram or char, got {cfg['tokenizer']['type']!r}")
    langs = cfg["tokenizer"]["langs"]
    if langs is not None and (not isinstance(langs, dict) or "spl_tokens" not in langs
                              or not all(isinstance(v, str) for v in langs.values())):
        raise ConfigError(f"tokenizer.langs must map spl_tokens and each language to a folder, got {langs!r}")
    cfg["trainer"]["precision"] = precision_name(cfg["trainer"]["precision"])
    if not isinstance(cfg["trainer"]["final_validation"], bool):
        raise ConfigError(f"trainer.final_validation must be true or false, got {cfg['trainer']['final_validation']!r}")
    for key in ("progress_bar", "tensorboard"):
        if cfg["trainer"][key] not in (True, False, "auto"):
            raise ConfigError(f"trainer.{key} must be true, false or auto, got {cfg['trainer'][key]!r}")
    parse_max_time(cfg["trainer"]["max_time"])


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """DEFAULTS <- YAML file <- dotted `key=value` overrides, as a plain dict; unknown keys raise ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.create(DEFAULTS)]
    try:
        if path is not None:
            layers.append(OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form dotted.key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers[1:]:  # check before merging so the error names the user's key
            _check_keys(OmegaConf.to_container(layer), DEFAULTS)
        cfg = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path or 'overrides'}: {e}") from None
    if cfg["exp_manager"]["exp_dir"]:
        cfg["trainer"]["out_dir"] = str(cfg["exp_manager"]["exp_dir"])
    _check_values(cfg)
    return cfg


def parse_max_time(value) -> float | None:
    """trainer.max_time in seconds: "DD:HH:MM:SS" (Lightning's format), "HH:MM:SS", or a number of minutes."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"trainer.max_time must be positive, got {value!r}")
        return float(value) * 60.0
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return parse_max_time(float(text))
    parts = text.split(":")
    if not 2 <= len(parts) <= 4 or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ConfigError(f"trainer.max_time {value!r}: expected DD:HH:MM:SS, HH:MM:SS or minutes")
    seconds = 0.0
    for unit, p in zip((86400, 3600, 60, 1)[-len(parts):], parts):
        seconds += unit * int(p)
    if seconds <= 0:
        raise ConfigError(f"trainer.max_time must be positive, got {value!r}")
    return seconds
