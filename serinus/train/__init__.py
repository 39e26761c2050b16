"""`serinus train`: train or fine-tune a Canary (AED) or FastConformer CTC model from a YAML config.

    serinus train --config configs/canary_tiny.yaml trainer.max_steps=200 model.encoder.n_layers=2
    serinus train --config configs/synth_en.yaml                      # the English recipe (30 min, CPU)
    serinus train --config-path DIR --config-name fast-conformer_aed.yaml model.prompt_format=canary2 ...
                                                                      # NeMo's own config and overrides
    torchrun --nproc_per_node 8 -m serinus.train --config ...          # DDP: one process per device

The pieces, in the order data flows:
    config.py  the schema (`DEFAULTS`), YAML + dotted overrides, checks
    nemo_config.py  NeMo's training config (fast-conformer_aed.yaml) -> that schema
    tasks.py   per model type: build the model, the loss of a batch, validation (AED, CTC)
    loop.py    runtime set-up, data, resume, the steps, checkpoints
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from serinus.train.config import DEFAULTS, ConfigError, load_config, parse_max_time
from serinus.train.init import init_from_model, init_weights
from serinus.train.loop import build_tokenizer, last_checkpoint, load_cuts, save_checkpoint, train
from serinus.train.optim import build_optimizer, lr_at
from serinus.train.tasks import AEDTask, CTCTask, make_task, normalize_text

__all__ = ["DEFAULTS", "ConfigError", "load_config", "parse_max_time", "train", "build_tokenizer", "init_weights", "init_from_model",
           "last_checkpoint", "load_cuts", "lr_at", "build_optimizer", "save_checkpoint", "AEDTask", "CTCTask",
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
    p.add_argument("--config", help="YAML config (see configs/canary_tiny.yaml, configs/synth_en.yaml), or "
                                    "a NeMo training config such as fast-conformer_aed.yaml")
    p.add_argument("--config-path", "-cp", help="Hydra style: the folder of --config-name (relative to the "
                                                "current directory)")
    p.add_argument("--config-name", "-cn", help="Hydra style: the config file in --config-path (.yaml optional)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in trainer.out_dir")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("--init-config", nargs=2, metavar=("MODEL", "OUT.yaml"),
                   help="write a fine-tuning config for MODEL (.nemo, Serinus folder or Hub id) in NeMo's layout: "
                        "its tokenizers, prompt format and architecture, init_from_pretrained_model; then exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.encoder.n_layers=2 trainer.max_steps=100")
    return p


def _config_file(args) -> str | None:
    if args.config_name is None:
        if args.config_path is not None:
            raise ConfigError("--config-path needs --config-name")
        return args.config
    if args.config is not None:
        raise ConfigError("give --config FILE or --config-path DIR --config-name NAME, not both")
    path = Path(args.config_path or ".") / args.config_name
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    if not path.is_file():
        raise ConfigError(f"--config-path/--config-name: no such file {path}")
    return str(path)


def _init_config(model: str, out: str) -> int:
    from serinus.checkpoint import CheckpointError
    from serinus.train.finetune_config import write

    try:
        path = write(model, out)
    except (CheckpointError, ValueError) as e:
        print(f"serinus train: --init-config: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} (tokenizers in {path.parent / (path.stem + '_tokenizers')}); train with\n"
          f"  serinus train --config {path} model.train_ds.manifest_filepath=TRAIN.jsonl "
          f"model.validation_ds.manifest_filepath=DEV.jsonl exp_manager.exp_dir=runs/{path.stem}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.init_config:
        return _init_config(*args.init_config)
    try:
        from serinus.train.nemo_config import is_nemo_config_file, load_nemo_config

        path = _config_file(args)
        if path is not None and is_nemo_config_file(path):
            cfg, ignored, notes = load_nemo_config(path, args.overrides)
            if os.environ.get("RANK", "0") == "0":
                for line in notes:
                    print(f"serinus train: {line}", file=sys.stderr)
                if ignored:
                    print("serinus train: warning: NeMo settings Serinus does not act on: " + ", ".join(ignored),
                          file=sys.stderr)
        else:
            cfg = load_config(path, args.overrides)
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
