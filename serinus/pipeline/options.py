"""Options: what one transcribe() call asks for, resolved once, and each item's prompt.

Prompt slots come from the call's keyword arguments, else the manifest entry, else the defaults
en -> en with punctuation. How timestamps are made is decided in one place (`timestamp_mode`).
Options given for the whole call are checked once, so a bad `source_lang` is one clear error,
not the same error once per file; a bad value in one manifest line fails that item only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from serinus.decoding import DecodingConfig
from serinus.pipeline.inputs import Item
from serinus.prompt import encode_prompt, get_format, select_slots

DEFAULT_SLOTS = {"source_lang": "en", "target_lang": "en", "pnc": "yes"}
CHUNK_MERGES = ("auto", "nemo", "overlap")
_NOT_PROMPT_SLOTS = ("taskname", "task", "lang", "timestamp", "prompt_language")  # accepted, not checked


class TranscribeError(ValueError):
    """Input that cannot be transcribed at all (as opposed to one bad item among many)."""


@dataclass(frozen=True)
class TimestampMode:
    """How timestamps are made for one call."""

    aligner: bool  # the packed CTC aligner force-aligns the decoded text (canary-1b-v2 style)
    keep: bool  # results carry timestamps (else their timestamp dict is left empty)
    slot: str | None = None  # the prompt's `timestamp` slot, for every item
    slot_default: str | None = None  # ... unless the call gives one


def timestamp_mode(timestamps: bool | None, asked_by_input: bool, has_aligner: bool, has_timestamp_slot: bool,
                   has_frame_tokens: bool) -> TimestampMode:
    """With an aligner (canary-1b-v2) the prompt always says `timestamp=no`, and an input asking
    for timestamps (a manifest entry, a `timestamp` slot) switches them on for all items, as in
    NeMo. Without one, the prompt's timestamp slot makes the decoder emit frame tokens (flash
    models); an item whose own prompt asks for them gets them parsed too."""
    if has_aligner:
        use = bool(timestamps) or asked_by_input
        return TimestampMode(aligner=use, keep=use, slot="no")
    if timestamps:
        if not (has_timestamp_slot and has_frame_tokens):
            raise TranscribeError(
                "this checkpoint cannot produce timestamps: its prompt format has no timestamp slot "
                "or its vocabulary has no frame tokens, and it packs no CTC aligner"
            )
        return TimestampMode(aligner=False, keep=True, slot="yes")
    if timestamps is False and has_timestamp_slot:
        return TimestampMode(aligner=False, keep=False, slot_default="no")
    return TimestampMode(aligner=False, keep=False)


@dataclass(frozen=True)
class Options:
    batch_size: int  # encoder rows per batch
    decoding: DecodingConfig
    slots: dict  # slot values for every item (they beat the manifest's)
    timestamps: TimestampMode
    chunking: bool  # long audio in 30-40 s chunks, hour segments
    chunk_merge: str  # "nemo" or "overlap"
    progress: bool
    # NeMo's transcribe() chunks where a checkpoint has a CTC aligner and it gets one input or batch_size 1,
    # and then strips every result's text (merge_all_hypotheses): the aggregate tokenizer's leading space goes
    strip_text: bool = False


def supports_frame_tokens(model) -> bool:
    fmt = get_format(model.cfg.prompt_format)
    return "timestamp" in fmt.slot_names and bool(model.tokenizer.timestamp_token_ids)


def can_timestamp(model) -> bool:
    """Whether this checkpoint gives timestamps: a packed CTC aligner, or frame tokens."""
    return model.aligner is not None or supports_frame_tokens(model)


def truthy(value) -> bool:
    return value is not None and str(value) not in ("no", "notimestamp", "<|notimestamp|>", "false", "False", "0", "")


def resolve_options(model, items: list[Item], *, batch_size: int, timestamps: bool | None, beam_size: int | None,
                    length_penalty: float | None, max_generation_delta: int | None, return_nbest: bool,
                    speculative: bool, enable_chunking: bool, chunk_merge: str, progress: bool, slots: dict) -> Options:
    """The call's options, checked and resolved: decoding from the checkpoint's config and the
    arguments, the timestamp mode, the slot values for every item, the chunk merge."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if chunk_merge not in CHUNK_MERGES:
        raise ValueError(f"chunk_merge must be one of {CHUNK_MERGES}, got {chunk_merge!r}")
    decoding = DecodingConfig(**vars(model.cfg.decoding))
    if beam_size is not None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        decoding.beam_size = beam_size
        decoding.strategy = "beam" if beam_size > 1 else "greedy"  # beam_size=1 asks for greedy decoding
    if length_penalty is not None:
        decoding.length_penalty = float(length_penalty)
    if max_generation_delta is not None:
        decoding.max_generation_delta = int(max_generation_delta)
    decoding.return_nbest = return_nbest
    decoding.speculative = decoding.speculative and speculative

    given = {k: v for k, v in slots.items() if v is not None}
    fmt = get_format(model.cfg.prompt_format)
    asked = truthy(given.get("timestamp")) or any(truthy(item.slots.get("timestamp")) for item in items)
    mode = timestamp_mode(timestamps, asked, model.aligner is not None, "timestamp" in fmt.slot_names,
                          bool(model.tokenizer.timestamp_token_ids))
    if mode.slot_default is not None:
        given = {"timestamp": mode.slot_default, **given}
    if mode.slot is not None:
        given["timestamp"] = mode.slot
    _check_slots(model, given)
    if chunk_merge == "auto":
        chunk_merge = "nemo" if model.aligner is not None else "overlap"
    strip_text = enable_chunking and model.aligner is not None and (len(items) == 1 or batch_size == 1)
    return Options(batch_size, decoding, given, mode, enable_chunking, chunk_merge, progress, strip_text)


def slots_for(model, entry: dict, overrides: dict) -> dict:
    """An item's prompt slots: defaults, then its manifest entry's, then the call's."""
    fmt = get_format(model.cfg.prompt_format)
    slots = {**DEFAULT_SLOTS, **select_slots(fmt, entry), **overrides}
    return {k: v for k, v in slots.items() if k in fmt.slot_names or k in fmt.aliases}


def _check_slots(model, overrides: dict) -> None:
    fmt = get_format(model.cfg.prompt_format)
    unknown = [k for k in overrides if k not in fmt.slot_names and k not in fmt.aliases and k not in _NOT_PROMPT_SLOTS]
    if unknown:  # a typo would otherwise be dropped without a word
        raise TranscribeError(f"invalid prompt option: unknown slot(s) {', '.join(map(repr, unknown))} for prompt "
                              f"format {fmt.name!r}; slots: {', '.join(fmt.slot_names)}")
    try:
        encode_prompt(model.tokenizer, fmt, slots_for(model, {}, overrides))
    except ValueError as e:
        raise TranscribeError(f"invalid prompt option: {e}") from e


def prepare_item(model, item: Item, options: Options) -> Item:
    """The item with its slots (with defaults) and prompt ids; an invalid value becomes its error."""
    if item.error is not None:
        return item
    slots = slots_for(model, item.slots, options.slots)
    try:
        return replace(item, slots=slots, prompt=encode_prompt(model.tokenizer, get_format(model.cfg.prompt_format), slots))
    except ValueError as e:
        return replace(item, slots=slots, error=f"{item.label}: {e}")
