"""Inputs: what transcribe() was given, as items in input order, each probed for its length.

Paths, folders (searched recursively), globs, NeMo manifests (read with serinus.data.manifest)
and arrays become `Item`s. A bad input becomes an item whose `error` says what is wrong, naming
the file (and manifest line); the others go on.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile
import torch

from serinus.audio import SAMPLE_RATE, AudioError, load_audio, validate_audio
from serinus.data.manifest import ManifestError, parse_line

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".webm",
                    ".mp4", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64", ".sph")


@dataclass(frozen=True, eq=False)
class Item:
    """One input: a file (or a span of one, from a manifest's offset/duration) or an array."""

    index: int
    name: str  # what messages call it: the file path, or "<array 3>"
    path: Path | None = None
    samples: np.ndarray | None = None
    slots: dict = field(default_factory=dict)  # prompt slots: the manifest line's, then resolved
    entry: dict | None = None  # the manifest line, as read
    where: str | None = None  # "manifest.jsonl:12" for manifest entries
    prompt: list[int] | None = None
    error: str | None = None
    offset: int = 0  # first sample (16 kHz) of the item in its file
    num_samples: int | None = None  # 16 kHz samples, from the file header (or the array)

    @property
    def label(self) -> str:
        """The item as error messages name it: file, and manifest line when there is one."""
        return f"{self.name} ({self.where})" if self.where else self.name

    @property
    def duration(self) -> float:
        return (self.num_samples or 0) / SAMPLE_RATE

    @property
    def is_span(self) -> bool:
        """A manifest line's span of its file (the line gives an offset, 0 included), not the whole file."""
        return self.entry is not None and self.entry.get("offset") is not None

    @property
    def transcribes(self) -> bool:
        """Whether its output is what is said (source language = target language), not a translation:
        only then may a CTC head, which spells the audio, score the decoder's hypotheses."""
        source, target = self.slots.get("source_lang"), self.slots.get("target_lang")
        return source is None or target is None or source == target

    @property
    def frame_tokens(self) -> bool:
        """Whether its prompt asks a flash-style decoder for frame tokens (`timestamp=yes`)."""
        return self.slots.get("timestamp") == "yes"


def is_manifest(path: str | os.PathLike) -> bool:
    return str(path).endswith((".json", ".jsonl"))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def find_audio_files(folder: Path) -> list[Path]:
    """Audio files under `folder` (recursive), by extension, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def read_manifest_items(path: str | os.PathLike, start_index: int = 0) -> list[Item]:
    """Items of a NeMo JSONL manifest; a bad line becomes an item with an error naming file:line.

    Relative `audio_filepath`s are resolved against the manifest's folder (as NeMo does);
    `offset` (with `duration`) selects a span of the file. `duration` and `text` may be left out.
    """
    path = Path(path)
    if not path.is_file():
        return [Item(start_index, str(path), error=f"{path}: manifest not found")]
    base_dir = Path(os.path.abspath(path)).parent
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            index, where = start_index + len(items), f"{path}:{lineno}"
            try:
                entry = parse_line(line, where, base_dir, require_text=False, check_audio=False, require_duration=False)
            except ManifestError as e:
                reason = str(e).removeprefix(f"{where}: ")
                items.append(Item(index, where, error=f"{where}: malformed manifest line: {reason}"))
                continue
            audio_path = Path(entry.audio_filepath)
            item = Item(index, str(audio_path), path=audio_path, entry=entry.line, slots=dict(entry.line), where=where)
            if not audio_path.is_file():
                item = replace(item, error=f"{audio_path} ({where}): audio file not found")
            elif entry.offset is not None:  # a span of the file (NeMo's segment manifests), from 0 too
                num_samples = None if entry.duration is None else round(entry.duration * SAMPLE_RATE)
                item = replace(item, offset=round(entry.offset * SAMPLE_RATE), num_samples=num_samples)
            items.append(item)
    return items


def collect_items(audio) -> list[Item]:
    """Paths, folders, globs, manifests, arrays, or a list mixing them -> items in input order."""
    if isinstance(audio, (str, os.PathLike)):
        audio = [audio]
    if isinstance(audio, (np.ndarray, torch.Tensor)) and np.ndim(audio) == 1:
        audio = [audio]
    items: list[Item] = []
    for source in audio:
        if isinstance(source, Item):  # collected before (the CLI does, to skip what is done)
            items.append(replace(source, index=len(items), slots=dict(source.entry or {}), prompt=None))
        elif isinstance(source, (str, os.PathLike)):
            text = str(source)
            path = Path(text).expanduser()
            if path.is_dir():
                found = find_audio_files(path)
                if not found:
                    items.append(Item(len(items), text, error=f"{text}: folder holds no audio files "
                                      f"(looked for {', '.join(AUDIO_EXTENSIONS)})"))
                for p in found:
                    items.append(Item(len(items), str(p), path=p))
            elif not path.exists() and _is_glob(text):
                matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
                if not matches:
                    items.append(Item(len(items), text, error=f"{text}: no file matches this pattern"))
                for match in matches:
                    items += [replace(it, index=len(items) + k) for k, it in enumerate(collect_items(match))]
            elif is_manifest(text):
                items += read_manifest_items(path, start_index=len(items))
            else:
                error = None
                if not path.exists():
                    error = f"{text}: audio file not found"
                elif not path.is_file():
                    error = f"{text}: not a regular file"
                items.append(Item(len(items), text, path=path, error=error))
        else:
            name = f"<array {len(items)}>"
            try:
                samples = validate_audio(source, name)
                items.append(Item(len(items), name, samples=samples, num_samples=len(samples)))
            except AudioError as e:
                items.append(Item(len(items), name, error=str(e)))
    return items


def probe_item(item: Item) -> Item:
    """The item with its length (16 kHz samples) from its file header, without decoding the audio;
    or with the error of an empty, unreadable or corrupt file."""
    if item.samples is not None or item.error is not None:
        return item
    path = item.path
    try:
        if path.stat().st_size == 0:
            return replace(item, error=f"{item.label}: empty file (0 bytes)")
        info = soundfile.info(str(path))
        total = info.frames if info.samplerate == SAMPLE_RATE else math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        # Not something libsndfile reads (m4a, opus, ...): decode it once (ffmpeg) to learn its length,
        # or get load_audio's explanation of why it cannot be read.
        try:
            total = len(load_audio(path))
        except AudioError as e:
            return replace(item, error=name_error(item, str(e)))
    except OSError as e:
        return replace(item, error=f"{item.label}: cannot read: {e.strerror or e}")
    if total == 0:
        return replace(item, error=f"{item.label}: audio is empty (0 samples)")
    if item.offset >= total:
        return replace(item, error=f"{item.label}: offset {item.offset / SAMPLE_RATE:.2f} s is past the end of the "
                                   f"audio ({total / SAMPLE_RATE:.2f} s)")
    available = total - item.offset
    return replace(item, num_samples=available if item.num_samples is None else min(item.num_samples, available))


def name_error(item: Item, message: str) -> str:
    """AudioError messages start with the path; add the manifest line."""
    if item.where and message.startswith(item.name):
        return item.label + message[len(item.name):]
    return message if message.startswith(item.name) else f"{item.label}: {message}"


def read_span(item: Item, start: int, end: int) -> np.ndarray:
    """Samples [start, end) of an item (16 kHz, relative to the item), checked for NaN/inf."""
    if item.samples is not None:
        return validate_audio(item.samples[start:end], item.label)
    if not item.is_span and start == 0 and end >= (item.num_samples or 0):
        return load_audio(item.path)  # the whole file
    return load_audio(item.path, start=item.offset + start, stop=item.offset + end)

