"""NeMo's training config, unchanged: `fast-conformer_aed.yaml` + Hydra overrides -> Serinus's config.

    serinus train --config-path config --config-name fast-conformer_aed.yaml name=canary-small \\
        model.prompt_format=canary2 model.train_ds.manifest_filepath=train.jsonl ... trainer.max_steps=10

A NeMo config (a top-level `model:` holding `train_ds` or `transf_decoder`) is translated here, in
one place, into the dict that `serinus.train.config.DEFAULTS` describes; from there on it is an
ordinary Serinus run (`--print-config` shows the translation). Each NeMo key is one of

  acted on       translated below (`translate`; docs/training.md has the table);
  the same       a value that matches what Serinus does anyway (`SAME`, `MOOT`): silent;
  not acted on   a key NeMo knows, with a value Serinus does not reproduce: all of them listed
                 once, in one warning line;
  unknown        to both: an error naming it and the nearest valid key.

Overrides follow Hydra: `key=value` sets a key the config has (or one NeMo reads, listed here),
`+key=value` / `++key=value` add one, `~key` removes one; `${...}` interpolations (model_defaults)
resolve after the overrides. Settings only Serinus has go under a top-level `serinus:` section,
e.g. `serinus.trainer.checkpoint_every=100`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

from serinus.tokenizer import tokenizer_model_in
from serinus.train.config import DEFAULTS, ConfigError, _check_keys, _check_values, _unknown, precision_name
from serinus.train.nemo_keys import DECODER_READ, ENCODER_READ, EXP_MANAGER, KNOWN, LIGHTNING_TRAINER, MISSING, MOOT, PREPROCESSOR_READ, SAME, SPEC_AUGMENT_READ, TOP_LEVEL

# ---------------------------------------------------------------------------------------------
# detection, loading, overrides


def is_nemo_config(cfg) -> bool:
    """A NeMo training config: a top-level `model:` with `train_ds` or `transf_decoder` (Serinus's own
    configs keep `train_ds` at the top level)."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return isinstance(model, dict) and ("train_ds" in model or "transf_decoder" in model)


def is_nemo_config_file(path) -> bool:
    import yaml

    try:
        return is_nemo_config(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError):
        return False  # load_config reports it


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("multiply"):  # NeMo's, for inner_size: ${multiply:${...hidden}, 4}
        with warnings.catch_warnings():  # omegaconf 2.4 renames register_new_resolver; both work
            warnings.simplefilter("ignore")
            OmegaConf.register_new_resolver("multiply", lambda x, y: x * y)


def _matches(parts: tuple, pattern: tuple) -> bool:
    for i, p in enumerate(pattern):
        if p == "**":
            return len(parts) > i
        if i >= len(parts) or (p != "*" and p != parts[i]):
            return False
    return len(parts) == len(pattern)


def _known(parts: tuple) -> bool:
    return any(_matches(parts, p) for p in KNOWN)


def _select(tree, parts):
    node = tree
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False, None
        node = node[p]
    return True, node


def _unknown_key(key: str, tree: dict) -> ConfigError:
    """An error for `key`, at its first component neither the config nor NeMo has, with a suggestion."""
    parts = tuple(key.split("."))
    for i in range(len(parts)):
        head = parts[: i + 1]
        if not _select(tree, head)[0] and not any(_matches(head, p) or _matches(head, p[: i + 1]) for p in KNOWN):
            found, node = _select(tree, parts[:i])
            siblings = set(node) if found and isinstance(node, dict) else set()
            siblings |= {p[i] for p in KNOWN if len(p) > i and p[i] not in ("*", "**")
                         and all(q in ("*", "**") or q == r for q, r in zip(p[:i], parts[:i]))}
            return _unknown(".".join(head), parts[i], siblings or {"(none)"})
    return ConfigError(f"unknown config key {key!r}")


def apply_overrides(cfg, overrides) -> None:
    """Hydra's override grammar on an OmegaConf config: key=value, +key=value, ++key=value, ~key."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=False)
    for item in overrides:
        text = item.strip()
        if text.startswith("~"):
            key = text[1:].split("=", 1)[0]
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                raise ConfigError(f"override {item!r}: there is no {key} to remove")
            del node[leaf]
            continue
        if "=" not in text:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, value = text.split("=", 1)
        key = key.lstrip("+")  # +key / ++key: add (or set) a key the file does not have
        parts = tuple(key.split("."))
        if not _select(tree, parts)[0] and not _known(parts):
            raise _unknown_key(key, tree)
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        OmegaConf.update(cfg, key, parsed, merge=False, force_add=True)
        tree = OmegaConf.to_container(cfg, resolve=False)


def _check_file_keys(tree: dict) -> None:
    """The keys NeMo itself would refuse: top level, trainer (Lightning's Trainer), exp_manager."""
    for key in tree:
        if key not in TOP_LEVEL:
            raise _unknown(key, key, TOP_LEVEL)
    for section, allowed in (("trainer", LIGHTNING_TRAINER), ("exp_manager", EXP_MANAGER)):
        for key in tree.get(section) or {}:
            if key not in allowed:
                raise _unknown(f"{section}.{key}", key, allowed)


def load_nemo_config(path, overrides=()) -> tuple[dict, list[str], list[str]]:
    """A NeMo config file + Hydra overrides -> (Serinus config, ignored NeMo settings, notes)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    try:
        cfg = OmegaConf.load(path)
        apply_overrides(cfg, list(overrides))
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    if not is_nemo_config(tree):
        raise ConfigError(f"{path}: not a NeMo training config (needs model.train_ds or model.transf_decoder)")
    _check_file_keys(tree)
    return translate(tree)


# ---------------------------------------------------------------------------------------------
# the translation


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Source:
    """The resolved NeMo config, and which of its keys the translation read."""

    def __init__(self, tree: dict):
        self.tree, self.used = tree, set()

    def has(self, key: str) -> bool:
        found, value = _select(self.tree, tuple(key.split(".")))
        return found and value != MISSING

    def get(self, key: str, default=None, required: bool = False):
        found, value = _select(self.tree, tuple(key.split(".")))
        if found:
            self.used.add(key)
        if not found or value == MISSING or value is None:
            if required:
                raise ConfigError(f"{key} is required (the NeMo config has {value if found else 'nothing'!r} there); "
                                  f"set it, e.g. {key}=...")
            return default
        return value

    def section(self, key: str, read=()) -> dict:
        """The mapping at `key` (not marked as read), marking its keys in `read` as read."""
        found, value = _select(self.tree, tuple(key.split(".")))
        value = value if found and isinstance(value, dict) else {}
        self.used.update(f"{key}.{k}" for k in value if k in read)
        return value

    def unread(self) -> dict:
        def read(leaf):
            return any(leaf == u or leaf.startswith(u + ".") for u in self.used)

        return {k: v for k, v in _flatten(self.tree).items() if not read(k)}


def _put(out: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def translate(tree: dict, world_size: int | None = None) -> tuple[dict, list[str], list[str]]:
    """A resolved NeMo config (plain dict) -> (Serinus config, ignored NeMo settings, notes)."""
    src, out, notes, ignored = _Source(tree), {}, [], []
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if "transf_decoder" not in tree["model"]:
        raise ConfigError("only NeMo's AED (Canary) configs are translated, e.g. fast-conformer_aed.yaml; "
                          "this one has no model.transf_decoder")
    _model(src, out)
    _tokenizer(src, out)
    _data(src, out, ignored)
    _optim(src, out, ignored)
    _trainer(src, out, notes, world)
    _exp_manager(src, out, ignored)
    init = _init_from(src)
    if init:
        out["init_from"] = init
    serinus = src.get("serinus") or {}  # Serinus's own keys, over the translation
    for key, value in src.unread().items():
        if any(key == m or key.startswith(m + ".") for m in MOOT):
            continue
        if key in SAME and value == SAME[key]:
            continue
        if key == "trainer.sync_batchnorm" and (world == 1 or not value):
            continue
        ignored.append(f"{key}={_show(value)}")
    if not isinstance(serinus, dict):
        raise ConfigError("serinus: must be a mapping of Serinus config keys (see serinus/train/config.py)")
    _check_keys(out, DEFAULTS)
    try:
        _check_keys(serinus, DEFAULTS)
    except ConfigError as e:  # name the key as the user wrote it
        raise ConfigError(re.sub(r"config key '?", lambda m: m.group(0) + "serinus.", str(e), count=1)) from None
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(DEFAULTS), out, serinus), resolve=True)
    _check_values(cfg)
    _check_resume(src, cfg)
    return cfg, ignored, notes


def _dataclass_dict(obj, drop=()) -> dict:
    return {k: v for k, v in dataclasses.asdict(obj).items() if k not in drop}


def _model(src: _Source, out: dict) -> None:
    from serinus.audio import FeatureConfig
    from serinus.decoding import DecodingConfig
    from serinus.model.decoder import DecoderConfig
    from serinus.model.encoder import EncoderConfig
    from serinus.model.specaugment import SpecAugmentConfig

    fmt = src.get("model.prompt_format", required=True)
    if fmt not in ("canary", "canary2"):
        raise ConfigError(f"model.prompt_format must be canary or canary2, got {fmt!r}")
    _put(out, "model.prompt_format", fmt)
    _put(out, "model.use_loss_mask_for_prompt", bool(src.get("model.use_loss_mask_for_prompt", False)))
    smoothing = float(src.get("model.label_smoothing", 0.0) or 0.0)
    _put(out, "model.label_smoothing", smoothing)
    if src.section("model.loss").get("label_smoothing", smoothing) == smoothing:
        src.get("model.loss.label_smoothing")
    src.get("model.model_defaults")  # read through the ${model.model_defaults.*} interpolations
    for key in ("model.sample_rate", "model.preprocessor.sample_rate", "model.train_ds.sample_rate",
                "model.validation_ds.sample_rate"):
        if int(src.get(key, 16000)) != 16000:
            raise ConfigError(f"{key}={src.get(key)}: Serinus models take 16 kHz audio (it resamples to 16000)")
    try:
        pre = src.section("model.preprocessor", PREPROCESSOR_READ + tuple(f.name for f in
                                                                          dataclasses.fields(FeatureConfig)))
        _put(out, "model.features", _dataclass_dict(FeatureConfig.from_nemo(pre)))
        enc = src.section("model.encoder", ENCODER_READ + tuple(EncoderConfig.__dataclass_fields__))
        _put(out, "model.encoder", _dataclass_dict(EncoderConfig.from_nemo(enc)))
        dec = src.section("model.transf_decoder.config_dict", DECODER_READ)
        decoder = DecoderConfig.from_nemo(dec, vocab_size=8)
        _put(out, "model.decoder", _dataclass_dict(decoder, drop=("vocab_size",)))
        sa = src.section("model.spec_augment", SPEC_AUGMENT_READ)
        spec = SpecAugmentConfig.from_nemo({k: v for k, v in sa.items() if k in SPEC_AUGMENT_READ})
        _put(out, "model.spec_augment", _dataclass_dict(spec) if spec is not None else None)
        for key in ("strategy", "beam.beam_size", "beam.length_penalty", "beam.max_generation_delta",
                    "greedy.max_generation_delta"):  # what DecodingConfig.from_nemo reads
            src.get(f"model.decoding.{key}")
        _put(out, "model.decoding", _dataclass_dict(DecodingConfig.from_nemo(src.tree["model"].get("decoding"))))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    for key in ("embedding_dropout", "attn_score_dropout", "attn_layer_dropout"):  # Serinus: one dropout
        if dec.get(key, decoder.dropout) == decoder.dropout:
            src.get(f"model.transf_decoder.config_dict.{key}")
    if int(src.get("model.transf_encoder.num_layers", 0) or 0) > 0:
        raise ConfigError("model.transf_encoder.num_layers > 0 (a Transformer encoder between the two) is not "
                          "supported")
    src.get("model.transf_encoder")
    if int(src.get("model.head.num_layers", 1)) != 1:
        raise ConfigError(f"model.head.num_layers={src.get('model.head.num_layers')}: Serinus's output head is one "
                          "linear layer tied to the token embedding (NeMo's num_layers: 1)")
    src.get("model.head.activation")  # no activation in a one-layer head
    if int(src.get("model.head.hidden_size", decoder.hidden_size)) != decoder.hidden_size:
        raise ConfigError("model.head.hidden_size must equal model.transf_decoder.config_dict.hidden_size")


def _tokenizer(src: _Source, out: dict) -> None:
    kind = src.get("model.tokenizer.type", "agg")
    if kind == "bpe":  # one SentencePiece model for everything (canary-1b-v2 style)
        _put(out, "tokenizer.dir", str(src.get("model.tokenizer.dir", required=True)))
        src.get("model.tokenizer.langs")
        return
    if kind != "agg":
        raise ConfigError(f"model.tokenizer.type={kind!r}: Serinus reads agg (spl_tokens + languages) or bpe")
    src.get("model.tokenizer.dir")
    langs = src.section("model.tokenizer.langs")
    if not langs:
        raise ConfigError("model.tokenizer.langs is empty: list spl_tokens and one tokenizer per language")
    spl = src.get("spl_tokens.model_dir") if "spl_tokens" in src.tree else None
    src.get("spl_tokens.tokens")  # only for building a special-token model, which Serinus does not do here
    dirs = {}
    for lang in langs:
        key = f"model.tokenizer.langs.{lang}"
        kind = src.get(f"{key}.type", "bpe")
        if kind != "bpe":
            raise ConfigError(f"{key}.type={kind!r}: only bpe (SentencePiece) tokenizers are read")
        folder = src.get(f"{key}.dir")
        if lang == "spl_tokens":
            folder = spl or folder  # NeMo's script sets langs.spl_tokens.dir to spl_tokens.model_dir
            if folder is None:
                raise ConfigError("the special-token tokenizer has no folder: set spl_tokens.model_dir (or "
                                  "model.tokenizer.langs.spl_tokens.dir)")
        elif folder is None:
            src.get(f"{key}.dir", required=True)
        if tokenizer_model_in(folder) is None:
            hint = f"; build it with `serinus tokenizer special {folder}`" if lang == "spl_tokens" else ""
            raise ConfigError(f"{'spl_tokens.model_dir' if lang == 'spl_tokens' and spl else key + '.dir'}="
                              f"{folder} holds no tokenizer.model{hint}")
        dirs[str(lang)] = str(folder)
    if "spl_tokens" not in dirs:
        raise ConfigError("model.tokenizer.langs needs a spl_tokens entry (the special-token model)")
    _put(out, "tokenizer.langs", dirs)


def _bins(value):
    if value is None:
        return None
    if all(isinstance(b, (int, float)) for b in value):  # 1-D duration bins: no token limit
        return [[float(b), 10**9] for b in value]
    return [[float(d), int(t)] for d, t in value]


def _data(src: _Source, out: dict, ignored: list) -> None:
    ds = "model.train_ds"
    _put(out, "train_ds.manifest_filepath", src.get(f"{ds}.manifest_filepath", required=True))
    if src.get(f"{ds}.tarred_audio_filepaths") or src.get(f"{ds}.input_cfg") or src.get(f"{ds}.shar_path") \
            or src.get(f"{ds}.cuts_path"):
        raise ConfigError(f"{ds}: tarred audio, input_cfg, Lhotse Shar and cuts_path inputs are not supported; "
                          "give JSON manifests in manifest_filepath")
    for key in ("batch_size", "batch_duration", "quadratic_duration", "shuffle", "num_workers", "num_buckets",
                "bucket_batch_size", "perturb_speed"):
        if src.has(f"{ds}.{key}"):
            _put(out, f"train_ds.{key}", src.get(f"{ds}.{key}"))
    low, high = src.get(f"{ds}.min_duration"), src.get(f"{ds}.max_duration")
    _put(out, "train_ds.min_duration", low if low is not None and float(low) > 0 else None)
    _put(out, "train_ds.max_duration", high if high is not None and math.isfinite(float(high)) else None)
    _put(out, "train_ds.bucket_duration_bins", _bins(src.get(f"{ds}.bucket_duration_bins")))
    if not src.get(f"{ds}.use_bucketing", False):  # NeMo's default: no bucketing
        _put(out, "train_ds.bucket_duration_bins", None)
        _put(out, "train_ds.num_buckets", 1)
        _put(out, "train_ds.bucket_batch_size", None)
    val = src.get("model.validation_ds.manifest_filepath")
    _put(out, "validation_ds.manifest_filepath", val)
    if src.has("model.validation_ds.batch_size"):
        _put(out, "validation_ds.batch_size", int(src.get("model.validation_ds.batch_size")))
    test = src.get("model.test_ds.manifest_filepath")
    if test:
        ignored.append(f"model.test_ds.manifest_filepath={_show(test)} (not used: no test pass after training; "
                       "run `serinus transcribe` on it)")


def _optim(src: _Source, out: dict, ignored: list) -> None:
    o = "model.optim"
    name = str(src.get(f"{o}.name", "adamw")).lower()
    if name not in ("adamw", "adam"):
        raise ConfigError(f"{o}.name={name!r}: Serinus trains with AdamW (adamw; adam is taken as AdamW)")
    for key in ("lr", "weight_decay"):
        if src.has(f"{o}.{key}"):
            _put(out, f"optim.{key}", float(src.get(f"{o}.{key}")))
    if src.has(f"{o}.betas"):
        _put(out, "optim.betas", [float(b) for b in src.get(f"{o}.betas")])
    if name == "adam" and float(src.get(f"{o}.weight_decay", 0.0) or 0.0) > 0:
        ignored.append(f"{o}.name=adam (Serinus uses AdamW: decoupled weight decay, not Adam's L2 term)")
    found, sched = _select(src.tree, ("model", "optim", "sched"))
    if found and sched is None:
        ignored.append(f"{o}.sched=null (NeMo: a constant lr; Serinus always warms up, then decays by 1/sqrt(step))")
        _put(out, "optim.warmup_steps", 0)
        return
    sched = src.section(f"{o}.sched", ("warmup_steps", "warmup_ratio", "min_lr"))
    name = sched.get("name", "InverseSquareRootAnnealing")
    if name == "CosineAnnealing":
        _put(out, "optim.schedule", "cosine")
        src.get(f"{o}.sched.name")
    elif name != "InverseSquareRootAnnealing":
        ignored.append(f"{o}.sched.name={name} (Serinus: warmup + InverseSquareRootAnnealing or CosineAnnealing)")
        src.get(f"{o}.sched.name")
    if sched.get("warmup_steps") is not None:
        _put(out, "optim.warmup_steps", int(sched["warmup_steps"]))
    elif sched.get("warmup_ratio") is not None:
        _put(out, "optim.warmup_steps", int(float(sched["warmup_ratio"]) * int(src.get("trainer.max_steps", 0))))
    if sched.get("min_lr") is not None:
        _put(out, "optim.min_lr", float(sched["min_lr"]))


def _devices(value) -> int | None:
    """trainer.devices as a process count; None for "all available" (-1, "auto")."""
    if value is None or str(value).strip() in ("-1", "auto"):
        return None
    if isinstance(value, (list, tuple)):
        return len(value)
    text = str(value)
    if "," in text:
        return len([x for x in text.split(",") if x.strip()])
    return int(text)


def _trainer(src: _Source, out: dict, notes: list, world: int) -> None:
    import torch

    t = "trainer"
    max_time = src.get(f"{t}.max_time")
    if isinstance(max_time, dict):  # Lightning also takes {days: .., hours: .., minutes: .., seconds: ..}
        units = {"days": 1440, "hours": 60, "minutes": 1, "seconds": 1 / 60}
        max_time = sum(float(v) * units[k] for k, v in max_time.items())
    _put(out, "trainer.max_time", max_time)
    steps = int(src.get(f"{t}.max_steps", -1))
    if steps <= 0 and max_time is None:
        raise ConfigError("trainer.max_steps must be set (> 0): Serinus counts steps, not epochs "
                          "(or set trainer.max_time)")
    _put(out, "trainer.max_steps", steps if steps > 0 else 10**12)
    if src.has(f"{t}.log_every_n_steps"):
        _put(out, "trainer.log_every", int(src.get(f"{t}.log_every_n_steps")))
    accumulate = int(src.get(f"{t}.accumulate_grad_batches", 1) or 1)
    _put(out, "trainer.accumulate_grad_batches", accumulate)
    _put(out, "trainer.grad_clip", float(src.get(f"{t}.gradient_clip_val", 0.0) or 0.0))  # 0: no clipping

    accelerator = str(src.get(f"{t}.accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}, but torch sees no CUDA device")
    if accelerator not in ("auto", "gpu", "cuda", "cpu", "ddp"):
        raise ConfigError(f"trainer.accelerator={accelerator!r}: Serinus runs on cpu or cuda (auto picks)")
    _put(out, "trainer.device", "cpu" if accelerator == "cpu" else "auto")
    on_gpu = accelerator != "cpu" and torch.cuda.is_available()

    precision = str(src.get(f"{t}.precision", "32")).lower()
    name = precision_name(precision)
    if name == "bf16" and not on_gpu:  # NeMo needs precision=32 on a CPU; Serinus keeps the YAML's choice and says so
        notes.append(f"trainer.precision={precision}: bfloat16 autocast on the CPU (float32 weights)")
    if name == "16" and not on_gpu:
        raise ConfigError(f"trainer.precision={precision}: float16 mixed precision is for GPUs and this run is "
                          "on the CPU; use trainer.precision=bf16-mixed or 32")
    _put(out, "trainer.precision", name)

    raw, nodes = src.get(f"{t}.devices", "auto"), int(src.get(f"{t}.num_nodes", 1) or 1)
    count = _devices(raw)
    if count is None:
        gpus = torch.cuda.device_count() if on_gpu else 0
        if world > 1:
            chosen = f"{world} processes (torchrun's WORLD_SIZE)"
        elif gpus > 1:
            chosen = (f"1 process on 1 of {gpus} GPUs; to use all, launch "
                      f"torchrun --nproc_per_node {gpus} -m serinus.train ...")
        else:
            chosen = f"1 process on {'cuda' if on_gpu else 'cpu'}"
        notes.append(f"trainer.devices={raw}: {chosen}")
    elif count * nodes != world:
        raise ConfigError(
            f"trainer.devices={raw} x trainer.num_nodes={nodes} = {count * nodes} processes, but this run has "
            f"{world} (WORLD_SIZE): Serinus runs one process per device, launched by torchrun, e.g. "
            f"torchrun --nnodes {nodes} --nproc_per_node {count} -m serinus.train ...; or set trainer.devices=1")

    value = src.get(f"{t}.val_check_interval", 1.0)
    if isinstance(value, float) and value <= 1.0:
        per_epoch = _epoch_steps(out["train_ds"], world, accumulate)
        if per_epoch is None:
            every = int(DEFAULTS["trainer"]["val_check_interval"])
            how = "the epoch length is unknown here (bucket_batch_size without batch_size/batch_duration)"
        else:
            every = max(1, round(value * per_epoch))
            how = f"an epoch of train_ds is about {per_epoch} steps"
        notes.append(f"warning: trainer.val_check_interval={value} is a fraction of an epoch; Serinus counts "
                     f"steps: validating (and checkpointing) every {every} steps ({how})")
    else:
        every = int(value)
    _put(out, "trainer.val_check_interval", every)
    _put(out, "trainer.checkpoint_every", every)  # NeMo's checkpoint callback saves at each validation
    # Lightning validates at val_check_interval only: a run that stops at max_steps between two
    # validations ends without one (the seed's 10-step run never validates)
    _put(out, "trainer.final_validation", False)


def _epoch_steps(ds: dict, world: int, accumulate: int) -> int | None:
    """About how many optimizer steps one pass over train_ds takes (from the manifests' durations)."""
    paths = ds["manifest_filepath"]
    durations = []
    for p in [paths] if isinstance(paths, str) else paths:
        try:
            with open(p, encoding="utf-8") as f:
                durations += [float(json.loads(line).get("duration", 0.0)) for line in f if line.strip()]
        except (OSError, ValueError):
            return None
    if ds.get("batch_size"):
        batches = len(durations) / int(ds["batch_size"])
    elif ds.get("batch_duration"):
        q = ds.get("quadratic_duration")
        batches = sum(d + (d * d / float(q) if q else 0.0) for d in durations) / float(ds["batch_duration"])
    else:
        return None
    return max(1, math.ceil(batches / world / accumulate))


def _exp_manager(src: _Source, out: dict, ignored: list) -> None:
    e = "exp_manager"
    name = src.get(f"{e}.name") or src.get("name") or "default"
    src.get("name")
    explicit = src.get(f"{e}.explicit_log_dir")
    root = Path(src.get(f"{e}.exp_dir") or "nemo_experiments")
    resume = bool(src.get(f"{e}.resume_if_exists", False))
    version = src.get(f"{e}.version")
    run = Path(explicit) if explicit else root / str(name) / str(version) if version else root / str(name)
    _put(out, "trainer.out_dir", str(run))
    if not resume and not explicit and not version and src.get(f"{e}.use_datetime_version", True):
        ignored.append(f"{e}.use_datetime_version=true (no date-time sub-folder: the run goes to {run})")
    _put(out, "trainer.resume", resume)
    tensorboard = src.get(f"{e}.create_tensorboard_logger", True)
    _put(out, "trainer.tensorboard", "auto" if tensorboard else False)  # <run>/tensorboard, as NeMo's logger
    src.get(f"{e}.resume_ignore_no_checkpoint")
    if src.get(f"{e}.resume_from_checkpoint"):
        raise ConfigError(f"{e}.resume_from_checkpoint: Lightning .ckpt files are not read; Serinus resumes from "
                          "its own checkpoints in the run folder (exp_manager.resume_if_exists=true)")


def _check_resume(src: _Source, cfg: dict) -> None:
    """NeMo: resume_if_exists without a checkpoint is an error unless resume_ignore_no_checkpoint."""
    from serinus.train.loop import last_checkpoint

    if cfg["trainer"]["resume"] and not src.get("exp_manager.resume_ignore_no_checkpoint", False) \
            and last_checkpoint(cfg) is None:
        raise ConfigError(f"exp_manager.resume_if_exists=true, but {cfg['trainer']['out_dir']} has no checkpoint "
                          "to resume from (as in NeMo); set exp_manager.resume_ignore_no_checkpoint=true to start "
                          "from scratch")


def _hub_name(name: str) -> str:
    from serinus.checkpoint import KNOWN_HUB_MODELS

    if "/" not in name and not Path(name).exists() and f"nvidia/{name}" in KNOWN_HUB_MODELS:
        return f"nvidia/{name}"  # NeMo's short names (canary-180m-flash)
    return name


def _init_from(src: _Source) -> dict | None:
    given = [k for k in ("init_from_nemo_model", "init_from_pretrained_model", "init_from_ptl_ckpt")
             if src.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(f"more than one model initialisation: {', '.join(given)} (NeMo takes one)")
    key = given[0]
    if key == "init_from_ptl_ckpt":
        raise ConfigError("init_from_ptl_ckpt: Lightning .ckpt files are not read; use init_from_nemo_model")
    value, field = src.get(key), "path" if key == "init_from_nemo_model" else "name"
    include, exclude = [], []
    if isinstance(value, dict):
        if len(value) != 1:
            raise ConfigError(f"{key}: Serinus initialises from one model; got {', '.join(value)}")
        (entry_name, entry), = value.items()
        if not isinstance(entry, dict) or not (entry.get(field) or entry.get("path") or entry.get("name")):
            raise ConfigError(f"{key}.{entry_name}.{field} is not set")
        where = entry.get(field) or entry.get("path") or entry.get("name")
        include = [str(p) for p in entry.get("include") or [] if str(p)]  # NeMo's default [""]: everything
        exclude = [str(p) for p in entry.get("exclude") or []]
    elif isinstance(value, str):
        where = value
    else:
        raise ConfigError(f"{key} must be a name/path or a mapping model0: {{{field}: ..., include: [..], "
                          "exclude: [..]}")
    if key == "init_from_pretrained_model":
        where = _hub_name(str(where))
    return {"path": str(where), "include": include, "exclude": exclude, "match": "nemo_substring"}


__all__ = ["is_nemo_config", "is_nemo_config_file", "load_nemo_config", "apply_overrides", "translate"]
