"""Plan: items -> pieces (whole, or hour segments) -> batches of encoder rows, read ahead.

    split_hours        cut a file into 3600 s windows (lhotse `cut_into_windows`, as NeMo)
    pad_min_duration   pad each window to >= 1 s, zeros on both sides (serinus.audio)
    find_chunk_size    pick a chunk of 30..40 s (whole window if < 40 s) that leaves the longest last chunk
    chunk_spans        1 s overlapping chunks: the rows one piece is decoded as (NeMo's `_chunk_waveform`)

Batches hold pieces of similar length (longest first); all rows of a piece share its batch.
Audio is read in a background thread one batch ahead, except an hour segment, which waits
until the batch before it is done, so memory stays bounded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from serinus.audio import SAMPLE_RATE, AudioError, pad_min_duration
from serinus.pipeline import inputs
from serinus.pipeline.inputs import Item

MIN_SECONDS = 1.0  # NeMo pads shorter audio to 1 s (both sides)
HOUR_SECONDS = 3600  # long files are processed one hour at a time, so memory stays bounded
OVERLAP_SAMPLES = SAMPLE_RATE  # 1 s overlap between consecutive chunks
PREFETCH_SECONDS = 600  # batches up to this much audio are read ahead in the background


# -- cutting the audio -------------------------------------------------------------------------

def _num_samples(samples_or_len) -> int:
    return int(samples_or_len) if isinstance(samples_or_len, (int, np.integer)) else len(samples_or_len)


def split_hours(samples_or_len, window_seconds: float = 3600.0, sr: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """(start, end) sample spans of consecutive `window_seconds` windows (the last one is shorter).

    Takes the samples themselves or their count. Like lhotse's cut_into_windows(d, hop=d): windows start at
    0, d, 2d, ... while they start inside the audio; an empty input gives no window.
    """
    total = _num_samples(samples_or_len)
    window = int(round(window_seconds * sr))
    return [(start, min(start + window, total)) for start in range(0, total, window)]


def find_chunk_size(total_samples: int, sr: int = SAMPLE_RATE, min_sec: int = 30, max_sec: int = 40,
                    overlap_sec: float = 1.0) -> int:
    """NeMo's `_find_optimal_chunk_size`: chunk length in samples.

    Under max_sec the whole input is one chunk. Otherwise, of the whole-second sizes min_sec..max_sec (each
    stepping by chunk - overlap) keep the one whose last chunk is longest, i.e. the least padding; the
    smallest size wins a tie.
    """
    if total_samples < max_sec * sr:
        return total_samples
    overlap = int(overlap_sec * sr)
    best_size, best_last = min_sec * sr, 0
    for sec in range(min_sec, max_sec + 1):
        size = sec * sr
        step = size - overlap
        if step <= 0 or size > total_samples:
            continue
        n_chunks = (total_samples + step - 1) // step
        last = total_samples - step * (n_chunks - 1)
        if last > best_last:
            best_size, best_last = size, last
    return best_size


def chunk_spans(total: int, chunk_size: int | None = None, overlap: int = SAMPLE_RATE,
                sr: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """(start, valid length) of each chunk of `total` samples, as NeMo's `_chunk_waveform` cuts
    them: chunks of `chunk_size` samples (default: find_chunk_size) every chunk_size - overlap
    samples, while a chunk would start more than `overlap` before the end. One span when the
    audio fits one chunk."""
    if chunk_size is None:
        chunk_size = find_chunk_size(total, sr=sr, overlap_sec=overlap / sr)
    if chunk_size >= total:
        return [(0, total)]
    step = chunk_size - overlap
    if step <= 0:
        raise ValueError(f"chunk_size ({chunk_size}) must be larger than the overlap ({overlap})")
    spans, start = [], 0
    while start + overlap < total:
        spans.append((start, min(chunk_size, total - start)))
        start += step
    return spans


@dataclass
class Chunks:
    audio: np.ndarray | torch.Tensor  # [N, chunk_size] zero-padded chunks (one unpadded [1, total] if no split)
    lengths: list[int]  # valid samples per chunk
    starts: list[int]  # first sample of each chunk in the input
    chunk_size: int


def chunk_waveform(samples, chunk_size: int | None = None, overlap: int = SAMPLE_RATE, sr: int = SAMPLE_RATE) -> Chunks:
    """NeMo's `_chunk_waveform`: the chunks of `chunk_spans`, each zero-padded to the chunk size.
    (transcribe() keeps only the valid samples of each row; batches are zero-padded when collated.)"""
    total = len(samples)
    if chunk_size is None:
        chunk_size = find_chunk_size(total, sr=sr, overlap_sec=overlap / sr)
    stack = torch.stack if isinstance(samples, torch.Tensor) else np.stack
    spans = chunk_spans(total, chunk_size, overlap, sr)
    if len(spans) == 1 and chunk_size >= total:
        return Chunks(stack([samples]), [total], [0], total)
    pieces = [_pad_right(samples[start : start + length], chunk_size) for start, length in spans]
    return Chunks(stack(pieces), [length for _, length in spans], [start for start, _ in spans], chunk_size)


def _pad_right(samples, size: int):
    pad = size - len(samples)
    if pad <= 0:
        return samples
    if isinstance(samples, torch.Tensor):
        return torch.nn.functional.pad(samples, (0, pad))
    return np.pad(np.asarray(samples), (0, pad))


# -- pieces, rows and batches ------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Piece:
    """A stretch of one item decoded together: the whole item, or one hour of it."""

    item: Item
    segment: int
    start: int  # sample span within the item
    end: int
    n_segments: int
    chunked: bool  # cut into 30-40 s chunks (False: one row, whatever its length)
    rows: int  # encoder rows it needs (an estimate made from the header's length)


@dataclass(frozen=True, eq=False)
class Row:
    """What one encoder row sees: a whole piece, or one chunk of it."""

    item: int
    chunk: int
    samples: np.ndarray  # valid samples only; batches are zero-padded when collated
    prompt: list[int]
    segment: int = 0  # hour segment of the item
    start: int = 0  # first sample of the chunk in its (padded) segment
    transcribes: bool = True  # a transcription, not a translation: a CTC head may score it (joint decoding)


def plan_pieces(items: list[Item], enable_chunking: bool) -> list[Piece]:
    """Each item as one piece, or (chunking, over an hour) one piece per hour; longest items
    first so batches hold rows of similar length, an item's hours in order."""
    pieces = []
    for item in items:
        total = item.num_samples or 0
        spans = split_hours(total, HOUR_SECONDS) if enable_chunking else [(0, total)]
        for k, (start, end) in enumerate(spans):
            padded = max(end - start, int(MIN_SECONDS * SAMPLE_RATE))
            rows = len(chunk_spans(padded, overlap=OVERLAP_SAMPLES)) if enable_chunking else 1
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


def load_piece(piece: Piece) -> list[Row]:
    """Read a piece's audio, pad it to >= 1 s and cut it into chunk rows (views, no copies)."""
    item = piece.item
    samples = pad_min_duration(inputs.read_span(item, piece.start, piece.end), int(MIN_SECONDS * SAMPLE_RATE))
    spans = chunk_spans(len(samples), overlap=OVERLAP_SAMPLES) if piece.chunked else [(0, len(samples))]
    return [Row(item.index, k, samples[s : s + n], item.prompt, piece.segment, s, item.transcribes)
            for k, (s, n) in enumerate(spans)]


def prefetch(batches: list[list[Piece]]) -> Iterator[list[tuple[Piece, list[Row] | None, str | None]]]:
    """Yield each batch's loaded pieces: (piece, its rows, None) or (piece, None, why it could not
    be read). While one batch is decoded the next is read in a background thread, unless it holds
    more than PREFETCH_SECONDS of audio (an hour segment): that one is read after the current
    batch is freed, so two hours never sit in memory."""
    def load(batch):
        out = []
        for piece in batch:
            try:
                out.append((piece, load_piece(piece), None))
            except AudioError as e:
                out.append((piece, None, inputs.name_error(piece.item, str(e))))
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
