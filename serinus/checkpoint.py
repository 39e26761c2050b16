"""Checkpoints: NeMo `.nemo` archives, our own safetensors format, and Hugging Face Hub ids.

Canary (AED) models load with `load_model`, CTC models (NeMo's EncDecCTCModelBPE, or a CTC aligner
packed in a canary-1b-v2-style checkpoint) with `load_ctc_model`; `pack_aligner` (and the command
`serinus pack-aligner AED CTC OUT`) packs a CTC model into an AED as its timestamp aligner.
Reading archives and weight files, and putting weights into a model, is `serinus.weights`;
`dtype` then converts (bfloat16) or quantises (int8) the loaded model (`serinus.precision`).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath

from serinus.allocator import keep_freed_memory, returning_freed_memory
from serinus.weights import (ALIGNER_CONFIG_FILE, ALIGNER_WEIGHTS_FILE, CONFIG_FILE, WEIGHTS_FILE,
                             CheckpointError, build_loaded, ctc_to_serinus_state_dict, extract_nemo,
                             load_state, nemo_to_serinus_state_dict, read_archive_weights,
                             read_archive_weights_lazily, read_weights)


def _on_cpu(device) -> bool:
    import torch

    return torch.device(device).type == "cpu"


def _extract_small_members(path: Path, dest: str) -> tuple[Path, set[str]]:
    """Extract the config and tokenizer files (not the weights); returns the folder and every member name."""
    root = extract_nemo(path, dest, skip=(WEIGHTS_FILE, ALIGNER_WEIGHTS_FILE))
    with tarfile.open(path, mode="r:*") as tar:
        names = {str(PurePosixPath(m.name)) for m in tar.getmembers() if m.isfile()}
    if CONFIG_FILE not in names or WEIGHTS_FILE not in names:
        raise CheckpointError(f"{path}: not a NeMo model archive (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return root, names


def load_nemo(path: str | os.PathLike, device="cpu", dtype: str = "float32", pack: bool = False):
    """Load a NeMo `.nemo` Canary checkpoint (and its packed CTC aligner, if any); `pack`: its Linear
    layers packed for CPU inference (on a CPU only)."""
    import tempfile

    import yaml

    from serinus.model.canary import CanaryConfig, CanaryModel
    from serinus.model.ctc import CTCConfig
    from serinus.precision import check_dtype
    from serinus.tokenizer import load_tokenizer, nemo_resolver

    path = Path(path)
    check_dtype(dtype, device)
    with tempfile.TemporaryDirectory(prefix="serinus-nemo-") as tmp:
        root, names = _extract_small_members(path, tmp)
        cfg = yaml.safe_load((root / CONFIG_FILE).read_text())
        target = str(cfg.get("target", ""))
        if target and not target.endswith("EncDecMultiTaskModel"):
            raise CheckpointError(f"{path}: model class {target} is not a Canary (EncDecMultiTaskModel) model")
        try:
            tokenizer = load_tokenizer(cfg["tokenizer"], nemo_resolver(root))
        except (KeyError, ValueError, OSError) as e:
            raise CheckpointError(f"{path}: cannot load the tokenizer: {e}") from e
        try:
            config = CanaryConfig.from_nemo(cfg, tokenizer.vocab_size)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: unsupported model config: {e}") from e
        has_aligner = ALIGNER_CONFIG_FILE in names and ALIGNER_WEIGHTS_FILE in names
        aligner_tokenizer = None
        if has_aligner and cfg.get("restore_timestamps_model", True):
            aligner_cfg = yaml.safe_load((root / ALIGNER_CONFIG_FILE).read_text())
            try:
                config.aligner = CTCConfig.from_nemo(aligner_cfg)
                aligner_tokenizer = load_tokenizer(aligner_cfg["tokenizer"], nemo_resolver(root))
            except (KeyError, ValueError, OSError) as e:
                raise CheckpointError(f"{path}: cannot load the packed CTC aligner ({ALIGNER_CONFIG_FILE}): {e}") from e
    # int8 and packing stream the weights and convert them as they arrive (an uncompressed archive only)
    pack = pack and _on_cpu(device)
    weights = read_archive_weights_lazily(path, WEIGHTS_FILE) if dtype == "int8" or pack else None
    if weights is None:
        weights = read_archive_weights(path, WEIGHTS_FILE)
    state = nemo_to_serinus_state_dict(weights)
    if config.aligner is not None:
        aligner_state = ctc_to_serinus_state_dict(read_archive_weights(path, ALIGNER_WEIGHTS_FILE))
        state.update({f"aligner.{k}": v for k, v in aligner_state.items()})
    model = build_loaded(lambda: CanaryModel(config, tokenizer, aligner_tokenizer), state, str(path), dtype, pack)
    return model.to(device)


# -- our own format ---------------------------------------------------------------------------

OWN_CONFIG = "config.json"
OWN_WEIGHTS = "model.safetensors"


def _read_own_config(root: Path) -> dict:
    import json

    config = json.loads((root / OWN_CONFIG).read_text())
    if config.get("format") != "serinus":
        raise CheckpointError(f"{root / OWN_CONFIG}: not a Serinus model config")
    return config


def save_model(model, out_dir: str | os.PathLike) -> Path:
    """Write `config.json` (model config + tokenizer config) and `model.safetensors` to `out_dir`."""
    import json

    from safetensors.torch import save_file

    from serinus.precision import model_dtype

    if model_dtype(model) == "int8":
        raise CheckpointError("save_model: an int8 (quantised) model is not saved; save the float32 model and "
                              "load it with dtype='int8'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_cfg = model.tokenizer.save(out / "tokenizer")
    config = {"format": "serinus", "version": 1, "model_type": "aed", "model": model.cfg.to_dict(),
              "tokenizer": tokenizer_cfg}
    if model.aligner_tokenizer is not None:
        config["aligner_tokenizer"] = model.aligner_tokenizer.save(out / "aligner_tokenizer")
    (out / OWN_CONFIG).write_text(json.dumps(config, indent=2))
    # clone: tied or shared parameters (e.g. shared position biases) are stored once per name
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / OWN_WEIGHTS))
    return out


def load_own(path: str | os.PathLike, device="cpu", dtype: str = "float32", pack: bool = False):
    from safetensors.torch import load_file

    from serinus.model.canary import CanaryConfig, CanaryModel
    from serinus.precision import check_dtype
    from serinus.tokenizer import load_tokenizer

    check_dtype(dtype, device)
    root = Path(path)
    config = _read_own_config(root)
    if config.get("model_type", "aed") != "aed":
        raise CheckpointError(f"{root}: a Serinus {config['model_type']!r} model, not a Canary (AED) model; "
                              "load a CTC model with serinus.checkpoint.load_ctc_model")
    tokenizer = load_tokenizer(config["tokenizer"], lambda p: root / "tokenizer" / p)
    aligner_tokenizer = None
    if "aligner_tokenizer" in config:
        aligner_tokenizer = load_tokenizer(config["aligner_tokenizer"], lambda p: root / "aligner_tokenizer" / p)
    cfg = CanaryConfig.from_dict(config["model"])
    model = build_loaded(lambda: CanaryModel(cfg, tokenizer, aligner_tokenizer), load_file(str(root / OWN_WEIGHTS)),
                         str(root), dtype, pack and _on_cpu(device))
    return model.to(device)


# -- resolving what the user named ------------------------------------------------------------

KNOWN_HUB_MODELS = ("nvidia/canary-1b-v2", "nvidia/canary-1b-flash", "nvidia/canary-180m-flash", "nvidia/canary-1b")


def resolve_hub_id(repo_id: str) -> Path:
    """Download (or find in the Hugging Face cache) the `.nemo` file of a Hub model repo.
    Honours HF_HUB_OFFLINE / HF_HOME / HF_HUB_CACHE as huggingface_hub does."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.nemo"]))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and it cannot be downloaded now "
            f"(offline or no network). Use a local checkpoint instead (--model path/to/model.nemo, or a "
            f"folder written by save_pretrained), or download it once on a machine with network and set "
            f"HF_HUB_OFFLINE=1 to use the cached copy. ({type(e).__name__})"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: could not fetch from the Hugging Face Hub: {e}") from e
    found = sorted(folder.glob("*.nemo"))
    if not found:
        raise CheckpointError(f"{repo_id}: the Hub repository has no .nemo file")
    return found[0]


def _resolve(path_or_id: str | os.PathLike) -> tuple[str, Path]:
    """("own", folder) for a Serinus folder, ("nemo", file) for a .nemo file, a folder holding exactly
    one, or a Hub id."""
    path = Path(path_or_id)
    if path.is_dir():
        if (path / OWN_CONFIG).is_file():
            return "own", path
        nemo_files = sorted(path.glob("*.nemo"))
        if len(nemo_files) == 1:
            return "nemo", nemo_files[0]
        raise CheckpointError(f"{path}: a folder with neither {OWN_CONFIG} nor exactly one .nemo file")
    if path.is_file():
        return "nemo", path
    name = str(path_or_id)
    if name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith(".nemo"):
        return "nemo", resolve_hub_id(name)
    raise CheckpointError(f"{name}: no such checkpoint file or folder, and not a Hub id such as {KNOWN_HUB_MODELS[0]}")


def load_model(path_or_id: str | os.PathLike, device="cpu", dtype: str = "float32", for_training: bool = False):
    """A `.nemo` file, a Serinus folder (config.json + model.safetensors), or a Hub id. `dtype`:
    "float32", "bfloat16" (weights and compute) or "int8" (dynamically quantised Linear layers).
    On a CPU the Linear layers are packed for inference (frozen; serinus.precision) unless
    `for_training`: then they stay plain nn.Linear layers, to train. On a CPU, freed memory is kept
    for reuse from then on (serinus.allocator)."""
    kind, path = _resolve(path_or_id)
    load = load_own if kind == "own" else load_nemo
    with returning_freed_memory():  # the float32 buffers of streamed weights go back for good
        model = load(path, device, dtype, pack=not for_training)
    if _on_cpu(device):
        keep_freed_memory()
    return model


# -- CTC models -------------------------------------------------------------------------------

CTC_TARGET = "EncDecCTCModelBPE"


def _check_ctc_vocab(cfg, tokenizer, where: str) -> None:
    if tokenizer is not None and tokenizer.vocab_size != cfg.num_classes:
        raise CheckpointError(f"{where}: the CTC model has {cfg.num_classes} classes (+ blank) but its tokenizer "
                              f"has {tokenizer.vocab_size} entries")


def _ctc_from_nemo_files(root: Path, config_file: str, weights_file: str, where: str):
    """A CTCModel (with .tokenizer) from an extracted .nemo: its yaml config and weights file."""
    import yaml

    from serinus.model.ctc import CTCConfig, CTCModel
    from serinus.tokenizer import load_tokenizer, nemo_resolver

    cfg = yaml.safe_load((root / config_file).read_text())
    target = str(cfg.get("target", ""))
    if target and not target.endswith(CTC_TARGET):
        raise CheckpointError(f"{where}: model class {target} is not a CTC model with a SentencePiece tokenizer "
                              f"({CTC_TARGET})")
    try:
        config = CTCConfig.from_nemo(cfg)
        tokenizer = load_tokenizer(cfg["tokenizer"], nemo_resolver(root))
    except (KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{where}: unsupported CTC model config or tokenizer ({config_file}): {e}") from e
    _check_ctc_vocab(config, tokenizer, where)
    model = CTCModel(config, tokenizer)
    load_state(model, ctc_to_serinus_state_dict(read_weights(root / weights_file)), where)
    return model


def _load_ctc_nemo(path: Path):
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="serinus-nemo-") as tmp:
        root = extract_nemo(path, tmp)
        if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{path}: not a NeMo model archive (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        target = str(yaml.safe_load((root / CONFIG_FILE).read_text()).get("target", ""))
        if target.endswith("EncDecMultiTaskModel"):  # a canary-1b-v2-style checkpoint: take its packed aligner
            if not ((root / ALIGNER_CONFIG_FILE).is_file() and (root / ALIGNER_WEIGHTS_FILE).is_file()):
                raise CheckpointError(f"{path}: a Canary checkpoint without a packed CTC aligner, not a CTC model")
            return _ctc_from_nemo_files(root, ALIGNER_CONFIG_FILE, ALIGNER_WEIGHTS_FILE, f"{path} (packed aligner)")
        return _ctc_from_nemo_files(root, CONFIG_FILE, WEIGHTS_FILE, str(path))


def save_ctc_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write a CTC model in our format: `config.json` (`"model_type": "ctc"`, model and tokenizer
    config), `model.safetensors` and `tokenizer/`. `tokenizer` None means `model.tokenizer`."""
    import json

    from safetensors.torch import save_file

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise CheckpointError("save_ctc_model: the CTC model needs a tokenizer (none given, model.tokenizer is None)")
    _check_ctc_vocab(model.cfg, tokenizer, "save_ctc_model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": "serinus", "version": 1, "model_type": "ctc", "model": model.cfg.to_dict(),
              "tokenizer": tokenizer.save(out / "tokenizer")}
    (out / OWN_CONFIG).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / OWN_WEIGHTS))
    return out


def load_ctc_model(path_or_id: str | os.PathLike, device="cpu", for_training: bool = False):
    """A CTCModel with `.tokenizer`, in eval mode, from: a folder written by `save_ctc_model`; a NeMo
    EncDecCTCModelBPE `.nemo` (or Hub id); or a Canary checkpoint with a packed aligner (its aligner).
    `for_training` as for `load_model`."""
    from safetensors.torch import load_file

    from serinus.model.ctc import CTCConfig, CTCModel
    from serinus.precision import pack_linear_layers
    from serinus.tokenizer import load_tokenizer

    kind, path = _resolve(path_or_id)
    if kind == "nemo":
        model = _load_ctc_nemo(path)
    else:
        config = _read_own_config(path)
        if config.get("model_type", "aed") != "ctc":
            aed = load_own(path)
            if aed.aligner is None:
                raise CheckpointError(f"{path}: a Canary (AED) model without a packed CTC aligner, not a CTC model")
            model = aed.aligner
        else:
            cfg = CTCConfig.from_dict(config["model"])
            tokenizer = load_tokenizer(config["tokenizer"], lambda p: path / "tokenizer" / p)
            _check_ctc_vocab(cfg, tokenizer, str(path))
            model = CTCModel(cfg, tokenizer)
            load_state(model, load_file(str(path / OWN_WEIGHTS)), str(path))
    model = model.to(device).eval()
    return model if for_training else pack_linear_layers(model)


# -- either model type (training: init, checkpoints, resume) -----------------------------------

def model_type(path_or_id: str | os.PathLike) -> str:
    """"ctc" for a Serinus CTC folder or a NeMo EncDecCTCModelBPE .nemo, else "aed"."""
    kind, path = _resolve(path_or_id)
    if kind == "own":
        return _read_own_config(path).get("model_type", "aed")
    return "ctc" if _nemo_target(path).endswith(CTC_TARGET) else "aed"


def _nemo_target(path: Path) -> str:
    import yaml

    with tarfile.open(path, mode="r:*") as tar:
        for member in tar.getmembers():
            if PurePosixPath(member.name).name == CONFIG_FILE and member.isfile():
                return str((yaml.safe_load(tar.extractfile(member).read()) or {}).get("target", ""))
    return ""


def load_any(path_or_id: str | os.PathLike, device="cpu", for_training: bool = True):
    """A CanaryModel or a CTCModel, whichever the checkpoint holds (plain, trainable layers by default)."""
    load = load_ctc_model if model_type(path_or_id) == "ctc" else load_model
    return load(path_or_id, device, for_training=for_training)


def save_any(model, out_dir: str | os.PathLike) -> Path:
    """`save_model` for a CanaryModel, `save_ctc_model` for a CTCModel."""
    from serinus.model.ctc import CTCModel

    if isinstance(model, CTCModel):
        return save_ctc_model(model, model.tokenizer, out_dir)
    return save_model(model, out_dir)


def read_own_weights(folder: str | os.PathLike) -> dict:
    """The state dict of a Serinus model folder (either type), e.g. a training checkpoint's."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / OWN_WEIGHTS))


# -- packing a CTC aligner into a Canary model ------------------------------------------------

def pack_aligner(aed_model, ctc_model):
    """Make `ctc_model` the timestamp aligner of `aed_model` (as canary-1b-v2 packs one), in place.

    Sets `aed_model.cfg.aligner` (a new config object), `.aligner` (a copy of the CTC weights, on the
    AED's device) and `.aligner_tokenizer` (the CTC model's tokenizer); returns `aed_model`. Saved with
    `save_pretrained`, it reloads with the aligner, and `transcribe(timestamps=True)` then aligns the
    AED's text with it (Viterbi) instead of asking for timestamp tokens."""
    import dataclasses

    from serinus.model.ctc import CTCModel

    tokenizer = getattr(ctc_model, "tokenizer", None)
    if tokenizer is None:
        raise CheckpointError("pack_aligner: the CTC model has no tokenizer (ctc_model.tokenizer is None)")
    _check_ctc_vocab(ctc_model.cfg, tokenizer, "pack_aligner")
    cfg = dataclasses.replace(ctc_model.cfg)
    aligner = CTCModel(cfg, tokenizer)
    load_state(aligner, ctc_model.state_dict(), "pack_aligner")
    param = next(aed_model.parameters())
    aed_model.cfg = dataclasses.replace(aed_model.cfg, aligner=cfg)
    aed_model.aligner = aligner.to(device=param.device).train(aed_model.training)
    aed_model.aligner_tokenizer = tokenizer
    return aed_model


def main(argv: list[str] | None = None) -> int:
    """`serinus pack-aligner AED_MODEL CTC_MODEL OUT`."""
    import argparse

    p = argparse.ArgumentParser(
        prog="serinus pack-aligner",
        description="Pack a CTC model into a Canary checkpoint as its timestamp aligner (as canary-1b-v2 "
                    "packs one) and write a Serinus model folder. transcribe(timestamps=True) on the result "
                    "force-aligns the AED's text with the CTC model.")
    p.add_argument("aed_model", help="Canary model: .nemo file, Serinus folder or Hub id")
    p.add_argument("ctc_model", help="CTC model: Serinus CTC folder, NeMo EncDecCTCModelBPE .nemo, or a "
                                     "checkpoint with a packed aligner (its aligner is taken)")
    p.add_argument("out", help="output folder (config.json + model.safetensors + tokenizers)")
    args = p.parse_args(argv)
    import sys

    try:
        aed = load_model(args.aed_model)
        ctc = load_ctc_model(args.ctc_model)
        if aed.aligner is not None:
            print(f"serinus pack-aligner: replacing the aligner already packed in {args.aed_model}", file=sys.stderr)
        save_model(pack_aligner(aed, ctc), args.out)
    except CheckpointError as e:
        print(f"serinus pack-aligner: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {args.aed_model} with the CTC aligner {args.ctc_model} "
          f"({ctc.cfg.encoder.n_layers}x{ctc.cfg.encoder.d_model}, vocabulary {ctc.cfg.num_classes})")
    return 0
