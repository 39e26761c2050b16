"""Transcription and translation: audio in, hypotheses out, in input order.

    items (paths | arrays | manifest) -> prompt per item -> audio loaded in a background thread
    -> padded to >= 1 s -> [long audio: chunks] -> batches sorted by duration -> encoder
    -> greedy / beam decoding -> [chunk merge] -> [timestamps] -> Hypothesis per item

A bad item (missing or corrupt file, invalid slot value, ...) gets a `Hypothesis` whose
`error` says what is wrong; the others are transcribed all the same.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from serinus.audio import SAMPLE_RATE, AudioError, load_audio, validate_audio
from serinus.decoding import DecodingConfig, Hypothesis, beam_search, greedy_decode, max_new_tokens
from serinus.prompt import encode_prompt, get_format, select_slots
from serinus.timestamps import frame_time, parse_timestamp_tokens, segments_from_words

MIN_SECONDS = 1.0  # NeMo pads shorter audio to 1 s (both sides)
DEFAULT_SLOTS = {"source_lang": "en", "target_lang": "en", "pnc": "yes"}


class TranscribeError(ValueError):
    """Input that cannot be transcribed at all (as opposed to one bad item among many)."""


@dataclass
class Item:
    """One input: a file or an array, its prompt slots and (for manifests) its manifest entry."""

    index: int
    name: str
    path: Path | None = None
    samples: np.ndarray | None = None
    slots: dict = field(default_factory=dict)
    entry: dict | None = None
    prompt: list[int] | None = None
    error: str | None = None


@dataclass
class Unit:
    """What one encoder row sees: a whole item, or one chunk of a long item."""

    item: int
    chunk: int
    samples: np.ndarray
    prompt: list[int]


# -- inputs ------------------------------------------------------------------------------------

def is_manifest(path: str | os.PathLike) -> bool:
    return str(path).endswith((".json", ".jsonl"))


def read_manifest_items(path: str | os.PathLike, start_index: int = 0) -> list[Item]:
    """Items of a NeMo JSONL manifest; a bad line becomes an item with an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise TranscribeError(f"{path}: manifest not found")
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
                items.append(Item(index, where, error=f"{where}: malformed JSON: {e.msg} (column {e.colno})"))
                continue
            if not isinstance(entry, dict) or "audio_filepath" not in entry:
                items.append(Item(index, where, entry=entry if isinstance(entry, dict) else None,
                                  error=f"{where}: no 'audio_filepath' field"))
                continue
            audio_path = Path(str(entry["audio_filepath"]))
            if not audio_path.is_absolute():  # NeMo resolves relative paths against the manifest's folder
                audio_path = path.parent / audio_path
            items.append(Item(index, str(audio_path), path=audio_path, entry=entry, slots=dict(entry)))
            if not audio_path.is_file():
                items[-1].error = f"{where}: audio file not found: {audio_path}"
    return items


def collect_items(audio) -> list[Item]:
    """Paths, arrays, a manifest, or a list mixing paths and arrays -> items in input order."""
    if isinstance(audio, (str, os.PathLike)):
        audio = [audio]
    if isinstance(audio, (np.ndarray, torch.Tensor)) and np.ndim(audio) == 1:
        audio = [audio]
    items: list[Item] = []
    for source in audio:
        if isinstance(source, (str, os.PathLike)):
            if is_manifest(source):
                items += read_manifest_items(source, start_index=len(items))
            else:
                path = Path(source)
                item = Item(len(items), str(path), path=path)
                if not path.is_file():
                    item.error = f"{path}: audio file not found"
                items.append(item)
        else:
            name = f"<array {len(items)}>"
            item = Item(len(items), name)
            try:
                item.samples = validate_audio(source, name)
            except AudioError as e:
                item.error = str(e)
            items.append(item)
    return items


def load_item_audio(item: Item) -> np.ndarray:
    samples = item.samples if item.samples is not None else load_audio(item.path)
    return pad_to_min_duration(samples)


def pad_to_min_duration(samples: np.ndarray, seconds: float = MIN_SECONDS, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Zero-pad audio shorter than `seconds` on both sides (left gets the smaller half), as NeMo."""
    need = int(seconds * sr) - len(samples)
    if need <= 0:
        return samples
    left = need // 2
    return np.pad(samples, (left, need - left))


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
    **slots,
) -> list[Hypothesis]:
    """Transcribe (source_lang == target_lang) or translate audio.

    audio: a path, a manifest (.json/.jsonl), a 1-D float array at 16 kHz, or a list of those.
    Prompt slots (source_lang, target_lang, pnc, and any other slot of the model's prompt
    format such as decodercontext, itn, emotion) come from the keyword arguments, else from
    the manifest entry, else the defaults en -> en with punctuation.
    Decoding: beam_size 1 is greedy; unset options come from the checkpoint's decoding config.
    timestamps=True fills `hyp.timestamp` with "word" and "segment" lists.
    Returns one Hypothesis per input item, in input order; a failed item has `.error` set.
    """
    model.eval()
    decoding = _decoding_config(model.cfg.decoding, beam_size, length_penalty, max_generation_delta, return_nbest)
    overrides = {k: v for k, v in dict(source_lang=source_lang, target_lang=target_lang, pnc=pnc, **slots).items()
                 if v is not None}
    items = collect_items(audio)
    use_aligner = _timestamp_mode(model, items, timestamps, overrides)
    for item in items:
        if item.error is None:
            _prepare_prompt(model, item, overrides, use_aligner)

    hyps: list[Hypothesis | None] = [None] * len(items)
    for item in items:
        if item.error is not None:
            hyps[item.index] = Hypothesis(error=item.error)
            if on_result:
                on_result(item, hyps[item.index])

    todo = [item for item in items if item.error is None]
    progress_bar = _progress(todo, progress)
    for item, hyp in _transcribe_items(model, todo, batch_size, decoding, use_aligner):
        hyps[item.index] = hyp
        if progress_bar is not None:
            progress_bar.update(1)
        if on_result:
            on_result(item, hyp)
    if progress_bar is not None:
        progress_bar.close()
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
    return "timestamp" in fmt.slot_names and model.tokenizer.timestamp_token_ids


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


def _prepare_prompt(model, item: Item, overrides: dict, use_aligner: bool) -> None:
    fmt = get_format(model.cfg.prompt_format)
    slots = {**DEFAULT_SLOTS, **select_slots(fmt, item.slots), **overrides}
    if use_aligner or model.aligner is not None:
        slots["timestamp"] = "no"
    slots = {k: v for k, v in slots.items() if k in fmt.slot_names or k in fmt.aliases}
    item.slots = slots
    try:
        item.prompt = encode_prompt(model.tokenizer, fmt, slots)
    except ValueError as e:
        where = item.name if item.entry is None else item.name
        item.error = f"{where}: {e}"


def _progress(items: list[Item], enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=len(items), unit="file", desc="transcribing", dynamic_ncols=True)


# -- batching and decoding ---------------------------------------------------------------------

def _load_all(items: list[Item]) -> Iterable[tuple[Item, np.ndarray | None, str | None]]:
    """Load audio in a background thread, one item ahead of the consumer."""
    def load(item):
        try:
            return item, load_item_audio(item), None
        except AudioError as e:
            return item, None, str(e)

    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(load, item) for item in items[:2]]
        for i in range(len(items)):
            result = futures[i].result()
            if i + 2 < len(items):
                futures.append(pool.submit(load, items[i + 2]))
            futures[i] = None
            yield result


def _transcribe_items(model, items: list[Item], batch_size: int, decoding: DecodingConfig, use_aligner: bool):
    """Yield (item, hypothesis) as batches complete. Items are decoded in order of duration
    (longest first) so batches hold audio of similar length."""
    units: list[Unit] = []
    loaded: dict[int, np.ndarray] = {}
    for item, samples, error in _load_all(items):
        if error is not None:
            yield item, Hypothesis(error=error)
            continue
        loaded[item.index] = samples
        units.append(Unit(item.index, 0, samples, item.prompt))
    by_index = {item.index: item for item in items}
    units.sort(key=lambda u: -len(u.samples))
    for start in range(0, len(units), batch_size):
        batch = units[start : start + batch_size]
        hyps = decode_units(model, batch, decoding)
        if use_aligner:
            add_aligner_timestamps(model, [u.samples for u in batch], hyps)
        for unit, hyp in zip(batch, hyps):
            finish_hypothesis(model, hyp, frame_tokens=by_index[unit.item].slots.get("timestamp") == "yes")
            yield by_index[unit.item], hyp


def collate(samples: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad 1-D arrays into [B, N] with lengths [B]."""
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.long)
    batch = torch.zeros(len(samples), int(lengths.max()), dtype=torch.float32)
    for i, s in enumerate(samples):
        batch[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return batch.to(device), lengths.to(device)


@torch.inference_mode()
def decode_units(model, units: list[Unit], decoding: DecodingConfig) -> list[Hypothesis]:
    """Encode one batch and decode every row with its own prompt. Rows whose prompts differ
    in length are decoded in separate groups (positions must line up within a group)."""
    audio, lengths = collate([u.samples for u in units], model.device)
    states, mask, enc_lengths = model.encode(audio, lengths)
    tok = model.tokenizer
    hyps: list[Hypothesis | None] = [None] * len(units)
    groups: dict[int, list[int]] = {}
    for i, unit in enumerate(units):
        groups.setdefault(len(unit.prompt), []).append(i)
    for prompt_len, rows in groups.items():
        index = torch.tensor(rows, device=states.device)
        prompts = torch.tensor([units[i].prompt for i in rows], device=states.device)
        limits = max_new_tokens(enc_lengths[index], prompt_len, decoding, model.cfg.decoder.max_sequence_length)
        if decoding.beam_size == 1:
            outputs = greedy_decode(model.decoder, states[index], mask[index], prompts, limits, tok.eos_id)
            for row, ids in zip(rows, outputs):
                hyps[row] = Hypothesis(y_sequence=_strip_pad(ids, tok.pad_id))
        else:
            outputs = beam_search(model.decoder, states[index], mask[index], prompts, limits, tok.eos_id,
                                  tok.pad_id, decoding.beam_size, decoding.length_penalty)
            for row, beams in zip(rows, outputs):
                best_ids, best_score = beams[0]
                hyp = Hypothesis(y_sequence=best_ids, score=best_score)
                if decoding.return_nbest:
                    hyp.nbest = [Hypothesis(y_sequence=ids, score=score) for ids, score in beams]
                hyps[row] = hyp
    for hyp in hyps:
        hyp.text = tok.ids_to_text(hyp.y_sequence)
        for h in hyp.nbest:
            h.text = tok.ids_to_text(h.y_sequence)
    return hyps


def _strip_pad(ids: list[int], pad_id: int) -> list[int]:
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


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


def add_aligner_timestamps(model, samples: list[np.ndarray], hyps: list[Hypothesis]) -> None:
    """v2-style timestamps: force-align each hypothesis' text to the packed CTC model's output."""
    from serinus.align import align_texts

    align_texts(model, samples, hyps)
