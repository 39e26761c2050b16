"""`serinus train --init-config MODEL OUT.yaml`: the seed's fine-tuning config, built from any checkpoint.

What the seed's notebook cells do by hand, in one step, in NeMo's own layout (fast-conformer_aed.yaml):
the model's tokenizers saved beside OUT (`save_tokenizers`, one folder per language plus spl_tokens),
its prompt format, prompt defaults and architecture (preprocessor, encoder, transf_decoder, head) copied
in, and `init_from_pretrained_model` pointing at MODEL. The data paths are left `???` (required), so
the run takes them on the command line, as the seed's does:

    serinus train --init-config nvidia/canary-180m-flash config/canary-180m-flash-finetune.yaml
    serinus train --config-path config --config-name canary-180m-flash-finetune.yaml \\
        model.train_ds.manifest_filepath=train.jsonl model.validation_ds.manifest_filepath=dev.jsonl \\
        exp_manager.exp_dir=canary_results trainer.max_steps=10
"""

from __future__ import annotations

import os
from pathlib import Path

MISSING = "???"


def _save_tokenizer_dirs(tokenizer, root: Path) -> dict:
    """NeMo's layout: <root>/<lang>/tokenizer.model per sub-tokenizer (or <root>/tokenizer.model for a
    unified one); returns the config's `tokenizer:` section."""
    from serinus.tokenizer import CanaryTokenizer

    root.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, CanaryTokenizer):
        langs = {}
        for lang, sp in tokenizer._spm.items():
            (root / lang).mkdir(exist_ok=True)
            (root / lang / "tokenizer.model").write_bytes(sp.serialized_model_proto())
            langs[lang] = {"dir": str(root / lang), "type": "bpe"}
        return {"dir": None, "type": "agg", "langs": langs}
    (root / "tokenizer.model").write_bytes(tokenizer._sp.serialized_model_proto())
    return {"dir": str(root), "type": "bpe"}


def build(model_path: str, out: Path) -> dict:
    """The fine-tuning config (a dict in NeMo's layout) for the checkpoint `model_path`; writes its tokenizers."""
    from serinus.checkpoint import load_model
    from serinus.nemo_export import canary_config

    model = load_model(model_path)
    tok_root = (out.parent / f"{out.stem}_tokenizers").absolute()
    tokenizer = _save_tokenizer_dirs(model.tokenizer, tok_root)
    arch = canary_config(model, tokenizer)
    init = os.path.abspath(model_path) if Path(model_path).exists() else str(model_path)
    data = {"use_lhotse": True, "manifest_filepath": MISSING, "sample_rate": 16000, "text_field": "text",
            "lang_field": "target_lang"}
    cfg = {
        "name": f"{Path(str(model_path).rstrip('/')).name.removesuffix('.nemo')}-finetune",
        "init_from_pretrained_model": init,
        "spl_tokens": ({"model_dir": tokenizer["langs"]["spl_tokens"]["dir"], "force_rebuild": False}
                       if tokenizer.get("langs") else None),
        "model": {
            "sample_rate": 16000,
            "label_smoothing": arch["label_smoothing"],
            "use_loss_mask_for_prompt": True,  # loss on the answer only: what fine-tuning wants
            "prompt_format": arch["prompt_format"],
            "prompt_defaults": arch["prompt_defaults"],
            "model_defaults": arch["model_defaults"],
            "train_ds": {**data, "shuffle": True, "num_workers": 2, "batch_size": None, "batch_duration": 360,
                         "quadratic_duration": 15, "use_bucketing": True, "num_buckets": 20},
            "validation_ds": {**data, "batch_size": 8, "shuffle": False, "use_bucketing": False},
            "tokenizer": tokenizer,
            **{k: arch[k] for k in ("preprocessor", "spec_augment", "encoder", "transf_encoder", "transf_decoder",
                                    "head", "decoding", "loss")},
            "optim": {"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.98], "weight_decay": 1e-3,
                      "sched": {"name": "InverseSquareRootAnnealing", "warmup_steps": 1000, "warmup_ratio": None,
                                "min_lr": 1e-6}},
        },
        "trainer": {"devices": -1, "num_nodes": 1, "max_epochs": -1, "max_steps": 100000, "val_check_interval": 1000,
                    "accelerator": "auto", "accumulate_grad_batches": 1, "gradient_clip_val": 1.0,
                    "precision": "bf16-mixed", "log_every_n_steps": 100},
        "exp_manager": {"exp_dir": None, "name": "${name}", "resume_if_exists": True,
                        "resume_ignore_no_checkpoint": True},
    }
    # as in NeMo's template: derived from the tokenizer at build time
    cfg["model"]["transf_decoder"]["config_dict"]["vocab_size"] = "None"
    cfg["model"]["head"]["num_classes"] = "None"
    cfg["model"]["loss"]["pad_id"] = None
    if cfg["spl_tokens"] is None:
        del cfg["spl_tokens"]
    if cfg["model"]["spec_augment"] is None:  # the checkpoint had none: NeMo's default masks for training
        cfg["model"]["spec_augment"] = {"_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
                                        "freq_masks": 2, "freq_width": 27, "time_masks": 10, "time_width": 0.05}
    return cfg


def write(model_path: str, out: str | os.PathLike) -> Path:
    import yaml

    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--init-config: the output must be a .yaml file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = build(model_path, out)
    header = (f"# Fine-tuning config for {model_path}, written by `serinus train --init-config` in NeMo's layout\n"
              "# (fast-conformer_aed.yaml). Set the data on the command line, e.g.\n"
              f"#   serinus train --config {out} model.train_ds.manifest_filepath=train.jsonl \\\n"
              "#     model.validation_ds.manifest_filepath=dev.jsonl exp_manager.exp_dir=runs/finetune\n")
    out.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return out
