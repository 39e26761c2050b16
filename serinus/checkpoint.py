"""Checkpoints: NeMo `.nemo` archives, our own safetensors format, and Hugging Face Hub ids.

Canary (AED) models load with `load_model`, CTC models (NeMo's EncDecCTCModelBPE, or a CTC aligner
packed in a canary-1b-v2-style checkpoint) with `load_ctc_model`; `pack_aligner` (and the command
`serinus pack-aligner AED CTC OUT`) packs a CTC model into an AED as its timestamp aligner.

A `.nemo` file is a tar archive (optionally gzipped) holding `model_config.yaml`,
`model_weights.ckpt` (a torch state dict) and tokenizer files referenced from the config
as `nemo:<member name>`. Loading is safe by construction: only regular files and folders
are extracted, never to a path outside the extraction folder, and weights are read with
`torch.load(weights_only=True)`, so no pickled code ever runs.

Loading is lean: the weights are read straight from the archive (never copied to disk), into a
model built on the meta device (no memory, no random init) with `load_state_dict(assign=True)`,
so they are in memory once; `dtype` then converts (bfloat16) or quantises (int8) them. For int8 the
weights of an uncompressed `.nemo` stream in one tensor at a time (`read_weights_lazily`) and each
Linear layer is quantised as soon as it has its weights, so no full float32 copy is ever held.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path, PurePosixPath

from serinus.allocator import keep_freed_memory


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason."""


def _safe_member_path(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or os.path.isabs(member.name):
        raise CheckpointError(f"{archive}: refusing archive member {member.name!r}: absolute path")
    if ".." in name.parts:
        raise CheckpointError(f"{archive}: refusing archive member {member.name!r}: path leaves the archive ('..')")
    if member.issym() or member.islnk():
        raise CheckpointError(
            f"{archive}: refusing archive member {member.name!r}: links are not allowed "
            f"(points to {member.linkname!r})"
        )
    if not (member.isfile() or member.isdir()):
        raise CheckpointError(f"{archive}: refusing archive member {member.name!r}: not a regular file or folder")
    return name


def extract_nemo(path: str | os.PathLike, dest: str | os.PathLike, skip: tuple[str, ...] = ()) -> Path:
    """Extract a `.nemo` archive into `dest` after checking every member; returns `dest`.

    Every member is validated before anything is written, so a bad archive writes nothing.
    Members named in `skip` (e.g. the weights, read with `read_archive_weights`) are checked, not written.
    """
    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .nemo (tar) archive: {e}") from e
    with tar:
        members = tar.getmembers()
        checked = [(m, _safe_member_path(path, m)) for m in members]
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for member, name in checked:
            target = (root / Path(*name.parts)) if name.parts else root
            if root != target.resolve() and root not in target.resolve().parents:
                raise CheckpointError(f"{path}: refusing archive member {member.name!r}: path leaves the archive")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if str(name) in skip:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return dest


# -- reading NeMo archives -------------------------------------------------------------------

CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
ALIGNER_CONFIG_FILE = "timestamps_asr_model_config.yaml"
ALIGNER_WEIGHTS_FILE = "timestamps_asr_model_weights.ckpt"

# NeMo state-dict entries we compute ourselves (the Hann window, the mel filterbank, the
# decoder's sinusoidal table) or that duplicate another tensor (the tied output weight).
DERIVED_KEYS = (
    "preprocessor.featurizer.window",
    "preprocessor.featurizer.fb",
    "transf_decoder._embedding.position_embedding.pos_enc",
    "log_softmax.mlp.layer0.weight",
)

# NeMo decoder names <-> ours, one table for both directions (loading, and NeMo's names for its
# init rules): (NeMo, Serinus) name prefixes, "{n}" a layer number; an entry without a trailing
# "." is a whole name. Inside the decoder's attention, NeMo's sub-module names differ too.
DECODER_NAMES = [
    ("transf_decoder._embedding.token_embedding.", "decoder.token_embedding."),
    ("transf_decoder._embedding.layer_norm.", "decoder.embedding_norm."),
    ("transf_decoder._decoder.final_layer_norm.", "decoder.final_norm."),
    ("transf_decoder._decoder.layers.{n}.layer_norm_1.", "decoder.blocks.{n}.self_attn_norm."),
    ("transf_decoder._decoder.layers.{n}.layer_norm_2.", "decoder.blocks.{n}.cross_attn_norm."),
    ("transf_decoder._decoder.layers.{n}.layer_norm_3.", "decoder.blocks.{n}.mlp_norm."),
    ("transf_decoder._decoder.layers.{n}.first_sub_layer.", "decoder.blocks.{n}.self_attn."),
    ("transf_decoder._decoder.layers.{n}.second_sub_layer.", "decoder.blocks.{n}.cross_attn."),
    ("transf_decoder._decoder.layers.{n}.third_sub_layer.dense_in.", "decoder.blocks.{n}.mlp_in."),
    ("transf_decoder._decoder.layers.{n}.third_sub_layer.dense_out.", "decoder.blocks.{n}.mlp_out."),
    ("log_softmax.mlp.layer0.bias", "decoder.head_bias"),
]
ATTENTION_NAMES = [("query_net", "query"), ("key_net", "key"), ("value_net", "value"), ("out_projection", "out")]


def _rename_rules(to_nemo: bool) -> list[tuple[str, str]]:
    """(regex, replacement) pairs, applied in order: prefixes first, then the attention sub-modules
    (on NeMo's side only under transf_decoder, so no encoder name is touched)."""
    rules = []
    for nemo, ours in DECODER_NAMES:
        src, dst = (ours, nemo) if to_nemo else (nemo, ours)
        pattern = "^" + re.escape(src).replace(re.escape("{n}"), r"(\d+)") + ("" if src.endswith(".") else "$")
        rules.append((pattern, dst.replace("{n}", r"\1")))
    for nemo, ours in ATTENTION_NAMES:
        if to_nemo:
            rules.append((rf"^(transf_decoder\..*_sub_layer)\.{ours}\.", rf"\1.{nemo}."))
        else:
            rules.append((rf"\.{nemo}\.", f".{ours}."))
    return rules


_TO_SERINUS, _TO_NEMO = _rename_rules(False), _rename_rules(True)


def rename(name: str, to_nemo: bool = False) -> str:
    """A NeMo parameter name in Serinus's module names, or (to_nemo) the reverse."""
    for pattern, repl in (_TO_NEMO if to_nemo else _TO_SERINUS):
        name = re.sub(pattern, repl, name)
    return name


def _state_dict_of(state, where: str) -> dict:
    """The state dict a loaded checkpoint holds (Lightning nests it under "state_dict")."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected a state dict, found {type(state).__name__}")
    return state


def read_weights(path, where: str | None = None) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never pickled code.
    `path`: a file path (memory-mapped) or an open binary file; `where` names it in errors."""
    import pickle

    import torch

    import zipfile

    where = where or Path(path).name
    try:
        if isinstance(path, (str, os.PathLike)) and zipfile.is_zipfile(path):  # memory-mapped, read on use
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{where}: refusing to load weights that carry pickled objects other than tensors "
            f"(weights_only=True): {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{where}: not a readable torch weights file: {e}") from e
    return _state_dict_of(state, where)


def read_archive_weights(path: Path, name: str) -> dict:
    """The weights member `name` of a .nemo, read straight from the archive, tensor by tensor (no
    copy on disk, one copy in memory). A gzipped archive cannot be read in place and is buffered."""
    import io

    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError:  # compressed: decompress the member once into memory
        tar = tarfile.open(path, mode="r:*")
        with tar:
            return read_weights(io.BytesIO(_archive_member(tar, path, name).read()), name)
    with tar:
        return read_weights(_archive_member(tar, path, name), name)


class LazyTensor:
    """A tensor of a torch checkpoint that is not read yet: its shape and dtype, and `load()` to read it.
    A model can then take its weights one at a time (and quantise each at once) instead of holding
    every float32 weight at the same moment."""

    def __init__(self, reader, key: str, meta):
        self.reader, self.key, self.meta = reader, key, meta

    @property
    def shape(self):
        return self.meta.shape

    @property
    def dtype(self):
        return self.meta.dtype

    def load(self):
        import torch

        raw = bytearray(self.reader.get_record(f"data/{self.key}"))
        base = torch.frombuffer(raw, dtype=self.meta.dtype) if raw else torch.empty(0, dtype=self.meta.dtype)
        t = base.as_strided(self.meta.shape, self.meta.stride(), self.meta.storage_offset())
        return t if t.numel() == base.numel() and t.is_contiguous() else t.clone()


def real(value):
    """A tensor, reading a LazyTensor."""
    return value.load() if isinstance(value, LazyTensor) else value


def read_weights_lazily(fileobj, where: str) -> dict:
    """A torch zip checkpoint's state dict as {name: LazyTensor}, through torch's weights-only
    unpickler (tensors and plain containers only), with each tensor's bytes left in the file."""
    import pickle

    import torch
    import torch._weights_only_unpickler as restricted

    try:
        reader = torch._C.PyTorchFileReader(fileobj)
        if reader.has_record("byteorder") and reader.get_record("byteorder").decode() != "little":
            raise CheckpointError(f"{where}: big-endian weights are not supported")
        storages = {}

        def persistent_load(saved_id):
            _, storage_type, key, _location, numel = saved_id
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            meta = torch.UntypedStorage(int(numel) * torch.empty(0, dtype=dtype).element_size(), device="meta")
            storages[meta._cdata] = (key, meta)
            return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

        import io

        unpickler = restricted.Unpickler(io.BytesIO(reader.get_record("data.pkl")), encoding="utf-8")
        unpickler.persistent_load = persistent_load
        state = unpickler.load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refusing to load weights that carry pickled objects other than tensors: "
                              f"{str(e).splitlines()[0]}") from e
    except Exception as e:
        raise CheckpointError(f"{where}: not a readable torch weights file: {e}") from e
    state = _state_dict_of(state, where)
    out = {}
    for name, t in state.items():
        if isinstance(t, torch.Tensor):
            key, _ = storages[t.untyped_storage()._cdata]
            out[name] = LazyTensor(reader, key, t)
        else:
            out[name] = t
    return out


def read_archive_weights_lazily(path: Path, name: str) -> dict:
    """As read_archive_weights, but {name: LazyTensor}; an uncompressed archive only (else: None)."""
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError:
        return None
    member = _archive_member(tar, path, name)  # the tar stays open while the tensors are read
    return read_weights_lazily(member, name)


def _archive_member(tar: tarfile.TarFile, path: Path, name: str):
    for member in tar.getmembers():
        if member.isfile() and str(_safe_member_path(path, member)) == name:
            return tar.extractfile(member)
    raise CheckpointError(f"{path}: no {name} in the archive")


def nemo_to_serinus_state_dict(state: dict) -> dict:
    """Rename a NeMo EncDecMultiTaskModel state dict to our module names; drop derived tensors."""
    tied, embedding = state.get("log_softmax.mlp.layer0.weight"), state.get(
        "transf_decoder._embedding.token_embedding.weight"
    )
    if tied is not None and embedding is not None and not bool((real(tied) == real(embedding)).all()):
        raise CheckpointError("the output head weight is not tied to the token embedding; this model is not supported")
    return {rename(key): value for key, value in state.items() if key not in DERIVED_KEYS}


def ctc_to_serinus_state_dict(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("preprocessor.featurizer."):
            continue
        out[key.replace("decoder.decoder_layers.0.", "head.")] = value
    return out


def check_state(module, state: dict, where: str) -> None:
    """An error naming every missing or unexpected key, or a wrong shape, of `state` for `module`
    (values: tensors, or anything with a `.shape`, such as a LazyTensor)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError(f"{where}: weights do not match the model built from its config; " + "; ".join(parts))
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{where}: weight {key} has shape {tuple(value.shape)}, the config implies {tuple(expected[key].shape)}"
            )


def _shared_parameters(module) -> list[list[str]]:
    """Names of parameters one module object shares between names (e.g. untie_biases=False position biases)."""
    shared = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    return [names for names in shared.values() if len(names) > 1]


def _retie(module, shared: list[list[str]]) -> None:
    """Make every name of each group point at its first parameter again (assign replaced them)."""
    for names in shared:
        first = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, first)


def _on_cpu(device) -> bool:
    import torch

    return torch.device(device).type == "cpu"


def load_state(module, state: dict, where: str, assign: bool = False) -> None:
    """load_state_dict(strict) with an error naming every missing or unexpected key. `assign`: the
    module takes the given tensors as its own (no copy; for a module built on the meta device)."""
    import torch

    check_state(module, state, where)
    if not assign:
        with torch.no_grad():
            module.load_state_dict(state, strict=True)
        return
    shared = _shared_parameters(module)
    module.load_state_dict(state, strict=True, assign=True)
    _retie(module, shared)


def build_loaded(make, state: dict, where: str, dtype: str = "float32", pack: bool = False):
    """`make()` built on the meta device, then given `state` as its weights (assign: no copy, no random
    init; the derived buffers, filterbank and position tables, are made on the CPU even there); then `dtype`;
    then, with `pack`, its Linear layers packed for CPU inference (serinus.precision)."""
    import torch

    from serinus.precision import PackedLinear, pack_linear_layers, quantize_linear_int8, set_dtype

    with torch.device("meta"):
        model = make()
    lazy = any(isinstance(v, LazyTensor) for v in state.values())
    if lazy and dtype == "int8":
        _load_streaming(model, state, where, quantize_linear_int8)
    elif lazy and pack:
        to_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        _load_streaming(model, state, where, lambda linear: PackedLinear(linear.to(to_dtype)))
    else:
        load_state(model, {k: real(v) for k, v in state.items()}, where, assign=True)
    del state
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {', '.join(left[:5])} neither loaded nor computed")
    model = set_dtype(model.eval(), dtype)
    return pack_linear_layers(model) if pack else model


def _load_streaming(model, state: dict, where: str, convert) -> None:
    """Give a meta-device `model` its weights module by module, replacing each Linear layer by
    `convert(layer)` (int8-quantised, or packed for the CPU) as soon as it holds its float32 weights:
    only one float32 weight matrix is in memory at a time, so loading peaks near the converted
    model's size, not at the float32 model plus its converted copy."""
    from torch import nn

    check_state(model, state, where)
    shared = _shared_parameters(model)
    for name in [n for n, _ in model.named_modules()]:  # names only: a list of modules would keep
        module = model.get_submodule(name)              # every float32 Linear alive to the end
        prefix = name + "." if name else ""
        own = {k: real(state[prefix + k]) for k in list(module._parameters) + list(module._buffers)
               if prefix + k in state}
        if own:
            module.load_state_dict(own, strict=False, assign=True)
        if type(module) is nn.Linear and name:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, convert(module))
        del module, own
    _retie(model, shared)


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
    if _on_cpu(device):
        keep_freed_memory()
    kind, path = _resolve(path_or_id)
    load = load_own if kind == "own" else load_nemo
    return load(path, device, dtype, pack=not for_training)


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
