"""Optimisation: AdamW without weight decay on biases and norms, and the learning rate of every step
(NeMo's warm-up + inverse-sqrt or cosine schedules, and an optional linear decay over the last part of a
step or wall-clock budget)."""

from __future__ import annotations

import math

import torch

from serinus.train.config import ConfigError


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int | None = None, min_lr: float = 0.0) -> float:
    """NeMo's InverseSquareRootAnnealing (a WarmupPolicy): linear warm-up (step + 1) / (warmup + 1) up to and
    including step `warmup_steps`, then lr * sqrt((warmup + 1) / (step + 1)); min_lr only past max_steps
    (NeMo does not floor the decay at min_lr)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if max_steps is not None and step > max_steps:
        return min_lr
    return lr * ((warmup_steps + 1) / (step + 1)) ** 0.5


def cosine_lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0,
                 done: float = 0.0) -> float:
    """NeMo's CosineAnnealing: the same warm-up, then from lr down to min_lr along half a cosine over the
    steps after it. `done` (0-1) is how much of a wall-clock budget has passed: the cosine follows
    whichever of steps and time is further along, so a run stopped by trainer.max_time also ends low."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step > max_steps:
        return min_lr
    frac = max((step - warmup_steps) / max(1, max_steps - warmup_steps), done)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class LRSchedule:
    """The lr of every step: warm-up, then optim.schedule (inverse_sqrt or cosine, as NeMo's schedulers),
    then, if optim.decay_fraction > 0, a linear fall to min_lr over that last part of the budget
    (warm-up, stable, decay: a fixed budget ends with its weights annealed instead of at a high lr).
    The budget is trainer.max_steps or trainer.max_time, whichever is further along."""

    def __init__(self, opt, optim: dict, max_steps: int):
        self.opt, self.max_steps = opt, max_steps
        self.lr, self.min_lr, self.warmup = float(optim["lr"]), float(optim["min_lr"]), int(optim["warmup_steps"])
        self.schedule, self.decay_fraction = optim.get("schedule", "inverse_sqrt"), float(optim.get("decay_fraction", 0))
        if self.schedule not in ("inverse_sqrt", "cosine"):
            raise ConfigError(f"optim.schedule={self.schedule!r}: use inverse_sqrt or cosine")
        if not 0.0 <= self.decay_fraction < 1.0:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction}: a fraction of the budget, 0 <= f < 1")
        self.last_epoch = 0  # the step whose lr the optimizer holds (LambdaLR's name, for old checkpoints)
        self._set(self.lr_at(0))

    def lr_at(self, step: int, done: float = 0.0) -> float:
        if self.schedule == "cosine":
            lr = cosine_lr_at(step, self.lr, self.warmup, self.max_steps, self.min_lr, done)
        else:
            lr = lr_at(step, self.lr, self.warmup, self.max_steps, self.min_lr)
        f = self.decay_fraction
        progress = max(step / max(1, self.max_steps), done)
        if f > 0 and progress > 1.0 - f and step > self.warmup:
            lr = self.min_lr + (lr - self.min_lr) * max(0.0, (1.0 - progress) / f)
        return lr

    def _set(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, done: float = 0.0) -> None:
        """Move to the next step; `done` is the fraction of trainer.max_time used so far (0 without one)."""
        self.last_epoch += 1
        self._set(self.lr_at(self.last_epoch, done))

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])  # the lr itself comes back with the optimizer's state


def build_optimizer(model, optim: dict, max_steps: int | None = None):
    # No weight decay on biases and norms, as usual for Transformers.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    # torch's fused kernel on CPU and CUDA: one pass per tensor where the default (a Python loop over the
    # parameters on a CPU) costs ~22 ms of a ~450 ms step of the English recipe (fused: ~5 ms)
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay) or None
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim["lr"], betas=tuple(optim["betas"]), fused=fused,
    )
    return opt, LRSchedule(opt, optim, max_steps if max_steps is not None else 10**12)
