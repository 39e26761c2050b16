"""Record NeMo's learning-rate schedule for a few settings, as tests/data/nemo_lr_schedule.json.

Run by hand with NeMo's own Python (never a Serinus dependency):
    /work/nemo_venv/bin/python tools/record_nemo_lr_schedule.py tests/data/nemo_lr_schedule.json

It builds NeMo's scheduler the way NeMo's `setup_optimization` does for fast-conformer_aed.yaml's
`optim.sched` (name InverseSquareRootAnnealing or CosineAnnealing, warmup_steps, min_lr, max_steps from the trainer)
and steps it, recording the lr the optimizer uses at each step.
"""

import json
import sys

import torch
from nemo.core.optim.lr_scheduler import prepare_lr_scheduler

SETTINGS = [
    {"lr": 3e-4, "warmup_steps": 2500, "min_lr": 1e-6, "max_steps": 6000},  # fast-conformer_aed.yaml
    {"lr": 3e-3, "warmup_steps": 300, "min_lr": 1e-6, "max_steps": 3000},  # configs/synth_en.yaml
    {"lr": 1e-3, "warmup_steps": 0, "min_lr": 5e-4, "max_steps": 500},  # no warm-up, a high floor
    {"name": "CosineAnnealing", "lr": 3e-3, "warmup_steps": 300, "min_lr": 1e-5, "max_steps": 3000},
    {"name": "CosineAnnealing", "lr": 1e-3, "warmup_steps": 0, "min_lr": 0.0, "max_steps": 2500},
]
STEPS = [0, 1, 2, 10, 99, 100, 101, 299, 300, 301, 1000, 2499, 2500, 2501, 4000, 5999]

out = []
for s in SETTINGS:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=s["lr"], betas=(0.9, 0.98))
    sched_cfg = {"name": s.get("name", "InverseSquareRootAnnealing"), "warmup_steps": s["warmup_steps"], "min_lr": s["min_lr"],
                 "max_steps": s["max_steps"]}
    sched = prepare_lr_scheduler(opt, sched_cfg, train_dataloader=None)["scheduler"]
    lrs = {}
    for step in range(max(STEPS) + 1):
        if step in STEPS and step < s["max_steps"]:
            lrs[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    out.append({**s, "lr_at_step": lrs})
with open(sys.argv[1], "w") as f:
    json.dump({"source": "nemo_toolkit 3.0.0, nemo.core.optim.lr_scheduler.prepare_lr_scheduler", "settings": out},
              f, indent=1)
print(json.dumps(out, indent=1)[:1500])
