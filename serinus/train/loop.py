"""The training loop: runtime set-up -> model -> data -> trainer state (resume) -> steps.

One process = one device; under torchrun (WORLD_SIZE/LOCAL_RANK set) the model is wrapped in
DDP, each rank reads its own shard of every bucketed batch stream, and only rank 0 writes
checkpoints and logs.

Checkpoints: `<out_dir>/checkpoints/step_<N>/` holds `model/` (a normal Serinus model folder,
loadable with `serinus transcribe --model`) and `trainer_state.pt` (optimizer, scheduler, RNG and
data position); `<out_dir>/checkpoints/last` names the newest. A checkpoint is written under a
temporary name and renamed when complete, so a crash never leaves a half-written one that resume
would pick up. `trainer.resume=true` continues exactly: the next batch and the next loss are what
the uninterrupted run would have had. The final model is also written to `<out_dir>/model/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from serinus.allocator import keep_freed_memory
from serinus.model.canary import CanaryConfig
from serinus.train.config import ConfigError, parse_max_time
from serinus.train.monitor import Monitor, padding_ratios
from serinus.train.optim import build_optimizer
from serinus.train.tasks import fits_decoder, make_task


# ---------------------------------------------------------------------------------------------
# runtime


@dataclass
class Runtime:
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    autocast_dtype: torch.dtype | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def warn(self, line: str) -> None:
        if self.rank == 0:
            print(f"serinus train: warning: {line}", file=sys.stderr, flush=True)


def setup_runtime(tr: dict) -> Runtime:
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if tr["device"] == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tr["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()  # a step's activations reuse the last step's memory instead of faulting it in again
    if tr.get("threads"):
        torch.set_num_threads(int(tr["threads"]))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(int(tr["seed"]))  # same init weights on every rank
    if tr["precision"] == "16" and device.type != "cuda":
        raise ConfigError(f"trainer.precision=16 (float16 + gradient scaler) is for CUDA devices; this run is on "
                          f"{device.type}: use trainer.precision=bf16 or 32")
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[tr["precision"]]
    return Runtime(device, rank, local_rank, world_size, dtype)


# ---------------------------------------------------------------------------------------------
# model


def build_tokenizer(cfg: dict, rt: Runtime | None = None):
    from serinus.tokenizer import langs_tokenizer, open_tokenizer

    tok = cfg["tokenizer"]
    if tok.get("langs"):  # NeMo's aggregate tokenizer, in the config's order (ids follow it)
        try:
            return langs_tokenizer(tok["langs"])
        except ValueError as e:  # a folder the config names: a config error (exit code 2), as before
            raise ConfigError(str(e)) from None
    if not tok["dir"] and tok.get("vocab_size") and not tok["from_checkpoint"]:
        # built into the run folder, also when init_from only gives weights (e.g. a CTC model's encoder)
        tok["dir"] = str(Path(cfg["trainer"]["out_dir"]) / "tokenizer")
    if tok["dir"] and tok.get("vocab_size") and not Path(tok["dir"]).exists():
        if rt is not None and rt.distributed:
            raise ConfigError("tokenizer.vocab_size: build the tokenizer before a torchrun job (run once without it)")
        train_tokenizer(cfg, Path(tok["dir"]), int(tok["vocab_size"]), tok["type"])
        if rt is not None:
            rt.log(f"tokenizer: built {tok['dir']} from the training text ({tok['type']}, "
                   f"vocab {tok['vocab_size']} per language)")
    source = tok["dir"] or tok["from_checkpoint"] or cfg["init_from"]["path"]
    if source is None:
        raise ConfigError("no tokenizer: set tokenizer.dir, tokenizer.from_checkpoint or init_from.path")
    return open_tokenizer(str(source))


def train_tokenizer(cfg: dict, out: Path, vocab_size: int, spe_type: str = "bpe") -> None:
    """spl_tokens + one SentencePiece model (`spe_type`: bpe, unigram, char) per target language of
    train_ds (model.type aed), or one (ctc).
    Written to a temporary folder first, so a failed build leaves no folder that looks complete."""
    from serinus.data.manifest import read_manifest
    from serinus.data.tokenizers import build_special_tokenizer, train_bpe_tokenizer

    ds = cfg["train_ds"]
    texts: dict[str, list[str]] = {}
    for p in _manifests(ds["manifest_filepath"]):
        for e in read_manifest(p).entries:
            if _keep(e, ds):
                lang = e.lang or e.extra.get("source_lang") or "en"
                texts.setdefault(lang, []).append(e.text)
    if not texts:
        raise ConfigError("tokenizer.vocab_size: train_ds has no text to build a tokenizer from")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg["model"]["type"] == "ctc":
        d = train_bpe_tokenizer([t for ts in texts.values() for t in ts], tmp / "bpe", vocab_size, spe_type=spe_type)
        shutil.move(str(d), str(tmp / "ctc"))
        shutil.rmtree(tmp / "bpe")
        shutil.move(str(tmp / "ctc"), str(out))
        shutil.rmtree(tmp, ignore_errors=True)
        return
    build_special_tokenizer(tmp / "spl_tokens", prompt_format=cfg["model"]["prompt_format"])
    for lang, ts in sorted(texts.items()):
        train_bpe_tokenizer(ts, tmp / lang, vocab_size, spe_type=spe_type)
    os.replace(tmp, out)


def build_model(cfg: dict, task, tokenizer, rt: Runtime):
    """The model a config describes, initialised from init_from.path when set; returns (model, InitReport | None)."""
    from serinus.train.init import init_from_model, load_init_model

    init = None
    if cfg["init_from"]["path"]:
        from serinus.checkpoint import CheckpointError

        try:
            init = load_init_model(cfg["init_from"]["path"])
        except CheckpointError as e:  # e.g. a recipe's second stage run before its first
            raise ConfigError(f"init_from.path: {e}") from None
    init_cfg = getattr(init, "cfg", None)
    model = task.build_model(tokenizer, init_cfg if isinstance(init_cfg, CanaryConfig) or task.name == "ctc"
                             else None)
    report = None
    if init is not None:
        report = init_from_model(model, init, cfg["init_from"]["include"], cfg["init_from"]["exclude"],
                                 str(cfg["init_from"]["path"]), cfg["init_from"].get("match", "prefix"))
        rt.log(report.text())
    return model.to(rt.device).train(), report


def describe(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    enc = model.cfg.encoder
    text = f"{n / 1e6:.2f} M parameters, encoder {enc.n_layers}x{enc.d_model}"
    if hasattr(model.cfg, "decoder"):
        dec = model.cfg.decoder
        text += f", decoder {dec.num_layers}x{dec.hidden_size}, vocab {dec.vocab_size}"
        if getattr(model.cfg, "ctc_weight", 0):
            text += f", CTC head (weight {model.cfg.ctc_weight})"
    else:
        text += f", CTC over {model.cfg.num_classes} tokens + blank"
    return text


# ---------------------------------------------------------------------------------------------
# data


def _manifests(value) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def _keep(entry, ds: dict) -> bool:
    src, tgt = ds.get("source_langs"), ds.get("target_langs")
    source = entry.extra.get("source_lang") or entry.lang
    target = entry.lang or source
    pairs = ds.get("lang_pairs")
    return ((not src or source in src) and (not tgt or target in tgt)
            and (not pairs or f"{source}-{target}" in pairs))


def load_cuts(ds: dict, tokenizer=None, prompt_format: str = "canary2"):
    """CutSet of the manifests (language filters, then the first `limit` lines each), with
    `num_tokens` attached when a tokenizer is given."""
    from lhotse import CutSet

    from serinus.data.bucketing import attach_num_tokens
    from serinus.data.manifest import manifest_to_cuts, read_manifest

    paths = _manifests(ds["manifest_filepath"])
    if not paths:
        raise ConfigError("manifest_filepath is not set")
    cuts = []
    for i, p in enumerate(paths):
        m = read_manifest(p)
        m.entries = [e for e in m.entries if _keep(e, ds)]
        if ds.get("limit"):
            m.entries = m.entries[: int(ds["limit"])]
        prefix = m.path.name.split(".")[0] if len(paths) == 1 else f"{i}-{m.path.name.split('.')[0]}"
        cuts.extend(manifest_to_cuts(m, id_prefix=prefix))
    if not cuts:
        raise ConfigError(f"no manifest line of {', '.join(paths)} passes source_langs={ds.get('source_langs')} "
                          f"target_langs={ds.get('target_langs')} lang_pairs={ds.get('lang_pairs')}")
    cuts = CutSet.from_cuts(cuts)
    if tokenizer is not None:
        cuts = CutSet.from_cuts(list(attach_num_tokens(cuts, tokenizer, prompt_format,
                                                       allow_unk=bool(ds.get("allow_unk", False)))))
    return cuts


def describe_too_long(long: list, positions: int) -> str:
    worst = max(long, key=lambda c: c.custom["num_tokens"])
    return (f"{len(long)} utterance(s) have a prompt + transcript longer than the decoder's max_sequence_length "
            f"{positions} (the longest: {worst.id}, {worst.custom['num_tokens'] - 1} tokens)")


def speed_factors(value) -> tuple[float, ...]:
    """`train_ds.perturb_speed`: false, true (NeMo's 0.9/1.0/1.1) or a list of factors (1.0 = as recorded)."""
    if not value:
        return ()
    factors = (0.9, 1.0, 1.1) if value is True else tuple(float(f) for f in value)
    if not factors or any(not 0.5 <= f <= 2.0 for f in factors):
        raise ConfigError(f"train_ds.perturb_speed={value}: give true or a list of speed factors in [0.5, 2]")
    return factors


def perturb_speed(cuts, factors: tuple[float, ...]):
    """Every cut once per factor (Kaldi's 3-way speed perturbation: an epoch sees each utterance at
    each speed; pitch and tempo change together, as `sox speed` does); lhotse resamples on load."""
    from lhotse import CutSet

    if not factors:
        return cuts
    out = []
    for f in factors:
        out.extend(cuts if f == 1.0 else cuts.perturb_speed(f))
    return CutSet.from_cuts(out)


def build_sampler(ds: dict, cuts, seed: int, world_size: int, rank: int):
    from serinus.data.bucketing import bins_from_lengths, make_sampler, measure

    bins = ds["bucket_duration_bins"]
    if bins is None and ds["batch_duration"] is not None and ds["bucket_batch_size"] is None \
            and ds["batch_size"] is None and int(ds["num_buckets"]) > 1:
        # a duration budget without bins: estimate them, or every batch would be sized for the longest cut
        durs, toks = measure(cuts)
        sub = max(1, int(ds["num_subbuckets"]))
        buckets = min(int(ds["num_buckets"]), len(durs) // (2 * sub))  # at least 2 utterances a bin
        if buckets < int(ds["num_buckets"]) and rank == 0:
            print(f"serinus train: train_ds.num_buckets={ds['num_buckets']} is more than {len(durs)} utterances "
                  f"fill; using {max(buckets, 1)}", file=sys.stderr, flush=True)
        if buckets > 1:
            bins = bins_from_lengths(durs, toks, buckets, sub)[0]
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
# checkpoints


def _ckpt_root(cfg: dict) -> Path:
    return Path(cfg["trainer"]["out_dir"]) / "checkpoints"


def save_checkpoint(cfg, model, opt, sched, step: int, position: tuple[int, int], scaler=None,
                    elapsed: float = 0.0) -> Path:
    from serinus.checkpoint import save_any

    root = _ckpt_root(cfg)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_any(model, tmp / "model")
    state = {
        "step": step, "epoch": position[0], "batch_in_epoch": position[1], "config": cfg,
        "elapsed_s": elapsed,  # training time so far: trainer.max_time and the schedule go on from it
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # complete checkpoints only ever appear under their final name
    (root / "last.tmp").write_text(final.name + "\n")
    os.replace(root / "last.tmp", root / "last")
    keep = int(cfg["trainer"]["keep_checkpoints"])
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
    if keep > 0:
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def last_checkpoint(cfg: dict) -> Path | None:
    f = _ckpt_root(cfg) / "last"
    if not f.is_file():
        return None
    d = _ckpt_root(cfg) / f.read_text().strip()
    return d if (d / "trainer_state.pt").is_file() else None


def restore(ckpt: Path, model, opt, sched, scaler=None) -> tuple[int, int, int, float]:
    """Load weights, optimizer, scheduler and RNG from a checkpoint; returns (step, epoch, next batch,
    seconds of training so far)."""
    from serinus.checkpoint import read_own_weights

    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(read_own_weights(ckpt / "model"))
    kernels = [{k: group.get(k) for k in ("foreach", "fused")} for group in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, chosen in zip(opt.param_groups, kernels):  # this run's kernels, not the saving run's
        group.update(chosen)
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"], state["epoch"], state["batch_in_epoch"] + 1, float(state.get("elapsed_s", 0.0))


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: dict) -> dict:
    """Run training as `cfg` says; returns {"losses": [per-step train loss], "val": [...], "out_dir": ...}."""
    import torch.distributed as dist

    t_start = time.time()
    tr = cfg["trainer"]
    max_time = parse_max_time(tr["max_time"])
    rt = setup_runtime(tr)
    task = make_task(cfg)

    tokenizer = build_tokenizer(cfg, rt)
    model, init_report = build_model(cfg, task, tokenizer, rt)
    rt.log(f"model: {describe(model)}, device {rt.device}, world size {rt.world_size}")
    opt, sched = build_optimizer(model, cfg["optim"], int(tr["max_steps"]))
    # float16 gradients underflow without loss scaling; for 32/bf16 the scaler does nothing
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)

    cache = {} if cfg["train_ds"]["cache_audio"] else None
    dataset = task.dataset(model, allow_unk=bool(cfg["train_ds"]["allow_unk"]), audio_cache=cache)
    speeds = speed_factors(cfg["train_ds"]["perturb_speed"])
    train_cuts = perturb_speed(load_cuts(cfg["train_ds"]), speeds)
    train_cuts = task.attach_num_tokens(train_cuts, model, bool(cfg["train_ds"]["allow_unk"]))
    positions = getattr(getattr(model.cfg, "decoder", None), "max_sequence_length", None)  # AED models
    long = [c for c in train_cuts if not fits_decoder(c, positions)]
    if long:
        train_cuts = train_cuts.filter(lambda c: fits_decoder(c, positions))
        rt.warn(f"train_ds: {describe_too_long(long, positions)}; left out of training")
    task.train_texts = {" ".join(s.text for s in c.supervisions) for c in train_cuts}
    sampler = build_sampler(cfg["train_ds"], train_cuts, int(tr["seed"]), rt.world_size, rt.rank)
    val_cuts = None
    if cfg["validation_ds"]["manifest_filepath"]:
        val_cuts = list(task.attach_num_tokens(load_cuts(cfg["validation_ds"]), model, allow_unk=True))
        long = [c for c in val_cuts if not fits_decoder(c, positions)]
        if long:
            rt.warn(f"validation_ds: {describe_too_long(long, positions)}; decoded for WER/BLEU, left out of the "
                    "validation loss")
    val_dataset = task.dataset(model, allow_unk=True)  # a reference may hold an unseen character
    hours = sum(c.duration for c in train_cuts) / 3600
    rt.log(f"data: {len(train_cuts)} training utterances ({hours:.2f} h"
           + (f", speeds {'/'.join(f'{f:g}' for f in speeds)})" if speeds else ")")
           + (f", {len(val_cuts)} validation" if val_cuts else ""))

    step, epoch, skip, elapsed = 0, 0, 0, 0.0
    ckpt = last_checkpoint(cfg) if tr["resume"] else None
    if tr["resume"] and ckpt is None:
        rt.log(f"resume: no checkpoint in {_ckpt_root(cfg)}, starting from scratch")
    if ckpt is not None:
        step, epoch, skip, elapsed = restore(ckpt, model, opt, sched, scaler)
        rt.log(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {skip})")

    ddp_model = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), sampler=batch_stream(sampler, epoch, skip), batch_size=None,
        num_workers=int(cfg["train_ds"]["num_workers"]), collate_fn=_identity,
        generator=torch.Generator().manual_seed(int(tr["seed"])),  # keep the global RNG (dropout) untouched
    )
    out_dir = Path(tr["out_dir"])
    if rt.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        if init_report is not None:
            (out_dir / "init_report.txt").write_text(init_report.text() + "\n")
            (out_dir / "init_report.json").write_text(json.dumps(init_report.to_dict(), indent=1))
    max_steps = int(tr["max_steps"])
    monitor = Monitor(out_dir, tr, max_steps, step, rt.rank)
    history = {"losses": [], "val": [], "out_dir": str(out_dir)}

    last_validation = [-1]  # the step of the latest validation (every rank knows it)

    def run_validation():
        if val_cuts is None:
            return
        last_validation[0] = step
        if rt.rank == 0:
            t = time.time()
            v = task.validate(model, val_cuts, val_dataset, rt.device, rt.autocast_dtype)
            record = {"step": step, "minutes": round((time.time() - t_start) / 60, 2),
                      **{k: x for k, x in v.items() if k != "examples"}}
            history["val"].append({**record, "examples": v["examples"]})
            monitor.validation(step, record, time.time() - t, v["examples"])
        if rt.distributed:
            dist.barrier()

    def checkpoint(position):
        if rt.rank == 0:
            d = save_checkpoint(cfg, model, opt, sched, step, position, scaler, time.time() - t_loop)
            monitor.print(f"saved checkpoint {d}")
        if rt.distributed:
            dist.barrier()

    time_used = [0.0]  # the fraction of trainer.max_time used when this step began, the same on every rank

    def out_of_time() -> bool:
        if max_time is None:
            return False
        used = torch.tensor([(time.time() - t_loop) / max_time])
        if rt.distributed:  # every rank must stop at the same step, and set the same lr
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
        time_used[0] = float(used.item())
        return time_used[0] >= 1.0

    accumulate = int(tr.get("accumulate_grad_batches") or 1)
    position = (epoch, skip - 1)
    it = iter(loader)
    # trainer.max_time counts from here, as Lightning's Timer (set-up excluded; a resumed run goes on from
    # the time its checkpoint had used)
    t_loop = time.time() - elapsed
    rt.log(f"set-up took {time.time() - t_start:.1f} s")
    while step < max_steps and not out_of_time():
        t_step = time.time()
        task.step = step
        opt.zero_grad(set_to_none=True)
        value, parts, n_cuts, audio_s, padding = 0.0, {}, 0, 0.0, {}
        for micro in range(accumulate):  # trainer.accumulate_grad_batches: gradients of N batches, one step
            ep, index, batch = next(it)
            position = (ep, index)
            hold = rt.distributed and micro < accumulate - 1  # DDP all-reduces on the last backward only
            with ddp_model.no_sync() if hold else contextlib.nullcontext():
                loss, micro_parts = task.loss(ddp_model, batch, rt.device, rt.autocast_dtype)
                scaler.scale(loss / accumulate).backward()
            value += loss.item() / accumulate
            for k, v in micro_parts.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / accumulate
            for k, v in padding_ratios(batch).items():
                padding[k] = padding.get(k, 0.0) + v / accumulate
            n_cuts += len(batch.cuts)
            audio_s += float(batch.audio_lens.sum()) / 16000
        scaler.unscale_(opt)  # clip the true gradients (a no-op without float16)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"] or float("inf"))
        scaler.step(opt)  # skipped (and the scale lowered) when float16 gradients overflowed
        scaler.update()
        lr = sched.get_last_lr()[0]
        sched.step(time_used[0])
        step += 1
        if rt.distributed:  # report the mean over ranks
            t = torch.tensor([value], device=rt.device)
            dist.all_reduce(t)
            value = float(t) / rt.world_size
        history["losses"].append(value)
        record = {"loss": value, **parts, "lr": lr, "grad_norm": float(gnorm), "batch_size": n_cuts * rt.world_size,
                  "epoch": ep, "audio_seconds": round(audio_s * rt.world_size, 3), **padding}
        monitor.step(step, record, time.time() - t_step, audio_s * rt.world_size)
        if tr["checkpoint_every"] and step % int(tr["checkpoint_every"]) == 0 and step < max_steps:
            checkpoint(position)
        if tr["val_check_interval"] and step % int(tr["val_check_interval"]) == 0 and step < max_steps:
            run_validation()
    if step < max_steps:
        monitor.print(f"trainer.max_time reached after {(time.time() - t_loop) / 60:.1f} min of training, "
                      f"at step {step}")
    checkpoint(position)
    if rt.rank == 0:
        from serinus.checkpoint import save_any

        save_any(model, out_dir / "model")
        monitor.print(f"final model: {out_dir / 'model'} (serinus transcribe --model {out_dir / 'model'})")
    due = bool(tr["val_check_interval"]) and step % int(tr["val_check_interval"]) == 0
    if (tr["final_validation"] or due) and last_validation[0] != step:
        run_validation()
    monitor.close()
    return history
