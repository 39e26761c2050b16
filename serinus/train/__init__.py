"""`serinus train`: train or fine-tune a Canary (AED) or FastConformer CTC model from a YAML config.

    serinus train --config configs/canary_tiny.yaml trainer.max_steps=200 model.encoder.n_layers=2
    serinus train --config configs/synth_en.yaml                      # the English recipe (30 min, CPU)
    torchrun --nproc_per_node 8 -m serinus.train --config ...          # DDP: one process per device

The pieces, in the order data flows:
    config.py  the schema (`DEFAULTS`), YAML + dotted overrides, checks
    tasks.py   per model type: build the model, the loss of a batch, validation (AED, CTC)
    loop.py    runtime set-up, data, resume, the steps, checkpoints
"""

from __future__ import annotations

import argparse
import sys

from serinus.train.config import DEFAULTS, ConfigError, load_config, parse_max_time
from serinus.train.loop import (build_optimizer, build_tokenizer, init_weights, last_checkpoint, load_cuts,
                                lr_factor, save_checkpoint, train)
from serinus.train.tasks import AEDTask, CTCTask, make_task, normalize_text

__all__ = ["DEFAULTS", "ConfigError", "load_config", "parse_max_time", "train", "build_tokenizer", "init_weights",
           "last_checkpoint", "load_cuts", "lr_factor", "build_optimizer", "save_checkpoint", "AEDTask", "CTCTask",
           "make_task", "normalize_text", "build_model_config", "main"]


def build_model_config(cfg: dict, tokenizer, init_cfg=None):
    """The CanaryConfig a config describes (for model.type=aed)."""
    return AEDTask(cfg).model_config(tokenizer, init_cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serinus train",
        description="Train or fine-tune a Canary (AED) or CTC model. Multi-GPU: torchrun --nproc_per_node N "
                    "-m serinus.train ...",
    )
    p.add_argument("--config", help="YAML config (see configs/canary_tiny.yaml, configs/synth_en.yaml)")
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
