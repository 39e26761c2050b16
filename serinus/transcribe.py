"""Transcription and translation: audio in, hypotheses out, in input order.

The pipeline (serinus.pipeline), one way:

    inputs   files | folders | globs | manifests | arrays -> items, each probed for its length
    options  the call's options resolved once; each item's prompt
    plan     pieces (the whole item, or its hour segments) -> batches of rows (30-40 s chunks,
             1 s overlap, past 40 s), audio read one batch ahead in a background thread
    decode   encoder + greedy / beam decoding of all rows of a batch; timestamps per row
    merge    chunks joined at their overlaps, hour segments joined
    results  Hypothesis per item (timestamps as NeMo's dicts), reported as each completes

A bad item (missing or corrupt file, NaN samples, invalid slot value, ...) gets a `Hypothesis`
whose `error` says what is wrong, naming the file (and manifest line); the others are
transcribed all the same. `serinus transcribe` (serinus.cli) is the command line on top of this.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from serinus.audio import SAMPLE_RATE
from serinus.decoding import Hypothesis
from serinus.pipeline import decode, plan
from serinus.pipeline.inputs import Item, collect_items, probe_item
from serinus.pipeline.merge import merge_piece
from serinus.pipeline.options import (CHUNK_MERGES, Options, TranscribeError, can_timestamp,  # noqa: F401 (API)
                                      prepare_item, resolve_options)
from serinus.pipeline.results import HourSegments, Progress, Results, to_hypothesis


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
    speculative: bool = True,
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
    speculative: greedy decoding of a large float32 model on a CPU checks an int8 draft's tokens
    several at a time (the same tokens, fewer passes; CanaryModel.speculative_draft); False: one
    token per pass.
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
    model.eval()
    items = collect_items(audio)
    options = resolve_options(
        model, items, batch_size=batch_size, timestamps=timestamps, beam_size=beam_size,
        length_penalty=length_penalty, max_generation_delta=max_generation_delta, return_nbest=return_nbest,
        speculative=speculative, enable_chunking=enable_chunking, chunk_merge=chunk_merge, progress=progress,
        slots=dict(source_lang=source_lang, target_lang=target_lang, pnc=pnc, **slots))
    items = [probe_item(prepare_item(model, item, options)) for item in items]
    results = Results(items, on_result)
    for item in items:
        if item.error is not None:
            results.add(item, Hypothesis(error=item.error))
    todo = [item for item in items if item.error is None]
    bar = Progress(todo) if options.progress else None
    results.add_all(run(model, todo, options, bar), bar)
    return results.hyps


def run(model, items: list[Item], options: Options, bar: Progress | None = None) -> Iterator[tuple[Item, Hypothesis]]:
    """Plan, decode and merge the items; yield (item, hypothesis) as each completes or fails."""
    hours = HourSegments(model.frame_seconds)
    keep = options.timestamps.keep
    for loaded in plan.prefetch(plan.pack_batches(plan.plan_pieces(items, options.chunking), options.batch_size)):
        ready = []
        for piece, rows, error in loaded:
            if error is not None:  # e.g. NaN samples in its second hour: the item fails as a whole
                if hours.fail(piece.item):
                    yield piece.item, Hypothesis(error=error)
            elif piece.item.index not in hours.failed:
                ready.append((piece, rows))
        del loaded  # free this batch's audio before the next one is read
        if not ready:
            continue
        try:
            decoded = decode.decode_batch(model, ready, options.decoding, options.timestamps.aligner,
                                          options.batch_size)
            transcripts = [merge_piece(model, rows, options.chunk_merge, options.timestamps.aligner,
                                       piece.item.frame_tokens) for (piece, _), rows in zip(ready, decoded)]
        except Exception as e:  # e.g. out of memory: fail this batch's items, go on with the rest
            for piece, _ in ready:
                if hours.fail(piece.item):
                    yield piece.item, Hypothesis(error=f"{piece.item.label}: decoding failed: {type(e).__name__}: {e}")
            continue
        for (piece, _), transcript in zip(ready, transcripts):
            if bar is not None:
                bar.audio_done((piece.end - piece.start) / SAMPLE_RATE)
            whole = hours.add(piece, transcript)
            if whole is not None:
                if options.strip_text:
                    whole = dataclasses.replace(whole, text=whole.text.strip())
                yield piece.item, to_hypothesis(whole, keep)
