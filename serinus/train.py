"""`serinus train`: train or fine-tune a Canary model from a YAML config.

    serinus train --config configs/canary_tiny.yaml trainer.max_steps=200 model.encoder.n_layers=2
    torchrun --nproc_per_node 8 -m serinus.train --config ... (DDP: one process per GPU)

The config has the sections of `DEFAULTS` below; dotted `key=value` overrides (Hydra-style) are
merged on top, and any key that is not in the schema is an error naming it. One process = one
device; under torchrun (WORLD_SIZE/LOCAL_RANK set) the model is wrapped in DDP, each rank reads
its own shard of every bucketed batch stream, and only rank 0 writes checkpoints and logs.

Checkpoints: `<out_dir>/checkpoints/step_<N>/` holds `model/` (a normal Serinus model folder,
loadable with `serinus transcribe --model`) and `trainer_state.pt` (optimizer, scheduler, RNG and
data position); `<out_dir>/checkpoints/last` names the newest. `trainer.resume=true` continues
from it exactly: the next batch and the next loss are what the uninterrupted run would have had.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from serinus.audio import FeatureConfig
from serinus.decoding import DecodingConfig
from serinus.model.canary import CanaryConfig, CanaryModel, padded_vocab, preset_config, sequence_loss
from serinus.model.decoder import DecoderConfig
from serinus.model.encoder import EncoderConfig


class ConfigError(ValueError):
    """A bad training config; the message names the key."""


# The schema: every key a config may set, with its default. model.{features,encoder,decoder,decoding}
# take the field names of the matching dataclasses (only the ones given override the preset).
DEFAULTS = {
    "model": {
        "preset": None,  # a released architecture (canary-180m-flash, ...), "init_from" (the init checkpoint's), or None
        "prompt_format": "canary2",
        "use_loss_mask_for_prompt": True,  # loss on answer + EOS only, not on the prompt tokens
        "label_smoothing": 0.0,
        "features": {},
        "encoder": {},
        "decoder": {},
        "decoding": {},
    },
    "tokenizer": {
        "dir": None,  # a folder written by `serinus tokenizer` (spl_tokens/ + <lang>/, or tokenizer.model)
        "from_checkpoint": None,  # a .nemo file or Serinus model folder whose tokenizer to use
    },
    "init_from": {
        "path": None,  # .nemo or Serinus model folder to initialise weights from (fine-tuning)
        "include": [],  # parameter-name prefixes to load (empty: all)
        "exclude": [],  # parameter-name prefixes not to load (wins over include)
    },
    "train_ds": {
        "manifest_filepath": None,  # one path or a list
        "limit": None,  # use only the first N lines of each manifest (smoke tests, overfitting)
        "bucket_duration_bins": None,  # [[max_duration, max_tokens], ...]; None: one bucket for all
        "bucket_batch_size": None,  # one per bin (e.g. from `serinus oomptimize`)
        "batch_size": None,  # the same batch size for every bin
        "batch_duration": None,  # or: seconds of audio per batch
        "quadratic_duration": None,
        "max_duration": None,
        "min_duration": None,
        "shuffle": True,
        "num_workers": 0,
        "allow_unk": False,
    },
    "validation_ds": {
        "manifest_filepath": None,
        "limit": None,
        "batch_size": 8,
    },
    "optim": {
        "lr": 3e-4,
        "betas": [0.9, 0.98],
        "weight_decay": 1e-3,
        "warmup_steps": 1000,
        "min_lr": 1e-6,
    },
    "trainer": {
        "max_steps": 1000,
        "val_check_interval": 500,  # steps; 0 disables validation during training (it still runs at the end)
        "checkpoint_every": 500,
        "keep_checkpoints": 2,
        "log_every": 10,
        "grad_clip": 1.0,
        "precision": "32",  # "32" or "bf16" (autocast)
        "out_dir": "runs/canary",
        "seed": 0,
        "resume": False,
        "device": "auto",  # auto: cuda when available
    },
}

_DATACLASSES = {"features": FeatureConfig, "encoder": EncoderConfig, "decoder": DecoderConfig, "decoding": DecodingConfig}


# ---------------------------------------------------------------------------------------------
# config


def _check_keys(cfg: dict, schema: dict, prefix: str = "") -> None:
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if prefix == "model." and key in _DATACLASSES:
            fields = {f.name for f in dataclasses.fields(_DATACLASSES[key])}
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name} must be a mapping of {_DATACLASSES[key].__name__} fields")
            for k in value:
                if k not in fields:
                    raise ConfigError(f"unknown config key {name}.{k}; allowed: {', '.join(sorted(fields))}")
            continue
        if key not in schema:
            raise ConfigError(f"unknown config key {name!r}; allowed under {prefix[:-1] or 'the top level'}: "
                              f"{', '.join(schema)}")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name} must be a mapping, got {value!r}")
            _check_keys(value, schema[key], f"{name}.")


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """DEFAULTS <- YAML file <- dotted `key=value` overrides, as a plain dict; unknown keys raise ConfigError."""
    from omegaconf import OmegaConf

    layers = [OmegaConf.create(DEFAULTS)]
    if path is not None:
        layers.append(OmegaConf.load(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form dotted.key=value")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    for layer in layers[1:]:  # check before merging so the error names the user's key
        _check_keys(OmegaConf.to_container(layer), DEFAULTS)
    return OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)


# ---------------------------------------------------------------------------------------------
# model, tokenizer, init


def build_tokenizer(cfg: dict):
    from serinus.data.bucketing import open_tokenizer

    tok = cfg["tokenizer"]
    source = tok["dir"] or tok["from_checkpoint"] or cfg["init_from"]["path"]
    if source is None:
        raise ConfigError("no tokenizer: set tokenizer.dir, tokenizer.from_checkpoint or init_from.path")
    return open_tokenizer(str(source))


def build_model_config(cfg: dict, tokenizer, init_cfg: CanaryConfig | None = None) -> CanaryConfig:
    m = cfg["model"]
    vocab = padded_vocab(tokenizer.vocab_size)
    if m["preset"] == "init_from":
        if init_cfg is None:
            raise ConfigError("model.preset=init_from needs init_from.path")
        base = dataclasses.replace(init_cfg, aligner=None)
    elif m["preset"]:
        base = preset_config(m["preset"], tokenizer.vocab_size)
    else:
        base = CanaryConfig(FeatureConfig(), EncoderConfig(), DecoderConfig(vocab_size=vocab),
                            decoding=DecodingConfig(beam_size=1, max_generation_delta=50))
    if "vocab_size" in m["decoder"]:
        raise ConfigError("model.decoder.vocab_size comes from the tokenizer; do not set it")
    parts = {k: dataclasses.replace(getattr(base, k), **m[k]) for k in _DATACLASSES}
    parts["decoder"] = dataclasses.replace(parts["decoder"], vocab_size=vocab)
    return dataclasses.replace(
        base, **parts, prompt_format=m["prompt_format"],
        use_loss_mask_for_prompt=bool(m["use_loss_mask_for_prompt"]), label_smoothing=float(m["label_smoothing"]),
    )


def _selected(name: str, include: list[str], exclude: list[str]) -> bool:
    if any(name.startswith(p) for p in exclude):
        return False
    return not include or any(name.startswith(p) for p in include)


def init_weights(model: CanaryModel, state: dict, include: list[str], exclude: list[str], where: str) -> list[str]:
    """Copy the selected parameters (by name prefix) of `state` into `model`; returns their names.

    A selected name the model lacks, or with another shape, is an error: exclude it explicitly
    (e.g. `decoder.token_embedding`, `decoder.head_bias` for a new tokenizer)."""
    own = model.state_dict()
    chosen = {k: v for k, v in state.items() if _selected(k, include, exclude)}
    if not chosen:
        raise ConfigError(f"init_from: no parameter of {where} matches include={include} exclude={exclude}")
    absent = [k for k in chosen if k not in own]
    if absent:
        raise ConfigError(f"init_from: {where} has {', '.join(absent[:5])}, which this model does not; "
                          "add them to init_from.exclude")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)} here" for k, v in chosen.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"init_from: shapes differ from {where}: {'; '.join(bad[:5])}; add them to init_from.exclude")
    model.load_state_dict(chosen, strict=False)
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# data


def _manifests(value) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def load_cuts(ds: dict, tokenizer=None, prompt_format: str = "canary2"):
    """CutSet of the manifests (first `limit` lines each), with `num_tokens` attached when a tokenizer is given."""
    from lhotse import CutSet

    from serinus.data.bucketing import attach_num_tokens
    from serinus.data.manifest import manifest_to_cuts, read_manifest

    paths = _manifests(ds["manifest_filepath"])
    if not paths:
        raise ConfigError("manifest_filepath is not set")
    cuts = []
    for i, p in enumerate(paths):
        m = read_manifest(p)
        if ds.get("limit"):
            m.entries = m.entries[: int(ds["limit"])]
        prefix = m.path.name.split(".")[0] if len(paths) == 1 else f"{i}-{m.path.name.split('.')[0]}"
        cuts.extend(manifest_to_cuts(m, id_prefix=prefix))
    cuts = CutSet.from_cuts(cuts)
    if tokenizer is not None:
        cuts = CutSet.from_cuts(list(attach_num_tokens(cuts, tokenizer, prompt_format,
                                                       allow_unk=bool(ds.get("allow_unk", False)))))
    return cuts


def build_sampler(ds: dict, cuts, seed: int, world_size: int, rank: int):
    from serinus.data.bucketing import make_sampler, measure

    bins = ds["bucket_duration_bins"]
    if bins is None:  # one bucket holding everything: plain batching
        durs, toks = measure(cuts)
        bins = [[math.ceil(float(durs.max()) * 1000) / 1000, int(toks.max())]]
    sizes = ds["bucket_batch_size"]
    if sizes is None and ds["batch_size"] is not None:
        sizes = [int(ds["batch_size"])] * len(bins)
    if sizes is None and ds["batch_duration"] is None:
        raise ConfigError("train_ds: set one of bucket_batch_size, batch_size or batch_duration")
    return make_sampler(
        cuts, bins, bucket_batch_size=sizes, batch_duration=ds["batch_duration"],
        quadratic_duration=ds["quadratic_duration"], min_duration=ds["min_duration"],
        max_duration=ds["max_duration"], shuffle=ds["shuffle"], seed=seed,
        world_size=world_size, rank=rank,
    )


def batch_stream(sampler, epoch: int, skip: int):
    """(epoch, index in epoch, cuts) forever, starting at batch `skip` of `epoch`.

    The position is counted here, in batches the loop consumed, rather than taken from the
    sampler's own state: DataLoader workers prefetch, so the sampler runs ahead of training."""
    while True:
        sampler.set_epoch(epoch)
        n = 0
        for i, cuts in enumerate(sampler):
            n += 1
            if i >= skip:
                yield epoch, i, cuts
        if n == 0:
            raise RuntimeError(f"the training data gave no batch in epoch {epoch}: {sampler.rejection_report()}")
        epoch, skip = epoch + 1, 0


def _identity(x):
    return x


class _Indexed(torch.utils.data.Dataset):
    """Wraps PromptedDataset so each batch keeps its (epoch, index) position through the workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        epoch, index, cuts = item
        return epoch, index, self.dataset[cuts]


# ---------------------------------------------------------------------------------------------
# optimisation


def lr_factor(step: int, warmup_steps: int) -> float:
    """NeMo's WarmupPolicy + InverseSquareRootAnnealing: linear warmup to the peak, then 1/sqrt decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return ((warmup_steps + 1) / (step + 1)) ** 0.5


def build_optimizer(model, optim: dict):
    # No weight decay on biases and norms, as usual for Transformers.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim["lr"], betas=tuple(optim["betas"]),
    )
    lr, min_lr, warmup = optim["lr"], optim["min_lr"], int(optim["warmup_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(lr_factor(s, warmup), min_lr / lr))
    return opt, sched


def compute_loss(model, batch, pad_id: int, mcfg: CanaryConfig, device, autocast_dtype=None):
    inputs, labels = batch.decoder_inputs_outputs()
    lengths = batch.prompted_transcript_lens - 1
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        log_probs = model(batch.audio.to(device), batch.audio_lens.to(device), inputs.to(device), lengths.to(device))
    prompt_lens = batch.prompt_lens.to(device) if mcfg.use_loss_mask_for_prompt else None
    return sequence_loss(log_probs.float(), labels.to(device), pad_id, prompt_lens, lengths.to(device),
                         mcfg.label_smoothing)


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(model: CanaryModel, cfg: dict, val_cuts, dataset, device, autocast_dtype=None) -> dict:
    """Val loss (teacher forcing) on the dev cuts, then greedy decoding: WER on ASR lines
    (source_lang == target_lang), BLEU on translation lines."""
    import jiwer
    import sacrebleu

    from serinus.data.dataset import cut_slots
    from serinus.transcribe import transcribe

    model.eval()
    cuts = list(val_cuts)
    bs = int(cfg["validation_ds"]["batch_size"])
    total, n = 0.0, 0
    for i in range(0, len(cuts), bs):
        batch = dataset[cuts[i : i + bs]]
        loss = compute_loss(model, batch, dataset.pad_id, model.cfg, device, autocast_dtype)
        total, n = total + float(loss) * len(batch.cuts), n + len(batch.cuts)
    out = {"val_loss": total / max(n, 1)}

    # Greedy decoding, one transcribe() call per prompt (source, target, pnc), in input order.
    groups: dict = {}
    for c in cuts:
        slots = cut_slots(c)
        src = slots.get("source_lang") or c.supervisions[0].language
        key = (src, slots.get("target_lang") or src, slots.get("pnc"))
        groups.setdefault(key, []).append(c)
    asr, ast = ([], []), ([], [])
    for (src, tgt, pnc), group in groups.items():
        audio = [c.load_audio().reshape(-1) for c in group]
        hyps = transcribe(model, audio, batch_size=bs, source_lang=src, target_lang=tgt, pnc=pnc)
        pair = asr if src == tgt else ast
        for c, hyp in zip(group, hyps):
            pair[0].append(" ".join(s.text for s in c.supervisions))
            pair[1].append(hyp.text)
    if asr[0]:
        out["wer"] = float(jiwer.wer(asr[0], asr[1]))
    if ast[0]:
        out["bleu"] = float(sacrebleu.corpus_bleu(ast[1], [ast[0]]).score)
    out["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(*asr))[:2] + list(zip(*ast))[:1]]
    model.train()
    return out


# ---------------------------------------------------------------------------------------------
# checkpoints


def _ckpt_root(cfg: dict) -> Path:
    return Path(cfg["trainer"]["out_dir"]) / "checkpoints"


def save_checkpoint(cfg, model, opt, sched, step: int, position: tuple[int, int]) -> Path:
    from serinus.checkpoint import save_model

    root = _ckpt_root(cfg)
    d = root / f"step_{step:07d}"
    save_model(model, d / "model")
    state = {
        "step": step, "epoch": position[0], "batch_in_epoch": position[1], "config": cfg,
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, d / "trainer_state.pt.tmp")
    os.replace(d / "trainer_state.pt.tmp", d / "trainer_state.pt")  # a checkpoint is complete once this exists
    (root / "last").write_text(d.name + "\n")
    keep = int(cfg["trainer"]["keep_checkpoints"])
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != d)
    if keep > 0:
        import shutil

        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return d


def last_checkpoint(cfg: dict) -> Path | None:
    f = _ckpt_root(cfg) / "last"
    if not f.is_file():
        return None
    d = _ckpt_root(cfg) / f.read_text().strip()
    return d if (d / "trainer_state.pt").is_file() else None


# ---------------------------------------------------------------------------------------------
# the loop


def _log(line: str, rank: int) -> None:
    if rank == 0:
        print(line, flush=True)


def train(cfg: dict) -> dict:
    """Run training as `cfg` says; returns {"losses": [per-step train loss], "val": [...], "out_dir": ...}."""
    import torch.distributed as dist

    from serinus.checkpoint import load_model
    from serinus.data.dataset import PromptedDataset

    tr = cfg["trainer"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if tr["device"] == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tr["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if tr["precision"] not in ("32", "bf16"):
        raise ConfigError(f"trainer.precision must be '32' or 'bf16', got {tr['precision']!r}")
    autocast_dtype = torch.bfloat16 if tr["precision"] == "bf16" else None
    torch.manual_seed(int(tr["seed"]))  # same init weights on every rank

    # Model: the tokenizer fixes the vocabulary; init_from may supply the architecture and weights.
    tokenizer = build_tokenizer(cfg)
    init = None
    if cfg["init_from"]["path"]:
        init = load_model(cfg["init_from"]["path"])
    mcfg = build_model_config(cfg, tokenizer, init.cfg if init is not None else None)
    model = CanaryModel(mcfg, tokenizer)
    if init is not None:
        names = init_weights(model, init.state_dict(), cfg["init_from"]["include"], cfg["init_from"]["exclude"],
                             str(cfg["init_from"]["path"]))
        _log(f"init_from {cfg['init_from']['path']}: loaded {len(names)} of {len(model.state_dict())} tensors", rank)
        del init
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model: {n_params / 1e6:.2f} M parameters, encoder {mcfg.encoder.n_layers}x{mcfg.encoder.d_model}, "
         f"decoder {mcfg.decoder.num_layers}x{mcfg.decoder.hidden_size}, vocab {mcfg.decoder.vocab_size}, "
         f"device {device}, world size {world_size}", rank)
    opt, sched = build_optimizer(model, cfg["optim"])

    # Data
    fmt = mcfg.prompt_format
    dataset = PromptedDataset(tokenizer, fmt, allow_unk=cfg["train_ds"]["allow_unk"])
    train_cuts = load_cuts(cfg["train_ds"], tokenizer, fmt)
    sampler = build_sampler(cfg["train_ds"], train_cuts, int(tr["seed"]), world_size, rank)
    val_cuts = load_cuts(cfg["validation_ds"]) if cfg["validation_ds"]["manifest_filepath"] else None
    val_dataset = PromptedDataset(tokenizer, fmt, allow_unk=True)  # a reference may hold an unseen character

    # Resume
    step, epoch, skip = 0, 0, 0
    ckpt = last_checkpoint(cfg) if tr["resume"] else None
    if tr["resume"] and ckpt is None:
        _log(f"resume: no checkpoint in {_ckpt_root(cfg)}, starting from scratch", rank)
    if ckpt is not None:
        from safetensors.torch import load_file

        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(load_file(str(ckpt / "model" / "model.safetensors")))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"] + 1
        _log(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {skip})", rank)

    ddp_model = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), sampler=batch_stream(sampler, epoch, skip), batch_size=None,
        num_workers=int(cfg["train_ds"]["num_workers"]), collate_fn=_identity,
        generator=torch.Generator().manual_seed(int(tr["seed"])),  # keep the global RNG (dropout) untouched
    )
    out_dir = Path(tr["out_dir"])
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    log_f = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    history = {"losses": [], "val": [], "out_dir": str(out_dir)}

    def run_validation():
        if val_cuts is None:
            return
        if rank == 0:
            v = validate(model, cfg, val_cuts, val_dataset, device, autocast_dtype)
            history["val"].append({"step": step, **v})
            metrics = "  ".join(f"{k} {v[k]:.4f}" for k in ("val_loss", "wer", "bleu") if k in v)
            _log(f"validation step {step}: {metrics}", rank)
            for ex in v["examples"]:
                _log(f"  ref: {ex['ref']}\n  hyp: {ex['hyp']}", rank)
            log_f.write(json.dumps({"step": step, **{k: x for k, x in v.items() if k != "examples"}}) + "\n")
            log_f.flush()
        if distributed:
            dist.barrier()

    def checkpoint(position):
        if rank == 0:
            d = save_checkpoint(cfg, model, opt, sched, step, position)
            _log(f"saved checkpoint {d}", rank)
        if distributed:
            dist.barrier()

    max_steps = int(tr["max_steps"])
    position = (epoch, skip - 1)
    t0 = time.time()
    it = iter(loader)
    while step < max_steps:
        ep, index, batch = next(it)
        position = (ep, index)
        loss = compute_loss(ddp_model, batch, dataset.pad_id, mcfg, device, autocast_dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"] or float("inf"))
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        value = loss.item()
        if distributed:  # report the mean over ranks
            t = torch.tensor([value], device=device)
            dist.all_reduce(t)
            value = float(t) / world_size
        history["losses"].append(value)
        if rank == 0:
            log_f.write(json.dumps({"step": step, "loss": value, "lr": lr, "grad_norm": float(gnorm),
                                    "batch_size": len(batch.cuts), "epoch": ep}) + "\n")
        if step % int(tr["log_every"]) == 0 or step == 1:
            _log(f"step {step:>6}  loss {value:.4f}  lr {lr:.2e}  grad_norm {float(gnorm):.2f}  "
                 f"batch {len(batch.cuts)}  epoch {ep}  {time.time() - t0:.1f}s", rank)
        if tr["checkpoint_every"] and step % int(tr["checkpoint_every"]) == 0 and step < max_steps:
            checkpoint(position)
        if tr["val_check_interval"] and step % int(tr["val_check_interval"]) == 0 and step < max_steps:
            run_validation()
    checkpoint(position)
    run_validation()
    if log_f is not None:
        log_f.close()
    return history


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serinus train",
        description="Train or fine-tune a Canary model. Multi-GPU: torchrun --nproc_per_node N -m serinus.train ...",
    )
    p.add_argument("--config", help="YAML config (see configs/canary_tiny.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in trainer.out_dir")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.encoder.n_layers=2 trainer.max_steps=100")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume:
            cfg["trainer"]["resume"] = True
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        train(cfg)
    except ConfigError as e:
        print(f"serinus train: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError, ManifestError, CheckpointError: messages name the file and line
        print(f"serinus train: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
