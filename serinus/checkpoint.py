"""Checkpoints: NeMo `.nemo` archives, our own safetensors format, and Hugging Face Hub ids.

A `.nemo` file is a tar archive (optionally gzipped) holding `model_config.yaml`,
`model_weights.ckpt` (a torch state dict) and tokenizer files referenced from the config
as `nemo:<member name>`. Loading is safe by construction: only regular files and folders
are extracted, never to a path outside the extraction folder, and weights are read with
`torch.load(weights_only=True)`, so no pickled code ever runs.
"""

from __future__ import annotations

import os
import tarfile
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


def extract_nemo(path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a `.nemo` archive into `dest` after checking every member; returns `dest`.

    Every member is validated before anything is written, so a bad archive writes nothing.
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
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return dest
