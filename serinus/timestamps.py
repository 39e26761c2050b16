"""Timestamps: typed word, segment and token records, and the frame tokens of flash models.

The records are what alignment (serinus.align), frame-token parsing (below) and the chunk and
hour merges (serinus.pipeline.merge) pass between them. Offsets count encoder frames (80 ms),
times are seconds; -1 means "never visited" (NeMo's marker), None "no time known". Only at the
output are they turned into NeMo's dicts (`Timestamps.to_nemo`), with NeMo's keys in its order.

With `timestamp=yes` in the prompt a flash-style Canary decoder writes `<|n|> word <|m|>`
around each word, n and m being encoder frames. NeMo parses the decoded text with a regex; so do we.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEGMENT_DELIMITERS = (".", "?", "!")

_HAS_PAIR = re.compile(r"<\|\d+\|>.*?<\|\d+\|>")
_PAIR = re.compile(r"<\|(\d+)\|>(.*?)<\|(\d+)\|>")


@dataclass
class TimedToken:
    """One token of an aligned text (NeMo's "char" item)."""

    char: str  # its decoded text
    token_id: int
    token: str  # the SentencePiece piece, e.g. "▁The"
    start_offset: int
    end_offset: int
    start: float
    end: float

    def to_nemo(self) -> dict:
        return {"char": self.char, "token_id": self.token_id, "token": self.token, "start_offset": self.start_offset,
                "end_offset": self.end_offset, "start": self.start, "end": self.end}


@dataclass
class _TimedText:
    """A word or a segment with its frame offsets and seconds; NeMo names its text field by the kind."""

    text: str
    start_offset: int | None
    end_offset: int | None
    start: float | None
    end: float | None

    NEMO_KEY = ""

    def to_nemo(self) -> dict:
        return {self.NEMO_KEY: self.text, "start_offset": self.start_offset, "end_offset": self.end_offset,
                "start": self.start, "end": self.end}


class TimedWord(_TimedText):
    NEMO_KEY = "word"


class TimedSegment(_TimedText):
    NEMO_KEY = "segment"


KINDS = {"word": "words", "segment": "segments", "char": "tokens"}  # NeMo's key -> field


@dataclass
class Timestamps:
    """The timestamps of one text; a list left None was not made (its key is absent)."""

    words: list[TimedWord] | None = None
    segments: list[TimedSegment] | None = None
    tokens: list[TimedToken] | None = None

    def to_nemo(self, order=("word", "segment", "char")) -> dict[str, list[dict]]:
        """NeMo's {"word": [...], "segment": [...], "char": [...]}, keys in `order`."""
        out = {}
        for key in order:
            records = getattr(self, KINDS[key])
            if records is not None:
                out[key] = [r.to_nemo() for r in records]
        return out


def parse_timestamp_tokens(text: str, frame_seconds: float, window_stride: float | None = None) -> tuple[str, list[TimedWord] | None]:
    """Decoded text with frame tokens -> (text without them, words) or (text, None) when the
    text holds no frame-token pair. Times are offset x window_stride x subsampling, as NeMo
    computes them (so 5 frames give 0.4, not 0.4000000001)."""
    text = text.strip()
    if not _HAS_PAIR.search(text):
        return text, None
    words = []
    for match in _PAIR.finditer(text):
        content = match.group(2).strip()
        if not content:
            continue
        start, end = int(match.group(1)), int(match.group(3))
        words.append(TimedWord(content, start, end, frame_time(start, frame_seconds, window_stride),
                               frame_time(end, frame_seconds, window_stride)))
    return " ".join(w.text for w in words), words


def frame_time(offset: int, frame_seconds: float, window_stride: float | None = None) -> float:
    """offset x window_stride x subsampling in NeMo's order of operations (for identical floats)."""
    if window_stride is None:
        return offset * frame_seconds
    return offset * window_stride * round(frame_seconds / window_stride)


def frame_token_timestamps(text: str, frame_seconds: float, window_stride: float) -> tuple[str, Timestamps]:
    """A flash model's decoded text -> (plain text, its words and segments); NeMo recomputes the
    segments' times from their offsets."""
    text, words = parse_timestamp_tokens(text, frame_seconds, window_stride)
    segments = segments_from_words(words) if words else []
    for seg in segments:
        seg.start = frame_time(seg.start_offset, frame_seconds, window_stride)
        seg.end = frame_time(seg.end_offset, frame_seconds, window_stride)
    return text, Timestamps(words or [], segments, [])


def segments_from_words(words: list[TimedWord], delimiters=SEGMENT_DELIMITERS) -> list[TimedSegment]:
    """Group words into segments closed by a word ending in a delimiter (NeMo's rule)."""
    segments, current, first = [], [], 0
    for i, word in enumerate(words):
        current.append(word.text)
        if word.text and (word.text[-1] in delimiters or word.text in delimiters):
            segments.append(_segment(current, words[first], word))
            current, first = [], i + 1
    if current:
        segments.append(_segment(current, words[first], words[-1]))
    return segments


def _segment(texts: list[str], first: TimedWord, last: TimedWord) -> TimedSegment:
    return TimedSegment(" ".join(texts), first.start_offset, last.end_offset, first.start, last.end)
