"""Long audio for canary-1b-v2 style models: hour windows, parallel 30-40 s chunks, and merging them back.

NeMo 3.0.0 (`EncDecMultiTaskModel.transcribe` with `enable_chunking`) does, per file:

    split_hours        cut the file into 3600 s windows (lhotse `cut_into_windows`), ids <id>-0, <id>-1, ...
    pad_min_duration   pad each window to >= 1 s, zeros on both sides
    find_chunk_size    pick a chunk of 30..40 s (whole window if < 40 s) that leaves the longest last chunk
    chunk_waveform     1 s overlapping chunks, zero-padded to the chunk size, decoded as one batch
    merge_chunk_tokens LCS-merge the chunks' token lists (1 s overlap -> 12 frames at 80 ms)
    merge_chunk_timestamps  shift and stitch the chunks' char timestamps, then words and segments
    merge_hour_results concatenate the hour windows again

Everything here is a pure function on sample arrays, token-id lists and timestamp dicts; the model side
(running the AED and the CTC aligner on each chunk) is wired in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from serinus.timestamps import segments_from_words

SAMPLE_RATE = 16000
PUNCTUATION = frozenset({",", ".", "!", "?"})


# ---------------------------------------------------------------------------------------------------------------
# Cutting the audio
# ---------------------------------------------------------------------------------------------------------------


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


def pad_min_duration(samples, min_samples: int = SAMPLE_RATE):
    """Zero-pad a 1-D numpy array or tensor to at least `min_samples`, half on each side (left = pad // 2).

    Both the lhotse dataloader (pad_min_duration=1.0, 'both') and the CTC aligner's tensor dataset do this,
    and NeMo keeps timestamps relative to the padded audio.
    """
    pad = min_samples - len(samples)
    if pad <= 0:
        return samples
    left, right = pad // 2, pad - pad // 2
    if isinstance(samples, torch.Tensor):
        return torch.nn.functional.pad(samples, (left, right))
    return np.pad(np.asarray(samples), (left, right))


def find_chunk_size(
    total_samples: int,
    sr: int = SAMPLE_RATE,
    min_sec: int = 30,
    max_sec: int = 40,
    overlap_sec: float = 1.0,
) -> int:
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


@dataclass
class Chunks:
    audio: np.ndarray | torch.Tensor  # [N, chunk_size] zero-padded chunks (one unpadded [1, total] if no split)
    lengths: list[int]  # valid samples per chunk
    starts: list[int]  # first sample of each chunk in the input
    chunk_size: int


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


def chunk_waveform(
    samples,
    chunk_size: int | None = None,
    overlap: int = SAMPLE_RATE,
    sr: int = SAMPLE_RATE,
) -> Chunks:
    """NeMo's `_chunk_waveform`: the chunks of `chunk_spans`, each zero-padded to the chunk size."""
    total = len(samples)
    if chunk_size is None:
        chunk_size = find_chunk_size(total, sr=sr, overlap_sec=overlap / sr)
    stack = torch.stack if isinstance(samples, torch.Tensor) else np.stack
    spans = chunk_spans(total, chunk_size, overlap, sr)
    if len(spans) == 1 and chunk_size >= total:
        return Chunks(stack([samples]), [total], [0], total)
    pieces = [pad_right(samples[start : start + length], chunk_size) for start, length in spans]
    return Chunks(stack(pieces), [length for _, length in spans], [start for start, _ in spans], chunk_size)


def pad_right(samples, size: int):
    pad = size - len(samples)
    if pad <= 0:
        return samples
    if isinstance(samples, torch.Tensor):
        return torch.nn.functional.pad(samples, (0, pad))
    return np.pad(np.asarray(samples), (0, pad))


# ---------------------------------------------------------------------------------------------------------------
# Merging chunk tokens: NeMo's LCS merge
# ---------------------------------------------------------------------------------------------------------------


def lcs_alignment(X: Sequence[int], Y: Sequence[int]) -> tuple[int, int, int]:
    """NeMo's `longest_common_subsequence_merge` (really a longest common *substring* with heuristics).

    X is the tail of the merged tokens, Y the head of the next chunk. Returns (i, j, length): the match
    starts at X[i] and Y[j]. If the longest match reaches the end of X it is walked back to its start.
    Otherwise the leftmost-in-Y longest match is taken (too short -> length 0), stretched along the diagonal
    towards the end of X allowing one mismatch per row, and traced back counting the skipped tokens.
    """
    m, n = len(X), len(Y)
    L = [[0] * (n + 1) for _ in range(m + 1)]  # L[i][j]: common suffix length of X[:i] and Y[:j]
    best, best_idx = 0, (0, 0, 0)
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            if X[i - 1] == Y[j - 1]:
                L[i][j] = L[i - 1][j - 1] + 1
                if L[i][j] >= best:  # later (lower-right) matches win ties
                    best = L[i][j]
                    best_idx = (i, j, best)

    i, j, length = best_idx
    if i == m:  # the match reaches the end of X: walk back to its start
        while length >= 0 and i > 0 and j > 0:
            if L[i - 1][j - 1] > 0:
                length -= 1
                i, j = i - 1, j - 1
            else:
                i, j, length = i - 1, j - 1, length - 1
                break
        return i, j, best_idx[2]

    # (1) leftmost (smallest j) longest match, scanning rows from the end of X
    max_len, max_j = 0, n
    i_p, j_p = m, -1
    for ii in range(m, -1, -1):
        for jj in range(n + 1):
            if L[ii][jj] > max_len and jj <= max_j:
                max_len, max_j = L[ii][jj], jj
                i_p, j_p = ii, jj
    if max_len <= 1:  # NeMo's MIN_MERGE_SUBSEQUENCE_LEN: too short to trust, cut nothing
        return i_p, 0, 0

    # (2) stretch the match along the diagonal towards the end of X, allowing one skip per row
    j_temp, j_exp, j_skip = j_p + 1, 0, 0
    for ii in range(i_p + 1, m + 1):
        any_skip = 0
        for jj in range(j_temp, j_temp + j_skip + 1):
            if jj < n + 1:
                if L[ii][jj] == 0:
                    any_skip = 1
                else:
                    j_exp = 1 + j_skip + any_skip
        j_skip += any_skip
        j_temp += 1
    j_p += j_exp

    # (3) trace back to the start of the (stretched) match, counting diagonal skips
    j_skip = slice_count = 0
    while i_p > 0 and j_p > 0:
        if L[i_p][j_p] == 0:
            j_p -= 1
            j_skip += 1
        if j_p > 0:
            slice_count += 1
            i_p -= 1
            j_p -= 1
    return max(0, i_p), max(0, j_p), slice_count + j_skip


def lcs_merge(
    merged: Sequence[int],
    data: Sequence[int],
    delay: int = 12,
    max_steps_per_timestep: int = 2,
    min_lcs_length: int = 1,
    parallel_chunking: bool = True,
) -> list[int]:
    """NeMo's `lcs_alignment_merge_buffer`: append `data` to `merged`, dropping their overlap (new list).

    The match is searched in the last delay * max_steps_per_timestep tokens of `merged`. With
    parallel_chunking the result is merged up to the end of the match + data after the match; without,
    the match (and anything before it) is cut from `data` only.
    """
    merged, data = list(merged), list(data)
    if delay < 1 or not merged:
        return merged + data
    tail = merged[-int(delay * max_steps_per_timestep) :]
    i, j, length = lcs_alignment(tail, data)
    if length < min_lcs_length:
        return merged + data
    if parallel_chunking:
        return merged[: len(merged) - len(tail) + i + length] + data[j + length :]
    return merged + data[j + length :]


def merge_delay(subsampling_factor: int = 8) -> int:
    """Tokens in NeMo's 1 s overlap: one per encoder frame (10 ms features), int(100 / 8) = 12."""
    return int(1 / (subsampling_factor / 100))


def merge_chunk_tokens(chunk_tokens: Sequence[Sequence[int]], subsampling_factor: int = 8) -> list[int]:
    """The token merge of NeMo's `merge_parallel_chunks`.

    Each chunk's list is its AED y_sequence, or with timestamps the token_ids of its char items (an
    unaligned chunk then adds nothing). Only the first 60% of a chunk's overlap tokens (7 of 12) take part
    in the LCS; the rest is appended as is.
    """
    if not chunk_tokens:
        return []
    delay = merge_delay(subsampling_factor)
    head = int(delay * 0.6)  # about 60% of the frames carry a token
    merged = list(chunk_tokens[0])
    for data in chunk_tokens[1:]:
        data = list(data)
        merged = lcs_merge(merged, data[:head], delay=delay, max_steps_per_timestep=2, min_lcs_length=1)
        merged += data[head:]
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Merging chunk timestamps
# ---------------------------------------------------------------------------------------------------------------


def chunk_frame_shifts(
    encoded_lens: Sequence[int], subsampling_factor: int = 8, overlap_frames: int = 100
) -> list[int]:
    """Encoder-frame shift of each chunk: sum over earlier chunks of (enc_len * 8 - 100) // 8 (= enc_len - 13).

    overlap_frames is the 1 s overlap in 10 ms feature frames (NeMo hard-codes 100).
    """
    shifts, total = [], 0
    for k in range(len(encoded_lens)):
        if k > 0:
            total += (int(encoded_lens[k - 1]) * subsampling_factor - overlap_frames) // subsampling_factor
        shifts.append(total)
    return shifts


def join_chunk_chars(
    chunk_chars: Sequence[Sequence[dict]],
    encoded_lens: Sequence[int],
    merged_tokens: Sequence[int] | None = None,
    subsampling_factor: int = 8,
    window_stride: float = 0.01,
    overlap_frames: int = 100,
) -> list[dict]:
    """NeMo's `join_char_level_timestamps`: the chunks' char items on one global timeline.

    With merged_tokens, an item is kept only if its token_id is the next merged token (a greedy cursor, which
    drops a chunk's leading overlap). Offsets are shifted by the chunk's frame shift; a start before the
    previous end is clamped to it (start and end). start/end = offset * window_stride * subsampling, unrounded.
    """
    shifts = chunk_frame_shifts(encoded_lens, subsampling_factor, overlap_frames)
    out: list[dict] = []
    cursor = 0
    for shift, chars in zip(shifts, chunk_chars):
        for char in chars:
            if not char:
                continue
            if merged_tokens is not None and not (
                cursor < len(merged_tokens) and char["token_id"] == merged_tokens[cursor]
            ):
                continue
            item = dict(char)
            if char["start_offset"] != -1:
                item["start_offset"] = char["start_offset"] + shift
            if char["end_offset"] != -1:
                item["end_offset"] = char["end_offset"] + shift
            if out and item["start_offset"] != -1 and item["start_offset"] < out[-1]["end_offset"]:
                item["start_offset"] = item["end_offset"] = out[-1]["end_offset"]
            for key in ("start", "end"):
                off = item[key + "_offset"]
                item[key] = -1 if off == -1 else off * window_stride * subsampling_factor
            out.append(item)
            cursor += 1
    return out


def words_from_chars(
    chars: Sequence[dict],
    decode_pieces: Callable[[list[str]], str],
    punctuation=PUNCTUATION,
) -> list[dict]:
    """NeMo's `get_words_offsets` for BPE pieces (word delimiter ' ').

    A word starts at a piece whose text differs from its decoded char (it carries '▁'); `, . ! ?` attach to
    the word before them. Each item needs 'char' (decoded text) and 'token' (the piece).
    """
    words: list[dict] = []
    built: list[str] = []
    first = 0  # index of the built word's first item

    def close(last: int, probe: dict):  # NeMo tests the keys on the item being looked at (`probe`)
        word = {"word": decode_pieces(built), "start_offset": chars[first]["start_offset"],
                "end_offset": chars[last]["end_offset"]}
        if "start" in probe:
            word["start"] = chars[first]["start"]
        if "end" in probe:
            word["end"] = chars[last]["end"]
        words.append(word)

    for i, item in enumerate(chars):
        text, piece = item["char"], item["token"]
        is_punct = bool(punctuation) and text in punctuation and text != " "
        nxt, k = None, i  # the next item's text that is not a bare space
        while not nxt and k < len(chars) - 1:
            k += 1
            nxt = chars[k]["char"] if chars[k]["char"] != " " else None
        starts_word = piece != text or (text == " " and nxt not in punctuation)
        if starts_word and not is_punct:
            if built:
                close(i - 1, item)
            built = []
            if text != " ":
                built.append(piece)
                first = i
        elif is_punct and not built and words:  # punctuation after a finished word: glue it on (end stays)
            words[-1]["end_offset"] = item["end_offset"]
            if words[-1]["word"].endswith(" "):
                words[-1]["word"] = words[-1]["word"][:-1]
            words[-1]["word"] += text
        elif is_punct and built:
            if built[-1] in (" ", "_", "▁"):
                built = built[:-1]
            built.append(piece)
        else:
            if not built:
                first = i
            built.append(piece)

    if not words:
        if built:
            words.append({"word": decode_pieces(built), "start_offset": chars[0]["start_offset"],
                          "end_offset": chars[-1]["end_offset"]})
            if "start" in chars[0]:
                words[0]["start"] = chars[0]["start"]
            if "end" in chars[-1]:
                words[0]["end"] = chars[-1]["end"]
    else:
        words[0]["start_offset"] = chars[0]["start_offset"]
        if "start" in chars[0]:
            words[0]["start"] = chars[0]["start"]
        if built:
            close(len(chars) - 1, chars[-1])
    return words


def merge_chunk_timestamps(
    chunk_chars: Sequence[Sequence[dict]],
    encoded_lens: Sequence[int],
    merged_tokens: Sequence[int] | None,
    decode_pieces: Callable[[list[str]], str],
    subsampling_factor: int = 8,
    window_stride: float = 0.01,
    overlap_frames: int = 100,
) -> dict[str, list[dict]]:
    """The timestamp half of NeMo's `merge_parallel_chunks`: {'word': [...], 'segment': [...]}.

    chunk_chars: each chunk's 'char' items from the aligner (timestamp_type='char'), chunk-relative.
    decode_pieces: pieces -> text (SentencePiece decode_pieces / tokenizer.tokens_to_text).
    """
    chars = join_chunk_chars(chunk_chars, encoded_lens, merged_tokens, subsampling_factor, window_stride,
                             overlap_frames)
    words = words_from_chars(chars, decode_pieces)
    return {"word": words, "segment": segments_from_words(words)}


# ---------------------------------------------------------------------------------------------------------------
# Joining hour windows
# ---------------------------------------------------------------------------------------------------------------


def merge_hour_results(
    texts: Sequence[str],
    timestamps: Sequence[dict | None] | None = None,
    window_seconds: int = 3600,
    frame_seconds: float = 0.08,
) -> tuple[str, dict[str, list[dict]] | None]:
    """NeMo's `merge_hypotheses_of_same_audio` for the hour windows <id>-0, <id>-1, ... of one file.

    Texts are stripped and joined with a space (empty ones skipped). Word/segment items of window k get
    start/end += k * window_seconds and offsets += the frames in k windows, both only when not -1.
    (NeMo shifts offsets by int(k * 3600 * 1000 / subsampling) = 450000 frames an hour, 10x the real
    45000 frames of 80 ms; we give the real frame index, so start == start_offset * frame_seconds.)
    Concatenating y_sequences is left to the caller.
    """
    text = " ".join(t.strip() for t in texts if t)
    if timestamps is None:
        return text, None
    merged: dict[str, list[dict]] = {"word": [], "segment": []}
    for k, ts in enumerate(timestamps):
        if not ts:
            continue
        seconds = k * window_seconds
        frames = round(seconds / frame_seconds)
        for key in ("word", "segment"):
            for item in ts.get(key) or []:
                item = dict(item)
                for name, shift in (("start", seconds), ("end", seconds), ("start_offset", frames),
                                    ("end_offset", frames)):
                    if item.get(name) is not None and item[name] != -1:
                        item[name] += shift
                merged[key].append(item)
    return text, merged
