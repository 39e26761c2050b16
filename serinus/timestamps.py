"""Word and segment timestamps from the frame tokens that flash-style Canary models emit.

With `timestamp=yes` in the prompt the decoder writes `<|n|> word <|m|>` around each word,
n and m being encoder frames (80 ms each). NeMo parses the decoded text with a regex; so do we.
"""

from __future__ import annotations

import re

SEGMENT_DELIMITERS = (".", "?", "!")

_HAS_PAIR = re.compile(r"<\|\d+\|>.*?<\|\d+\|>")
_PAIR = re.compile(r"<\|(\d+)\|>(.*?)<\|(\d+)\|>")


def parse_timestamp_tokens(text: str, frame_seconds: float, window_stride: float | None = None) -> tuple[str, list[dict]] | tuple[str, None]:
    """Decoded text with frame tokens -> (text without them, word items) or (text, None) when the
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
        words.append({"word": content, "start_offset": start, "end_offset": end,
                      "start": frame_time(start, frame_seconds, window_stride),
                      "end": frame_time(end, frame_seconds, window_stride)})
    return " ".join(w["word"] for w in words), words


def frame_time(offset: int, frame_seconds: float, window_stride: float | None = None) -> float:
    """offset x window_stride x subsampling in NeMo's order of operations (for identical floats)."""
    if window_stride is None:
        return offset * frame_seconds
    return offset * window_stride * round(frame_seconds / window_stride)


def segments_from_words(words: list[dict], delimiters=SEGMENT_DELIMITERS) -> list[dict]:
    """Group word items into segments closed by a word ending in a delimiter (NeMo's rule)."""
    segments, current, first = [], [], 0
    for i, word in enumerate(words):
        text = word["word"]
        current.append(text)
        if text and (text[-1] in delimiters or text in delimiters):
            segments.append(_segment(current, words[first], word))
            current, first = [], i + 1
    if current:
        segments.append(_segment(current, words[first], words[-1]))
    return segments


def _segment(texts: list[str], first: dict, last: dict) -> dict:
    seg = {"segment": " ".join(texts), "start_offset": first["start_offset"], "end_offset": last["end_offset"]}
    if "start" in first:
        seg["start"] = first["start"]
    if "end" in last:
        seg["end"] = last["end"]
    return seg
