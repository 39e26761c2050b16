"""Merge: the decoded rows of a piece into one transcript, and the hour segments of an item into one.

Chunks overlap by 1 s, so the words in an overlap come out of both neighbours:

    merge_chunk_tokens  NeMo's LCS merge of the chunks' tokens (`merge_parallel_chunks`), exactly;
                        used where NeMo chunks (canary-1b-v2 style checkpoints) and for chunk_merge="nemo"
    merge_overlap       Serinus' merge, which neither drops nor repeats words at a seam (the default
                        for checkpoints without an aligner, which NeMo never chunks)
    merge_chunk_timestamps  NeMo's stitching of the chunks' aligned tokens into words and segments
    merge_by_time       frame-token words (flash models): each seam keeps the words on its side of the
                        overlap's middle
    merge_hour_results  NeMo's `merge_hypotheses_of_same_audio` for an item's hour segments

Everything here works on token ids and timestamp records (serinus.timestamps); nothing runs a model.
"""

from __future__ import annotations

import math
from dataclasses import replace
from difflib import SequenceMatcher
from typing import Callable, Sequence

from serinus.audio import SAMPLE_RATE
from serinus.pipeline.decode import DecodedRow, Transcript
from serinus.pipeline.plan import OVERLAP_SAMPLES
from serinus.timestamps import Timestamps, TimedToken, TimedWord, segments_from_words

PUNCTUATION = frozenset({",", ".", "!", "?"})


def merge_piece(model, rows: list[DecodedRow], method: str, use_aligner: bool, frame_tokens: bool) -> Transcript:
    """One transcript for a piece: its only row's, or its chunks merged. Frame-token timestamps
    (flash models) are merged by time; aligned chunks as NeMo merges them; plain text by tokens
    ("nemo": NeMo's LCS merge, whose y_sequence is all chunks' tokens concatenated; "overlap":
    `merge_overlap`, y_sequence = the merged tokens)."""
    if len(rows) == 1:
        return rows[0].transcript
    if frame_tokens:
        return merge_by_time(rows, model.frame_seconds)
    if use_aligner:
        return merge_aligned(rows, model.tokenizer, model.cfg.encoder.subsampling_factor,
                             model.cfg.features.window_stride)
    tokens = [d.transcript.tokens for d in rows]
    if method == "nemo":
        merged = merge_chunk_tokens(tokens, model.cfg.encoder.subsampling_factor)
        y_sequence = [t for seq in tokens for t in seq]
    else:
        merged = list(tokens[0])
        for data in tokens[1:]:
            merged = merge_overlap(merged, data)
        y_sequence = merged
    return Transcript(model.tokenizer.ids_to_text(merged).strip(), y_sequence)


# -- tokens: NeMo's LCS merge ------------------------------------------------------------------

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


# -- tokens: Serinus' overlap merge ------------------------------------------------------------

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


# -- aligned chunks (canary-1b-v2 style): NeMo's timestamp merge --------------------------------

def merge_aligned(rows: list[DecodedRow], tokenizer, subsampling_factor: int, window_stride: float) -> Transcript:
    """canary-1b-v2 with timestamps, as NeMo: each chunk force-aligned at token ('char') level,
    the aligned tokens LCS-merged, the chunks' token times shifted and stitched into words and
    segments.

    NeMo merges the aligner's tokens, so a chunk whose alignment was skipped (more tokens than
    CTC frames) drops out of its text. We keep that text: the text comes from the decoder's own
    tokens (the merge NeMo does without timestamps), its words get the times of the aligned
    words they match, the others none, and the warnings say so."""
    texts = [d.transcript.text for d in rows]
    chars = [list((d.transcript.timestamps and d.transcript.timestamps.tokens) or []) for d in rows]
    merged = merge_chunk_tokens([[c.token_id for c in cs] for cs in chars], subsampling_factor)
    timestamps = merge_chunk_timestamps(chars, [d.encoded_len for d in rows], merged, piece_decoder(tokenizer),
                                        subsampling_factor, window_stride)
    y_sequence = [t for d in rows for t in d.transcript.tokens]
    skipped = [k for k, (text, cs) in enumerate(zip(texts, chars)) if text.strip() and not cs]
    if not skipped:
        return Transcript(tokenizer.ids_to_text(merged).strip(), y_sequence, timestamps=timestamps)
    tokens = merge_chunk_tokens([d.transcript.tokens for d in rows], subsampling_factor)
    text = tokenizer.ids_to_text(tokens).strip()
    words = times_for_words(text.split(), timestamps.words)
    missing = sum(w.start is None for w in words)
    warning = (f"{missing} word(s) have no timestamps: chunk(s) {', '.join(map(str, skipped))} held more tokens "
               "than the aligner has frames, so they could not be aligned (NeMo drops their text; it is kept here)")
    return Transcript(text, y_sequence, timestamps=Timestamps(words, segments_from_words(words)), warnings=[warning])


def times_for_words(words: list[str], timed: list[TimedWord]) -> list[TimedWord]:
    """Give each word of the text the times of the aligned word it matches (in order); a word
    with no aligned counterpart gets None for its times."""
    out = [TimedWord(w, None, None, None, None) for w in words]
    matcher = SequenceMatcher(a=words, b=[t.text for t in timed], autojunk=False)
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            out[block.a + i] = replace(timed[block.b + i])
    return out


def piece_decoder(tokenizer) -> Callable[[list[str]], str]:
    """SentencePiece pieces -> text, with the tokenizer's own decoder where it has one."""
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:
        return lambda pieces: sp.decode_pieces(list(pieces))
    return lambda pieces: "".join(pieces).replace("▁", " ").strip()


def chunk_frame_shifts(encoded_lens: Sequence[int], subsampling_factor: int = 8, overlap_frames: int = 100) -> list[int]:
    """Encoder-frame shift of each chunk: sum over earlier chunks of (enc_len * 8 - 100) // 8 (= enc_len - 13).

    overlap_frames is the 1 s overlap in 10 ms feature frames (NeMo hard-codes 100).
    """
    shifts, total = [], 0
    for k in range(len(encoded_lens)):
        if k > 0:
            total += (int(encoded_lens[k - 1]) * subsampling_factor - overlap_frames) // subsampling_factor
        shifts.append(total)
    return shifts


def join_chunk_chars(chunk_chars: Sequence[Sequence[TimedToken]], encoded_lens: Sequence[int],
                     merged_tokens: Sequence[int] | None = None, subsampling_factor: int = 8,
                     window_stride: float = 0.01, overlap_frames: int = 100) -> list[TimedToken]:
    """NeMo's `join_char_level_timestamps`: the chunks' tokens on one global timeline.

    With merged_tokens, a token is kept only if its id is the next merged token (a greedy cursor, which
    drops a chunk's leading overlap). Offsets are shifted by the chunk's frame shift; a start before the
    previous end is clamped to it (start and end). start/end = offset * window_stride * subsampling, unrounded.
    """
    shifts = chunk_frame_shifts(encoded_lens, subsampling_factor, overlap_frames)
    out: list[TimedToken] = []
    cursor = 0
    for shift, chars in zip(shifts, chunk_chars):
        for char in chars:
            if merged_tokens is not None and not (cursor < len(merged_tokens) and char.token_id == merged_tokens[cursor]):
                continue
            item = replace(char)
            if char.start_offset != -1:
                item.start_offset = char.start_offset + shift
            if char.end_offset != -1:
                item.end_offset = char.end_offset + shift
            if out and item.start_offset != -1 and item.start_offset < out[-1].end_offset:
                item.start_offset = item.end_offset = out[-1].end_offset
            item.start = -1 if item.start_offset == -1 else item.start_offset * window_stride * subsampling_factor
            item.end = -1 if item.end_offset == -1 else item.end_offset * window_stride * subsampling_factor
            out.append(item)
            cursor += 1
    return out


def words_from_chars(chars: Sequence[TimedToken], decode_pieces: Callable[[list[str]], str],
                     punctuation=PUNCTUATION) -> list[TimedWord]:
    """NeMo's `get_words_offsets` for BPE pieces (word delimiter ' ').

    A word starts at a piece whose text differs from its decoded char (it carries '▁'); `, . ! ?` attach to
    the word before them.
    """
    words: list[TimedWord] = []
    built: list[str] = []
    first = 0  # index of the built word's first token

    def close(last: int):
        words.append(TimedWord(decode_pieces(built), chars[first].start_offset, chars[last].end_offset,
                               chars[first].start, chars[last].end))

    for i, item in enumerate(chars):
        text, piece = item.char, item.token
        is_punct = bool(punctuation) and text in punctuation and text != " "
        nxt, k = None, i  # the next token's text that is not a bare space
        while not nxt and k < len(chars) - 1:
            k += 1
            nxt = chars[k].char if chars[k].char != " " else None
        starts_word = piece != text or (text == " " and nxt not in punctuation)
        if starts_word and not is_punct:
            if built:
                close(i - 1)
            built = []
            if text != " ":
                built.append(piece)
                first = i
        elif is_punct and not built and words:  # punctuation after a finished word: glue it on (end stays)
            words[-1].end_offset = item.end_offset
            if words[-1].text.endswith(" "):
                words[-1].text = words[-1].text[:-1]
            words[-1].text += text
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
            words.append(TimedWord(decode_pieces(built), chars[0].start_offset, chars[-1].end_offset,
                                   chars[0].start, chars[-1].end))
    else:
        words[0].start_offset, words[0].start = chars[0].start_offset, chars[0].start
        if built:
            close(len(chars) - 1)
    return words


def merge_chunk_timestamps(chunk_chars: Sequence[Sequence[TimedToken]], encoded_lens: Sequence[int],
                           merged_tokens: Sequence[int] | None, decode_pieces: Callable[[list[str]], str],
                           subsampling_factor: int = 8, window_stride: float = 0.01,
                           overlap_frames: int = 100) -> Timestamps:
    """The timestamp half of NeMo's `merge_parallel_chunks`: words and segments.

    chunk_chars: each chunk's tokens from the aligner (timestamp_type='char'), chunk-relative.
    decode_pieces: pieces -> text (SentencePiece decode_pieces / tokenizer.tokens_to_text).
    """
    chars = join_chunk_chars(chunk_chars, encoded_lens, merged_tokens, subsampling_factor, window_stride,
                             overlap_frames)
    words = words_from_chars(chars, decode_pieces)
    return Timestamps(words, segments_from_words(words))


# -- frame-token words (flash models): merged by time ------------------------------------------

def merge_by_time(rows: list[DecodedRow], frame_seconds: float) -> Transcript:
    """Each seam keeps the words whose centre lies on its own side of the overlap's middle; times
    and offsets move by the chunk's start, and stay monotonic across the seam."""
    frame_samples = round(frame_seconds * SAMPLE_RATE)
    words: list[TimedWord] = []
    for k, d in enumerate(rows):
        start = d.row.start
        shift = start / SAMPLE_RATE
        lo = -math.inf if k == 0 else (start + OVERLAP_SAMPLES / 2) / SAMPLE_RATE
        hi = math.inf if k + 1 == len(rows) else (rows[k + 1].row.start + OVERLAP_SAMPLES / 2) / SAMPLE_RATE
        for w in (d.transcript.timestamps and d.transcript.timestamps.words) or []:
            w = TimedWord(w.text, w.start_offset + start // frame_samples, w.end_offset + start // frame_samples,
                          w.start + shift, w.end + shift)
            if lo <= (w.start + w.end) / 2 < hi:
                if words and w.start < words[-1].end:
                    w.start, w.start_offset = words[-1].end, words[-1].end_offset
                    w.end, w.end_offset = max(w.end, w.start), max(w.end_offset, w.start_offset)
                words.append(w)
    segments = segments_from_words(words) if words else []
    return Transcript(" ".join(w.text for w in words), [t for d in rows for t in d.transcript.tokens],
                      timestamps=Timestamps(words, segments, []))


# -- hour segments -----------------------------------------------------------------------------

def join_hours(segments: list[Transcript], starts: list[float], frame_seconds: float) -> Transcript:
    """The hour segments of one item back into one transcript (NeMo's `merge_all_hypotheses`):
    texts joined by a space, token lists concatenated, timestamps shifted by the segment's start."""
    if len(segments) == 1:
        return segments[0]
    timestamps = [t.timestamps for t in segments] if any(t.timestamps is not None for t in segments) else None
    text, merged = merge_hour_results([t.text for t in segments], timestamps, starts, frame_seconds)
    return Transcript(text, [t for s in segments for t in s.tokens], timestamps=merged)


def merge_hour_results(texts: Sequence[str], timestamps: Sequence[Timestamps | None] | None,
                       starts: Sequence[float], frame_seconds: float = 0.08) -> tuple[str, Timestamps | None]:
    """NeMo's `merge_hypotheses_of_same_audio` for the hour windows <id>-0, <id>-1, ... of one file.

    Texts are stripped and joined with a space (empty ones skipped). Words and segments of window k get
    start/end += its start (k * 3600 s) and offsets += the frames before it, both only when not -1 or None.
    (NeMo shifts offsets by int(k * 3600 * 1000 / subsampling) = 450000 frames an hour, 10x the real
    45000 frames of 80 ms; we give the real frame index, so start == start_offset * frame_seconds.)
    """
    text = " ".join(t.strip() for t in texts if t)
    if timestamps is None:
        return text, None
    merged = Timestamps([], [])
    for seconds, ts in zip(starts, timestamps):
        if ts is None:
            continue
        frames = round(seconds / frame_seconds)
        for records, into in ((ts.words, merged.words), (ts.segments, merged.segments)):
            for record in records or []:
                record = replace(record)
                for name, shift in (("start", seconds), ("end", seconds), ("start_offset", frames),
                                    ("end_offset", frames)):
                    value = getattr(record, name)
                    if value is not None and value != -1:
                        setattr(record, name, value + shift)
                into.append(record)
    return text, merged
