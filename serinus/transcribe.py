"""Transcription and translation: audio in, hypotheses out, in input order.

    inputs (files | folders | globs | manifests | arrays) -> items, each with its prompt
      -> duration probed from the file header -> pieces: the whole item, or its hour-long segments
      -> batches of pieces sorted by duration; audio read in a background thread one batch ahead
         (an hour segment only once the batch before it is done, to bound memory)
      -> piece padded to >= 1 s -> [longer than 40 s: 30-40 s chunks, 1 s overlap]
      -> encoder (batch_size rows at a time) -> greedy / beam decoding of all rows of the batch
      -> [chunks merged at their overlaps] -> [hour segments joined] -> Hypothesis per item

A bad item (missing or corrupt file, NaN samples, invalid slot value, ...) gets a `Hypothesis`
whose `error` says what is wrong, naming the file (and manifest line); the others are
transcribed all the same. `serinus transcribe` (`main`) is the command line on top of this.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import soundfile
import torch

from serinus import longform
from serinus.audio import SAMPLE_RATE, AudioError, collate_audio, load_audio, validate_audio
from serinus.decoding import DecodingConfig, Hypothesis, beam_search, greedy_decode, max_new_tokens
from serinus.prompt import encode_prompt, get_format, select_slots
from serinus.timestamps import frame_time, parse_timestamp_tokens, segments_from_words

MIN_SECONDS = 1.0  # NeMo pads shorter audio to 1 s (both sides)
HOUR_SECONDS = 3600  # long files are processed one hour at a time, so memory stays bounded
OVERLAP_SAMPLES = SAMPLE_RATE  # 1 s overlap between consecutive chunks
PREFETCH_SECONDS = 600  # batches up to this much audio are read ahead in the background
DEFAULT_SLOTS = {"source_lang": "en", "target_lang": "en", "pnc": "yes"}
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".webm",
                    ".mp4", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64", ".sph")
CHUNK_MERGES = ("auto", "nemo", "overlap")


class TranscribeError(ValueError):
    """Input that cannot be transcribed at all (as opposed to one bad item among many)."""


@dataclass
class Item:
    """One input: a file (or a span of one, from a manifest's offset/duration) or an array."""

    index: int
    name: str  # what messages call it: the file path, or "<array 3>"
    path: Path | None = None
    samples: np.ndarray | None = None
    slots: dict = field(default_factory=dict)
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


@dataclass
class Unit:
    """What one encoder row sees: a whole item, or one chunk of a long item."""

    item: int
    chunk: int
    samples: np.ndarray  # valid samples only; batches are zero-padded when collated
    prompt: list[int]
    segment: int = 0  # hour segment of the item
    start: int = 0  # first sample of the chunk in its (padded) segment
    encoded_len: int | None = None  # set by decode_units


@dataclass
class Piece:
    """A stretch of one item decoded together: the whole item, or one hour of it."""

    item: Item
    segment: int
    start: int  # sample span within the item
    end: int
    n_segments: int
    chunked: bool  # cut into 30-40 s chunks (False: one row, whatever its length)
    rows: int  # encoder rows it needs (an estimate made from the header's length)


@dataclass
class ChunkedPiece:
    """One decoded piece before its chunks are merged: what the token and timestamp merges need."""

    units: list[Unit]  # .start (chunk start in the padded piece), .encoded_len, .samples
    hyps: list[Hypothesis]  # per chunk, chunk-relative


# -- inputs ------------------------------------------------------------------------------------

def is_manifest(path: str | os.PathLike) -> bool:
    return str(path).endswith((".json", ".jsonl"))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def read_manifest_items(path: str | os.PathLike, start_index: int = 0) -> list[Item]:
    """Items of a NeMo JSONL manifest; a bad line becomes an item with an error naming file:line.

    Relative `audio_filepath`s are resolved against the manifest's folder (as NeMo does);
    `offset` (with `duration`) selects a span of the file.
    """
    path = Path(path)
    if not path.is_file():
        return [Item(start_index, str(path), error=f"{path}: manifest not found")]
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            index = start_index + len(items)
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                items.append(Item(index, where, error=f"{where}: malformed manifest line: {e.msg} (column {e.colno})"))
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("audio_filepath"), str):
                what = "not a JSON object" if not isinstance(entry, dict) else "no 'audio_filepath' string"
                items.append(Item(index, where, entry=entry if isinstance(entry, dict) else None,
                                  error=f"{where}: malformed manifest line: {what}"))
                continue
            audio_path = Path(entry["audio_filepath"]).expanduser()
            if not audio_path.is_absolute():  # NeMo resolves relative paths against the manifest's folder
                audio_path = path.parent / audio_path
            item = Item(index, str(audio_path), path=audio_path, entry=entry, slots=dict(entry), where=where)
            if not audio_path.is_file():
                item.error = f"{audio_path} ({where}): audio file not found"
            else:
                _manifest_span(item, entry)
            items.append(item)
    return items


def _manifest_span(item: Item, entry: dict) -> None:
    """A manifest entry with an `offset` names a span of its file (NeMo's segment manifests)."""
    if entry.get("offset") in (None, 0, 0.0):
        return
    try:
        offset = float(entry["offset"])
        duration = float(entry["duration"]) if entry.get("duration") is not None else None
    except (TypeError, ValueError):
        item.error = f"{item.label}: offset/duration must be numbers, got {entry.get('offset')!r}/{entry.get('duration')!r}"
        return
    if offset < 0 or (duration is not None and duration <= 0):
        item.error = f"{item.label}: invalid offset/duration {offset}/{duration}"
        return
    item.offset = round(offset * SAMPLE_RATE)
    if duration is not None:
        item.num_samples = round(duration * SAMPLE_RATE)


def find_audio_files(folder: Path) -> list[Path]:
    """Audio files under `folder` (recursive), by extension, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


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
                item = Item(len(items), text, path=path)
                if not path.exists():
                    item.error = f"{text}: audio file not found"
                elif not path.is_file():
                    item.error = f"{text}: not a regular file"
                items.append(item)
        else:
            name = f"<array {len(items)}>"
            item = Item(len(items), name)
            try:
                item.samples = validate_audio(source, name)
                item.num_samples = len(item.samples)
            except AudioError as e:
                item.error = str(e)
            items.append(item)
    return items


def probe_item(item: Item) -> None:
    """Find the item's length (16 kHz samples) from its file header, without decoding the audio.
    Sets `item.error` for an empty, unreadable or corrupt file."""
    if item.samples is not None or item.error is not None:
        return
    path = item.path
    try:
        if path.stat().st_size == 0:
            item.error = f"{item.label}: empty file (0 bytes)"
            return
        info = soundfile.info(str(path))
        total = info.frames if info.samplerate == SAMPLE_RATE else math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        # Not something libsndfile reads (m4a, opus, ...): decode it once (ffmpeg) to learn its length,
        # or get load_audio's explanation of why it cannot be read.
        try:
            total = len(load_audio(path))
        except AudioError as e:
            item.error = _name_error(item, str(e))
            return
    except OSError as e:
        item.error = f"{item.label}: cannot read: {e.strerror or e}"
        return
    if total == 0:
        item.error = f"{item.label}: audio is empty (0 samples)"
        return
    if item.offset >= total:
        item.error = f"{item.label}: offset {item.offset / SAMPLE_RATE:.2f} s is past the end of the audio ({total / SAMPLE_RATE:.2f} s)"
        return
    available = total - item.offset
    item.num_samples = available if item.num_samples is None else min(item.num_samples, available)


def _name_error(item: Item, message: str) -> str:
    """AudioError messages start with the path; add the manifest line."""
    if item.where and message.startswith(item.name):
        return item.label + message[len(item.name):]
    return message if message.startswith(item.name) else f"{item.label}: {message}"


def read_span(item: Item, start: int, end: int) -> np.ndarray:
    """Samples [start, end) of an item (16 kHz, relative to the item), checked for NaN/inf.

    Files are read only over the span (soundfile seeks), so an hour of a 3-hour file costs an
    hour of memory. Formats libsndfile cannot seek (decoded by ffmpeg) are decoded whole.
    """
    if item.samples is not None:
        return validate_audio(item.samples[start:end], item.label)
    first, last = item.offset + start, item.offset + end
    if item.offset == 0 and start == 0 and end >= (item.num_samples or 0):
        samples = load_audio(item.path)  # the whole file: channels, resampling, ffmpeg formats
    else:
        try:
            info = soundfile.info(str(item.path))
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
            info = None
        if info is None:  # decoded by ffmpeg: no seeking, decode it all and keep the span
            samples = load_audio(item.path)[first:last]
        else:
            sr = info.samplerate
            a, b = (first, last) if sr == SAMPLE_RATE else (first * sr // SAMPLE_RATE, -(-last * sr // SAMPLE_RATE))
            try:
                data, _ = soundfile.read(str(item.path), start=a, stop=b, dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError, ValueError) as e:
                raise AudioError(f"{item.path}: unreadable or corrupt audio file ({e})") from e
            samples = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
            if sr != SAMPLE_RATE:
                import soxr

                samples = soxr.resample(samples, sr, SAMPLE_RATE, quality="HQ")[: last - first]
    if len(samples) == 0:
        raise AudioError(f"{item.path}: audio is empty (0 samples)")
    return validate_audio(samples, str(item.path))


def pad_to_min_duration(samples: np.ndarray, seconds: float = MIN_SECONDS, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Zero-pad audio shorter than `seconds` on both sides (left gets the smaller half), as NeMo."""
    return longform.pad_min_duration(samples, int(seconds * sr))


# -- the main entry point ----------------------------------------------------------------------

def transcribe(
    model,
    audio,
    batch_size: int = 4,
    source_lang: str | None = None,
    target_lang: str | None = None,
    pnc: str | bool | None = None,
    timestamps: bool | None = None,
    beam_size: int | None = None,
    length_penalty: float | None = None,
    max_generation_delta: int | None = None,
    return_nbest: bool = False,
    enable_chunking: bool = True,
    progress: bool = False,
    on_result: Callable[[Item, Hypothesis], None] | None = None,
    chunk_merge: str = "auto",
    **slots,
) -> list[Hypothesis]:
    """Transcribe (source_lang == target_lang) or translate audio.

    audio: a path, a folder (searched recursively for audio files), a glob, a manifest
    (.json/.jsonl), a 1-D float array at 16 kHz, or a list of those.
    Prompt slots (source_lang, target_lang, pnc, and any other slot of the model's prompt
    format such as decodercontext, itn, emotion) come from the keyword arguments, else from
    the manifest entry, else the defaults en -> en with punctuation.
    Decoding: beam_size 1 is greedy; unset options come from the checkpoint's decoding config.
    timestamps=True fills `hyp.timestamp` with "word" and "segment" lists.
    batch_size: encoder rows per batch. Audio longer than 40 s is cut into 30-40 s chunks with
    1 s overlap, decoded together and merged (enable_chunking=False decodes it whole); past an
    hour it is processed one hour at a time.
    chunk_merge: "nemo" (NeMo's LCS merge, exactly), "overlap" (our merge, which neither drops
    nor repeats words at a seam where NeMo's heuristics sometimes do) or "auto": "nemo" for
    checkpoints with a packed CTC aligner (canary-1b-v2, where NeMo itself chunks), else "overlap".
    on_result(item, hyp) is called as each item completes (in decoding order, not input order).
    Returns one Hypothesis per input item, in input order; a failed item has `.error` set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if chunk_merge not in CHUNK_MERGES:
        raise ValueError(f"chunk_merge must be one of {CHUNK_MERGES}, got {chunk_merge!r}")
    model.eval()
    decoding = _decoding_config(model.cfg.decoding, beam_size, length_penalty, max_generation_delta, return_nbest)
    overrides = {k: v for k, v in dict(source_lang=source_lang, target_lang=target_lang, pnc=pnc, **slots).items()
                 if v is not None}
    items = collect_items(audio)
    use_aligner = _timestamp_mode(model, items, timestamps, overrides)
    _check_overrides(model, overrides)
    for item in items:
        if item.error is None:
            _prepare_prompt(model, item, overrides)
        if item.error is None:
            probe_item(item)
    if chunk_merge == "auto":
        chunk_merge = "nemo" if model.aligner is not None else "overlap"

    hyps: list[Hypothesis | None] = [None] * len(items)
    for item in items:
        if item.error is not None:
            hyps[item.index] = Hypothesis(error=item.error)
            if on_result:
                on_result(item, hyps[item.index])

    todo = [item for item in items if item.error is None]
    bar = _Progress(todo) if progress else None
    try:
        results = _transcribe_items(model, todo, batch_size, decoding, use_aligner, enable_chunking, chunk_merge, bar)
        for item, hyp in results:
            hyps[item.index] = hyp
            if bar is not None:
                bar.file_done()
            if on_result:
                on_result(item, hyp)
    finally:
        if bar is not None:
            bar.close()
    want_timestamps = use_aligner or bool(timestamps)
    for hyp in hyps:
        if hyp.error is None and not want_timestamps:
            hyp.timestamp = {}
    return hyps


def _decoding_config(default: DecodingConfig, beam_size, length_penalty, max_generation_delta, return_nbest):
    cfg = DecodingConfig(**vars(default))
    if beam_size is not None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        cfg.beam_size = beam_size
    if length_penalty is not None:
        cfg.length_penalty = float(length_penalty)
    if max_generation_delta is not None:
        cfg.max_generation_delta = int(max_generation_delta)
    cfg.return_nbest = return_nbest
    return cfg


def _supports_frame_tokens(model) -> bool:
    fmt = get_format(model.cfg.prompt_format)
    return "timestamp" in fmt.slot_names and bool(model.tokenizer.timestamp_token_ids)


def can_timestamp(model) -> bool:
    """Whether this checkpoint gives timestamps: a packed CTC aligner, or frame tokens."""
    return model.aligner is not None or _supports_frame_tokens(model)


def _timestamp_mode(model, items: list[Item], timestamps, overrides: dict) -> bool:
    """Decide how timestamps are made. Returns True when the packed CTC aligner is used.

    With an aligner (canary-1b-v2) the prompt always says `timestamp=no` and a manifest entry
    asking for timestamps switches them on for all items, as in NeMo. Without one, the
    prompt's timestamp slot makes the decoder emit frame tokens (flash models)."""
    if model.aligner is not None:
        asked = bool(timestamps) or any(_truthy(item.slots.get("timestamp")) for item in items)
        asked = asked or _truthy(overrides.get("timestamp"))
        overrides["timestamp"] = "no"
        return asked
    if timestamps:
        if not _supports_frame_tokens(model):
            raise TranscribeError(
                "this checkpoint cannot produce timestamps: its prompt format has no timestamp slot "
                "or its vocabulary has no frame tokens, and it packs no CTC aligner"
            )
        overrides["timestamp"] = "yes"
    elif timestamps is False and "timestamp" in get_format(model.cfg.prompt_format).slot_names:
        overrides.setdefault("timestamp", "no")
    return False


def _truthy(value) -> bool:
    return value is not None and str(value) not in ("no", "notimestamp", "<|notimestamp|>", "false", "False", "0", "")


def _slots_for(model, given: dict, overrides: dict) -> dict:
    fmt = get_format(model.cfg.prompt_format)
    slots = {**DEFAULT_SLOTS, **select_slots(fmt, given), **overrides}
    if model.aligner is not None:
        slots["timestamp"] = "no"
    return {k: v for k, v in slots.items() if k in fmt.slot_names or k in fmt.aliases}


def _check_overrides(model, overrides: dict) -> None:
    """Options given for the whole call (keyword arguments, CLI flags) must be valid on their own:
    one bad --source-lang is one clear error, not the same error once per file."""
    fmt = get_format(model.cfg.prompt_format)
    unknown = [k for k in overrides if k not in fmt.slot_names and k not in fmt.aliases
               and k not in ("taskname", "task", "lang", "timestamp", "prompt_language")]
    if unknown:  # a typo would otherwise be dropped without a word
        raise TranscribeError(f"invalid prompt option: unknown slot(s) {', '.join(map(repr, unknown))} for prompt "
                              f"format {fmt.name!r}; slots: {', '.join(fmt.slot_names)}")
    try:
        encode_prompt(model.tokenizer, get_format(model.cfg.prompt_format), _slots_for(model, {}, overrides))
    except ValueError as e:
        raise TranscribeError(f"invalid prompt option: {e}") from e


def _prepare_prompt(model, item: Item, overrides: dict) -> None:
    """The item's slots (with defaults) and prompt ids; an invalid value becomes the item's error."""
    item.slots = _slots_for(model, item.slots, overrides)
    try:
        item.prompt = encode_prompt(model.tokenizer, get_format(model.cfg.prompt_format), item.slots)
    except ValueError as e:
        item.error = f"{item.label}: {e}"


class _Progress:
    """tqdm bar on stderr: files done, hours of audio done, real-time factor."""

    def __init__(self, items: list[Item]):
        from tqdm import tqdm

        self.total_seconds = sum(item.duration for item in items)
        self.done_seconds = 0.0
        self.start = time.perf_counter()
        self.bar = tqdm(total=len(items), unit="file", desc="transcribing", dynamic_ncols=True, file=sys.stderr)
        self._postfix()

    def _postfix(self):
        elapsed = time.perf_counter() - self.start
        rtf = f"{elapsed / self.done_seconds:.3f}" if self.done_seconds else "-"
        self.bar.set_postfix_str(f"audio {_hms(self.done_seconds)}/{_hms(self.total_seconds)} h, RTF {rtf}")

    def audio_done(self, seconds: float):
        self.done_seconds += seconds
        self._postfix()

    def file_done(self):
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- planning: pieces and batches --------------------------------------------------------------

def plan_pieces(items: list[Item], enable_chunking: bool) -> list[Piece]:
    """Each item as one piece, or (chunking, over an hour) one piece per hour; longest items
    first so batches hold rows of similar length, an item's hours in order."""
    pieces = []
    for item in items:
        total = item.num_samples or 0
        spans = longform.split_hours(total, HOUR_SECONDS) if enable_chunking else [(0, total)]
        for k, (start, end) in enumerate(spans):
            padded = max(end - start, int(MIN_SECONDS * SAMPLE_RATE))
            rows = len(longform.chunk_spans(padded, overlap=OVERLAP_SAMPLES)) if enable_chunking else 1
            pieces.append(Piece(item, k, start, end, len(spans), enable_chunking, rows))
    pieces.sort(key=lambda p: (-(p.item.num_samples or 0), p.item.index, p.segment))
    return pieces


def pack_batches(pieces: list[Piece], batch_size: int) -> list[list[Piece]]:
    """Pieces into batches of about batch_size rows. A piece is never split: all chunks of a
    file (an hour of it) share one batch, even when they are more than batch_size."""
    batches: list[list[Piece]] = []
    current, rows = [], 0
    for piece in pieces:
        if current and rows + piece.rows > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(piece)
        rows += piece.rows
    if current:
        batches.append(current)
    return batches


def load_piece(piece: Piece) -> list[Unit]:
    """Read a piece's audio, pad it to >= 1 s and cut it into chunk rows (views, no copies)."""
    item = piece.item
    samples = pad_to_min_duration(read_span(item, piece.start, piece.end))
    spans = longform.chunk_spans(len(samples), overlap=OVERLAP_SAMPLES) if piece.chunked else [(0, len(samples))]
    return [Unit(item.index, k, samples[s : s + n], item.prompt, piece.segment, s) for k, (s, n) in enumerate(spans)]


def _prefetch(batches: list[list[Piece]]) -> Iterator[list[tuple[Piece, list[Unit] | None, str | None]]]:
    """Yield each batch's loaded pieces. While one batch is decoded the next is read in a
    background thread, unless it holds more than PREFETCH_SECONDS of audio (an hour segment):
    that one is read after the current batch is freed, so two hours never sit in memory."""
    def load(batch):
        out = []
        for piece in batch:
            try:
                out.append((piece, load_piece(piece), None))
            except AudioError as e:
                out.append((piece, None, _name_error(piece.item, str(e))))
            except OSError as e:
                out.append((piece, None, f"{piece.item.label}: cannot read: {e}"))
        return out

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = None
        for i, batch in enumerate(batches):
            loaded = future.result() if future is not None else load(batch)
            future = None
            if i + 1 < len(batches) and sum(p.end - p.start for p in batches[i + 1]) <= PREFETCH_SECONDS * SAMPLE_RATE:
                future = pool.submit(load, batches[i + 1])
            yield loaded
            del loaded


# -- running -----------------------------------------------------------------------------------

def _transcribe_items(model, items, batch_size, decoding, use_aligner, enable_chunking, chunk_merge, bar=None):
    """Yield (item, hypothesis) as items complete."""
    pieces = plan_pieces(items, enable_chunking)
    done: dict[int, list[Hypothesis | None]] = {}  # item index -> hypothesis per hour segment
    failed: set[int] = set()
    for loaded in _prefetch(pack_batches(pieces, batch_size)):
        events = _run_batch(model, loaded, done, failed, decoding, use_aligner, chunk_merge, batch_size, bar)
        del loaded  # free this batch's audio before the next one is read
        yield from events


def _run_batch(model, loaded, done: dict, failed: set, decoding, use_aligner, chunk_merge, batch_size, bar):
    """Decode one loaded batch; returns the (item, hypothesis) of the items it completes or fails."""
    events = []
    ready: list[tuple[Piece, list[Unit]]] = []
    for piece, units, error in loaded:
        index = piece.item.index
        if index in failed:
            continue
        if error is not None:  # e.g. NaN samples in its second hour: the item fails as a whole
            failed.add(index)
            done.pop(index, None)
            events.append((piece.item, Hypothesis(error=error)))
            continue
        ready.append((piece, units))
    if not ready:
        return events
    try:
        piece_hyps = decode_pieces(model, ready, decoding, use_aligner, chunk_merge, batch_size)
    except Exception as e:  # e.g. out of memory: fail this batch's items, go on with the rest
        for piece, _ in ready:
            if piece.item.index not in failed:
                failed.add(piece.item.index)
                done.pop(piece.item.index, None)
                events.append((piece.item, Hypothesis(error=f"{piece.item.label}: decoding failed: {type(e).__name__}: {e}")))
        return events
    for (piece, _), hyp in zip(ready, piece_hyps):
        item = piece.item
        if bar is not None:
            bar.audio_done((piece.end - piece.start) / SAMPLE_RATE)
        segments = done.setdefault(item.index, [None] * piece.n_segments)
        segments[piece.segment] = hyp
        if all(h is not None for h in segments):
            del done[item.index]
            events.append((item, join_segments(model, segments)))
    return events


def decode_pieces(model, ready: list[tuple[Piece, list[Unit]]], decoding: DecodingConfig, use_aligner: bool,
                  chunk_merge: str, encode_rows: int) -> list[Hypothesis]:
    """Decode the rows of a batch of pieces together; one hypothesis per piece (chunks merged)."""
    units = [u for _, piece_units in ready for u in piece_units]
    hyps = decode_units(model, units, decoding, encode_rows=encode_rows)
    out, at = [], 0
    whole_units, whole_hyps = [], []  # single-row pieces, aligned together as NeMo aligns a batch
    for piece, piece_units in ready:
        chunk_hyps = hyps[at : at + len(piece_units)]
        at += len(piece_units)
        frame_tokens = piece.item.slots.get("timestamp") == "yes"
        for hyp in chunk_hyps:
            finish_hypothesis(model, hyp, frame_tokens)
        if len(piece_units) == 1:
            whole_units.append(piece_units[0])
            whole_hyps.append(chunk_hyps[0])
            out.append(chunk_hyps[0])
        else:
            out.append(merge_chunks(model, ChunkedPiece(piece_units, chunk_hyps), chunk_merge, use_aligner, frame_tokens))
    if use_aligner and whole_units:
        add_aligner_timestamps(model, [u.samples for u in whole_units], whole_hyps)
    return out


@torch.inference_mode()
def decode_units(model, units: list[Unit], decoding: DecodingConfig, encode_rows: int | None = None) -> list[Hypothesis]:
    """Encode one batch and decode every row with its own prompt. Rows whose prompts differ
    in length are decoded in separate groups (positions must line up within a group).

    The encoder runs over `encode_rows` rows at a time (all at once when None), every slice
    padded to the batch's longest row, so a long file's many chunks do not need all their
    features in memory at once; the decoder then sees all rows as one batch."""
    rows = encode_rows or len(units)
    longest = max(len(u.samples) for u in units)
    joint = decoding.ctc_weight > 0 and getattr(model, "ctc_head", None) is not None
    parts = []
    for start in range(0, len(units), rows):
        audio, lengths = collate_audio([u.samples for u in units[start : start + rows]], model.device, longest)
        parts.append(model.encode_with_ctc(audio, lengths) if joint else model.encode(audio, lengths) + (None,))
        del audio
    states = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    mask = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    enc_lengths = torch.cat([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
    ctc_log_probs = (torch.cat([p[3] for p in parts]) if len(parts) > 1 else parts[0][3]) if joint else None
    del parts
    for unit, n in zip(units, enc_lengths.tolist()):
        unit.encoded_len = int(n)
    tok = model.tokenizer
    hyps: list[Hypothesis | None] = [None] * len(units)
    groups: dict[int, list[int]] = {}
    for i, unit in enumerate(units):
        groups.setdefault(len(unit.prompt), []).append(i)
    for prompt_len, group in groups.items():
        index = torch.tensor(group, device=states.device)
        prompts = torch.tensor([units[i].prompt for i in group], device=states.device)
        limit_lengths = model.limit_lengths(torch.tensor([len(units[i].samples) for i in group]))
        limits = max_new_tokens(limit_lengths, prompt_len, decoding, model.cfg.decoder.max_sequence_length)
        if decoding.beam_size == 1:
            outputs = greedy_decode(model.decoder, states[index], mask[index], prompts, limits, tok.eos_id,
                                    tok.vocab_size)
            for row, ids in zip(group, outputs):
                hyps[row] = Hypothesis(y_sequence=_strip_pad(ids, tok.pad_id))
            candidates = [[hyps[r].y_sequence] for r in group]
        else:
            outputs = beam_search(model.decoder, states[index], mask[index], prompts, limits, tok.eos_id,
                                  tok.pad_id, decoding.beam_size, decoding.length_penalty, tok.vocab_size)
            for row, beams in zip(group, outputs):
                best_ids, best_score = beams[0]
                hyp = Hypothesis(y_sequence=best_ids, score=best_score)
                if decoding.return_nbest:
                    hyp.nbest = [Hypothesis(y_sequence=ids, score=score) for ids, score in beams]
                hyps[row] = hyp
            candidates = [[ids for ids, _ in beams] for beams in outputs]
        if joint:  # the CTC head's vote between the decoder's candidates and its own best path
            from serinus.joint_decoding import rescore

            picked = rescore(model.decoder, states[index], mask[index], ctc_log_probs[index], enc_lengths[index],
                             [units[r].prompt for r in group], candidates, decoding.ctc_weight, model.ctc_blank_id,
                             tok.eos_id, tok.pad_id, frozenset(tok.special_tokens.values()), tok.vocab_size)
            for row, (ids, score) in zip(group, picked):
                hyps[row].y_sequence, hyps[row].score = ids, score
    for hyp in hyps:
        hyp.text = tok.ids_to_text(hyp.y_sequence)
        for h in hyp.nbest:
            h.text = tok.ids_to_text(h.y_sequence)
    return hyps


def _strip_pad(ids: list[int], pad_id: int) -> list[int]:
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


# -- merging chunks and hours ------------------------------------------------------------------

def merge_overlap(merged: list[int], data: list[int], window: int = 24, max_drop: int = 4) -> list[int]:
    """Append chunk tokens `data` to `merged`, keeping the tokens both hold (the 1 s overlap) once.

    The overlap's tokens end `merged` and start `data`, give or take a few tokens of a word the
    chunk edge cut (up to `max_drop` on each side). Among common runs between the last `window`
    tokens of `merged` and the first `window` of `data`, take the one that best fits that:
    score = run length - (tokens it drops) / 2, kept only if positive; cut `merged` after the run
    and continue with `data` after it. No such run (a pause in the overlap): plain concatenation.
    NeMo's LCS merge instead trusts the longest common run anywhere in its window, which at
    times drops or repeats a word or a whole sentence at the seam. (Neither can tell a passage
    repeated word for word right across a seam from the overlap itself: it is kept once.)
    """
    tail, head = merged[-window:], data[:window]
    m, n = len(tail), len(head)
    best = None
    for i in range(m):
        for j in range(min(n, max_drop + 1)):
            if tail[i] != head[j] or (i > 0 and j > 0 and tail[i - 1] == head[j - 1]):
                continue  # not the start of a run
            length = 0
            while i + length < m and j + length < n and tail[i + length] == head[j + length]:
                length += 1
            dropped = m - i - length
            if dropped > max_drop:
                continue
            score = length - (dropped + j) / 2
            if score > 0 and (best is None or (score, length) > best[0]):
                best = ((score, length), i, j, length)
    if best is None:
        return list(merged) + list(data)
    _, i, j, length = best
    return list(merged[: len(merged) - m + i + length]) + list(data[j + length :])


def merge_chunks(model, piece: ChunkedPiece, method: str, use_aligner: bool, frame_tokens: bool) -> Hypothesis:
    """One hypothesis for a chunked piece. Tokens are merged at the 1 s overlaps ("nemo": NeMo's
    `merge_parallel_chunks`, whose y_sequence is all chunks' tokens concatenated; "overlap":
    `merge_overlap`, y_sequence = the merged tokens). Frame-token timestamps (flash models) are
    merged by time instead: each seam keeps the words on its own side of the overlap's middle."""
    tok = model.tokenizer
    hyps = piece.hyps
    if frame_tokens:
        return _merge_by_time(model, piece)
    if use_aligner:
        return _merge_aligned(model, piece)
    tokens = [h.y_sequence for h in hyps]
    if method == "nemo":
        merged = longform.merge_chunk_tokens(tokens, model.cfg.encoder.subsampling_factor)
        y_sequence = [t for seq in tokens for t in seq]
    else:
        merged = list(tokens[0])
        for data in tokens[1:]:
            merged = merge_overlap(merged, data)
        y_sequence = merged
    return Hypothesis(text=tok.ids_to_text(merged).strip(), y_sequence=y_sequence, score=0.0)


def _merge_aligned(model, piece: ChunkedPiece) -> Hypothesis:
    """canary-1b-v2 with timestamps, as NeMo: each chunk force-aligned at token ('char') level,
    the aligned tokens LCS-merged, the chunks' char times shifted and stitched into words and
    segments (serinus.longform).

    NeMo merges the aligner's tokens, so a chunk whose alignment was skipped (more tokens than
    CTC frames) drops out of its text. We keep that text: the text comes from the decoder's own
    tokens (the merge NeMo does without timestamps), its words get the times of the aligned
    words they match, the others none, and `hyp.warnings` says so."""
    hyps = piece.hyps
    texts = [h.text for h in hyps]
    add_aligner_timestamps(model, [u.samples for u in piece.units], hyps, timestamp_type="char")
    chars = [list((h.timestamp or {}).get("char") or []) for h in hyps]
    merged = longform.merge_chunk_tokens([[c["token_id"] for c in cs] for cs in chars],
                                         model.cfg.encoder.subsampling_factor)
    timestamp = longform.merge_chunk_timestamps(
        chars, [u.encoded_len for u in piece.units], merged, _piece_decoder(model.tokenizer),
        model.cfg.encoder.subsampling_factor, model.cfg.features.window_stride)
    y_sequence = [t for h in hyps for t in h.y_sequence]
    skipped = [k for k, (text, cs) in enumerate(zip(texts, chars)) if text.strip() and not cs]
    if not skipped:
        return Hypothesis(text=model.tokenizer.ids_to_text(merged).strip(), y_sequence=y_sequence, score=0.0,
                          timestamp=timestamp)
    tokens = longform.merge_chunk_tokens([h.y_sequence for h in hyps], model.cfg.encoder.subsampling_factor)
    text = model.tokenizer.ids_to_text(tokens).strip()
    words = _times_for_words(text.split(), timestamp["word"])
    missing = sum(w["start"] is None for w in words)
    hyp = Hypothesis(text=text, y_sequence=y_sequence, score=0.0,
                     timestamp={"word": words, "segment": segments_from_words(words)})
    hyp.warnings.append(
        f"{missing} word(s) have no timestamps: chunk(s) {', '.join(map(str, skipped))} held more tokens than "
        "the aligner has frames, so they could not be aligned (NeMo drops their text; it is kept here)")
    return hyp


def _times_for_words(words: list[str], timed: list[dict]) -> list[dict]:
    """Give each word of the text the times of the aligned word it matches (in order); a word
    with no aligned counterpart gets None for its times."""
    from difflib import SequenceMatcher

    out = [{"word": w, "start_offset": None, "end_offset": None, "start": None, "end": None} for w in words]
    matcher = SequenceMatcher(a=words, b=[t["word"] for t in timed], autojunk=False)
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            out[block.a + i] = dict(timed[block.b + i])
    return out


def _piece_decoder(tokenizer) -> Callable[[list[str]], str]:
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:
        return lambda pieces: sp.decode_pieces(list(pieces))
    return lambda pieces: "".join(pieces).replace("▁", " ").strip()


def _merge_by_time(model, piece: ChunkedPiece) -> Hypothesis:
    frame_samples = round(model.frame_seconds * SAMPLE_RATE)
    words: list[dict] = []
    for k, (unit, hyp) in enumerate(zip(piece.units, piece.hyps)):
        shift = unit.start / SAMPLE_RATE
        lo = -math.inf if k == 0 else (unit.start + OVERLAP_SAMPLES / 2) / SAMPLE_RATE
        nxt = piece.units[k + 1] if k + 1 < len(piece.units) else None
        hi = math.inf if nxt is None else (nxt.start + OVERLAP_SAMPLES / 2) / SAMPLE_RATE
        for w in (hyp.timestamp or {}).get("word") or []:
            w = dict(w, start=w["start"] + shift, end=w["end"] + shift,
                     start_offset=w["start_offset"] + unit.start // frame_samples,
                     end_offset=w["end_offset"] + unit.start // frame_samples)
            if lo <= (w["start"] + w["end"]) / 2 < hi:
                if words and w["start"] < words[-1]["end"]:  # keep times monotonic across the seam
                    w["start"], w["start_offset"] = words[-1]["end"], words[-1]["end_offset"]
                    w["end"], w["end_offset"] = max(w["end"], w["start"]), max(w["end_offset"], w["start_offset"])
                words.append(w)
    segments = segments_from_words(words) if words else []
    return Hypothesis(text=" ".join(w["word"] for w in words), y_sequence=[t for h in piece.hyps for t in h.y_sequence],
                      score=0.0, timestamp={"word": words, "segment": segments, "char": []})


def join_segments(model, segments: list[Hypothesis]) -> Hypothesis:
    """The hour segments of one item back into one hypothesis (NeMo's `merge_all_hypotheses`):
    texts joined by a space, token lists concatenated, timestamps shifted by the hour."""
    if len(segments) == 1:
        return segments[0]
    timestamps = [h.timestamp for h in segments] if any(h.timestamp for h in segments) else None
    text, timestamp = longform.merge_hour_results([h.text for h in segments], timestamps, HOUR_SECONDS,
                                                  model.frame_seconds)
    return Hypothesis(text=text, y_sequence=[t for h in segments for t in h.y_sequence], score=0.0,
                      timestamp=timestamp or {})


def finish_hypothesis(model, hyp: Hypothesis, frame_tokens: bool) -> None:
    """Turn frame tokens in the text into word/segment timestamps (flash models)."""
    if not frame_tokens:
        return
    window_stride = model.cfg.features.window_stride
    for h in [hyp, *hyp.nbest]:
        text, words = parse_timestamp_tokens(h.text, model.frame_seconds, window_stride)
        h.text = text
        h.timestamp = {"word": words or [], "segment": segments_from_words(words) if words else [], "char": []}
        for seg in h.timestamp["segment"]:
            seg["start"] = frame_time(seg["start_offset"], model.frame_seconds, window_stride)
            seg["end"] = frame_time(seg["end_offset"], model.frame_seconds, window_stride)


def add_aligner_timestamps(model, samples: list[np.ndarray], hyps: list[Hypothesis],
                           timestamp_type: str | tuple = ("word", "segment")) -> None:
    """v2-style timestamps: force-align each hypothesis' text to the packed CTC model's output.
    Whole files get NeMo's word and segment lists; the chunks of a long file are aligned with
    timestamp_type="char" (token level), as NeMo does before merging them."""
    from serinus.align import align_texts

    align_texts(model, samples, hyps, timestamp_type if isinstance(timestamp_type, str) else list(timestamp_type))


# -- command line ------------------------------------------------------------------------------

DESCRIPTION = """\
Transcribe or translate audio with a Canary model.

INPUT may be audio files, folders (searched recursively for audio files), glob patterns
(quote them: 'talks/*.mp3') or NeMo JSONL manifests (.json/.jsonl; relative audio paths are
taken relative to the manifest's folder, and each line's source_lang/target_lang/pnc/... are
used unless given here). Audio longer than 40 s is cut into 30-40 s chunks with 1 s overlap
and merged; audio over an hour is processed one hour at a time.

Results are written as they complete (longest files first), so an interrupted run keeps what
it finished; run again with --resume to skip what the output already holds. Files that cannot
be transcribed are reported on stderr and at the end; the exit status is then 1."""

EPILOG = """\
output formats:
  txt    one line per input: AUDIO_PATH<TAB>TEXT
  jsonl  one JSON object per input: the manifest line (or audio_filepath and duration) plus
         "pred_text" (and "word"/"segment" timestamps with --timestamps)
  srt    SubRip subtitles from segment timestamps (implies --timestamps); --output is a folder
  vtt    WebVTT subtitles, likewise                 (or a file when there is a single input)

exit status: 0 all inputs transcribed, 1 some failed, 2 bad usage or model, 130 interrupted.

examples:
  serinus transcribe talk.wav
  serinus transcribe recordings/ --source-lang de --target-lang en -o out.jsonl --format jsonl
  serinus transcribe manifest.jsonl --model nvidia/canary-1b-flash --batch-size 16 --device cuda
  serinus transcribe 'lectures/*.mp3' --format srt -o subtitles/ --resume"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serinus transcribe", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders, glob patterns or JSONL manifests")
    p.add_argument("-m", "--model", default="nvidia/canary-1b-v2",
                   help="a Hugging Face Hub id (nvidia/canary-1b-v2, nvidia/canary-1b-flash, nvidia/canary-180m-flash, "
                        "nvidia/canary-1b; downloaded once into the Hugging Face cache, HF_HUB_OFFLINE=1 honoured), "
                        "a .nemo file, or a folder written by save_pretrained (default: %(default)s)")
    g = p.add_argument_group("task")
    g.add_argument("--source-lang", help="language spoken in the audio (default: the manifest's, else en)")
    g.add_argument("--target-lang", help="language to write; differs from --source-lang for translation "
                                         "(default: the manifest's, else en)")
    g.add_argument("--pnc", choices=["yes", "no"], help="punctuation and capitals (default: the manifest's, else yes)")
    g.add_argument("--timestamps", action="store_true", help="word and segment timestamps (jsonl output, srt/vtt)")
    g.add_argument("--slot", action="append", default=[], metavar="NAME=VALUE",
                   help="any other prompt slot, e.g. --slot itn=yes --slot decodercontext='...' (repeatable)")
    g = p.add_argument_group("decoding")
    g.add_argument("--beam-size", type=int, help="1 = greedy (default: the checkpoint's decoding config)")
    g.add_argument("--batch-size", type=int, default=4, help="encoder rows per batch (default: %(default)s)")
    g.add_argument("--no-chunking", action="store_true", help="decode long audio whole instead of in 30-40 s chunks")
    g.add_argument("--chunk-merge", choices=CHUNK_MERGES, default="auto",
                   help="how chunks are joined: nemo = NeMo's LCS merge exactly, overlap = Serinus' merge that keeps "
                        "every word once, auto = nemo for canary-1b-v2 style checkpoints, else overlap")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "float16"], default="float32",
                   help="precision: bfloat16 = weights and compute (GPU, or a CPU with AVX-512 BF16/AMX), int8 = "
                        "dynamically quantised Linear layers (CPU) (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", help="output file (folder for srt/vtt with several inputs); default: stdout")
    g.add_argument("-f", "--format", choices=["txt", "jsonl", "srt", "vtt"], default=None,
                   help="output format (default: from the --output extension, else txt)")
    g.add_argument("--resume", action="store_true", help="skip inputs already in --output, append the rest")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _parse_slots(parser, values: list[str]) -> dict:
    slots = {}
    for value in values:
        name, sep, val = value.partition("=")
        if not sep or not name:
            parser.error(f"--slot takes NAME=VALUE, got {value!r}")
        slots[name.strip()] = val
    return slots


def _pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main(argv: list[str] | None = None) -> int:
    from serinus import output

    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = args.format or output.format_from_path(args.output)
    slots = _parse_slots(parser, args.slot)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.beam_size is not None and args.beam_size < 1:
        parser.error("--beam-size must be >= 1")
    if args.resume and not args.output:
        parser.error("--resume needs --output")

    items = collect_items(args.inputs)
    try:
        writer = output.open_writer(args.output, fmt, items, resume=args.resume)
    except output.OutputError as e:
        print(f"serinus transcribe: error: {e}", file=sys.stderr)
        return 2
    skipped = [item for item in items if writer.is_done(item)]
    todo = [item for item in items if not writer.is_done(item)]

    try:
        from serinus.checkpoint import load_model

        device = _pick_device(args.device)
        model = load_model(args.model, device=device, dtype=args.dtype if args.dtype != "float16" else "float32")
        if args.dtype == "float16":
            model = model.to(torch.float16)
    except Exception as e:  # CheckpointError, a bad --device, ...
        print(f"serinus transcribe: error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        writer.close()
        return 2
    timestamps = True if (args.timestamps or fmt in ("srt", "vtt")) else None
    if timestamps and not can_timestamp(model):
        print(f"serinus transcribe: error: {args.model} gives no timestamps (no packed aligner, no frame tokens); "
              f"--timestamps and --format {fmt} need them", file=sys.stderr)
        writer.close()
        return 2

    failures: list[str] = []
    n_done = 0

    def on_result(item: Item, hyp: Hypothesis):
        nonlocal n_done
        error = hyp.error
        if error is None:
            error = writer.write(item, hyp)
        if error is not None:
            failures.append(error)
            print(f"serinus transcribe: failed: {error}", file=sys.stderr)
        else:
            n_done += 1
            for warning in hyp.warnings:
                print(f"serinus transcribe: warning: {item.name}: {warning}", file=sys.stderr)

    try:
        transcribe(model, todo, batch_size=args.batch_size, source_lang=args.source_lang,
                   target_lang=args.target_lang, pnc=args.pnc, timestamps=timestamps, beam_size=args.beam_size,
                   enable_chunking=not args.no_chunking, chunk_merge=args.chunk_merge, progress=not args.quiet,
                   on_result=on_result, **slots)
    except TranscribeError as e:
        print(f"serinus transcribe: error: {e}", file=sys.stderr)
        writer.close()
        return 2
    except KeyboardInterrupt:
        writer.close()
        print(f"\nserinus transcribe: interrupted after {n_done} file(s); run again with --resume to continue",
              file=sys.stderr)
        return 130
    writer.close()
    summary = f"serinus transcribe: {n_done} file(s) transcribed"
    if skipped:
        summary += f", {len(skipped)} already in {args.output} (skipped)"
    if failures:
        summary += f", {len(failures)} failed:\n" + "\n".join(f"  {f}" for f in failures)
    print(summary, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
