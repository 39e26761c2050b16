"""Weights: reading them from NeMo archives and torch state dicts, and putting them into a model.

A `.nemo` file is a tar archive (optionally gzipped) holding `model_config.yaml`,
`model_weights.ckpt` (a torch state dict) and tokenizer files referenced from the config
as `nemo:<member name>`. Reading is safe by construction: only regular files and folders
are extracted, never to a path outside the extraction folder, and weights are read with
`torch.load(weights_only=True)`, so no pickled code ever runs.

Loading is lean: the weights are read straight from the archive (never copied to disk), into a
model built on the meta device (no memory, no random init) with `load_state_dict(assign=True)`,
so they are in memory once. For int8 the weights of an uncompressed `.nemo` stream in one tensor at
a time (`read_weights_lazily`) and each Linear layer is quantised as soon as it has its weights, so
no full float32 copy is ever held. NeMo's parameter names become ours by `rename`'s rules.
"""

from __future__ import annotations

import collections
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath


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


# -- NeMo's archive members and parameter names ---------------------------------------------

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
    every float32 weight at the same moment. With `source` (an open file and the offset of the
    checkpoint's zip in it) the bytes are read straight into the tensor: one copy from the page cache,
    not three (torch's record reader, Python's tar reader, a writable bytearray)."""

    def __init__(self, reader, key: str, meta, source=None):
        self.reader, self.key, self.meta, self.source = reader, key, meta, source

    @property
    def shape(self):
        return self.meta.shape

    @property
    def dtype(self):
        return self.meta.dtype

    def load(self):
        import torch

        record = f"data/{self.key}"
        raw = self._read_direct(record) if self.source is not None else None
        if raw is None:
            raw = bytearray(self.reader.get_record(record))
        base = torch.frombuffer(raw, dtype=self.meta.dtype) if len(raw) else torch.empty(0, dtype=self.meta.dtype)
        t = base.as_strided(self.meta.shape, self.meta.stride(), self.meta.storage_offset())
        return t if t.numel() == base.numel() and t.is_contiguous() else t.clone()

    def _read_direct(self, record: str):
        """The record's bytes as a uint8 tensor's numpy view, read at its offset; None where the zip
        entry is not stored as it is (compressed), for the reader to decode instead."""
        import torch

        file, zip_offset = self.source
        header_offset = zip_offset + self.reader.get_record_header_offset(record)
        header = os.pread(file.fileno(), 30, header_offset)  # the zip entry's local header
        if header[:4] != b"PK\x03\x04" or int.from_bytes(header[8:10], "little") != 0:  # 0: stored
            return None
        # the data follow the header, its file name and its extra field (lengths at bytes 26 and 28)
        offset = header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
        buf = torch.empty(self.reader.get_record_size(record), dtype=torch.uint8).numpy()
        view = memoryview(buf)
        while view.nbytes:
            n = os.preadv(file.fileno(), [view], offset)
            if n <= 0:
                raise CheckpointError(f"{file.name}: the archive ends inside the weights ({record})")
            view, offset = view[n:], offset + n
        return buf


def real(value):
    """A tensor, reading a LazyTensor."""
    return value.load() if isinstance(value, LazyTensor) else value


def as_built(value):
    """A weight as a model is built to take it: read (a LazyTensor), and in float32 where a checkpoint
    stored it in another float type (a model saved in bfloat16 or float16); `dtype` is applied after loading."""
    import torch

    tensor = real(value)
    return tensor.float() if tensor.is_floating_point() and tensor.dtype != torch.float32 else tensor


def read_weights_lazily(fileobj, where: str, source=None) -> dict:
    """A torch zip checkpoint's state dict as {name: LazyTensor}, through torch's weights-only
    unpickler (tensors and plain containers only), with each tensor's bytes left in the file.
    `source`: (an open file, the offset of the zip in it), for LazyTensor's direct reads."""
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
            out[name] = LazyTensor(reader, key, t, source)
        else:
            out[name] = t
    return out


def read_archive_weights_lazily(path: Path, name: str) -> dict:
    """As read_archive_weights, but {name: LazyTensor}; an uncompressed archive only (else: None)."""
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError:
        return None
    info = _archive_info(tar, path, name)
    member = tar.extractfile(info)  # the tar stays open while the tensors are read
    # the member's bytes lie in the file as they are (not a sparse member): read tensors there directly
    direct = open(path, "rb", buffering=0) if hasattr(os, "preadv") and info.sparse is None else None
    return read_weights_lazily(member, name, (direct, info.offset_data) if direct else None)


def _archive_info(tar: tarfile.TarFile, path: Path, name: str) -> tarfile.TarInfo:
    for member in tar.getmembers():
        if member.isfile() and str(_safe_member_path(path, member)) == name:
            return member
    raise CheckpointError(f"{path}: no {name} in the archive")


def _archive_member(tar: tarfile.TarFile, path: Path, name: str):
    return tar.extractfile(_archive_info(tar, path, name))


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
    from torch import nn

    from serinus.precision import PackedLinear, int8_layer, pack_linear_layers, set_dtype

    with torch.device("meta"):
        model = make()
    lazy = any(isinstance(v, LazyTensor) for v in state.values())
    if lazy and dtype == "int8":
        _load_streaming(model, state, where, int8_layer)
    elif lazy and pack:
        to_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        _load_streaming(model, state, where,
                        lambda parent, name, module: PackedLinear(module.to(to_dtype)) if type(module) is nn.Linear else None)
    else:
        load_state(model, {k: as_built(v) for k, v in state.items()}, where, assign=True)
    del state
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {', '.join(left[:5])} neither loaded nor computed")
    model = set_dtype(model.eval(), dtype)
    return pack_linear_layers(model) if pack else model


CONVERTING_AT_ONCE = 2  # modules converted in threads while the next weights are read


def _load_streaming(model, state: dict, where: str, convert) -> None:
    """Give a meta-device `model` its weights module by module, replacing a module by
    `convert(parent, name, module)` where that gives one (a Linear layer int8-quantised, or packed for
    the CPU) as soon as it holds its float32 weights. Conversions run in two threads while the next
    weights are read (torch's quantising and packing release the GIL: the 180m-flash architecture loads
    in int8 in 2.1 s against 2.6 s one at a time; float32 packing gains nothing measurable), and at most
    a few float32 weight matrices are in memory at a time, so loading peaks near the converted model's
    size, not at the float32 model plus its converted copy."""
    check_state(model, state, where)
    shared = _shared_parameters(model)
    pending: collections.deque = collections.deque()  # (parent, attribute, future of the converted module)

    def install(parent, attr, future) -> None:
        converted = future.result()
        if converted is not None:
            setattr(parent, attr, converted)

    with ThreadPoolExecutor(max_workers=CONVERTING_AT_ONCE) as pool:
        for name in [n for n, _ in model.named_modules()]:  # names only: a list of modules would keep
            module = model.get_submodule(name)              # every float32 Linear alive to the end
            prefix = name + "." if name else ""
            own = {k: as_built(state[prefix + k]) for k in list(module._parameters) + list(module._buffers)
                   if prefix + k in state}
            if own:
                module.load_state_dict(own, strict=False, assign=True)
            if name:
                owner, _, attr = name.rpartition(".")
                parent = model.get_submodule(owner) if owner else model
                pending.append((parent, attr, pool.submit(convert, parent, attr, module)))
                while len(pending) > CONVERTING_AT_ONCE:
                    install(*pending.popleft())
                del parent
            del module, own
        while pending:
            install(*pending.popleft())
    _retie(model, shared)
