"""Response bodies in OpenAI's audio formats: json, text, srt, vtt, verbose_json.

Segment and word times come from the hypothesis' timestamps (`transcribe(timestamps=True)`);
for a checkpoint that cannot give timestamps, the whole clip is one segment. OpenAI's
per-segment decoding statistics (avg_logprob, compression_ratio, no_speech_prob, temperature)
have no Canary counterpart: they are 0.0, present so that clients parsing them keep working.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from serinus.decoding import Hypothesis
from serinus.output import subtitles

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
               "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}
NEEDS_SEGMENTS = ("srt", "vtt", "verbose_json")


def segments_of(hyp: Hypothesis, duration: float) -> list[dict]:
    """The hypothesis' segments ({segment, start, end}); the whole clip when it has none."""
    segments = (hyp.timestamp or {}).get("segment")
    if segments:
        return segments
    return [{"segment": hyp.text.strip(), "start": 0.0, "end": duration}] if hyp.text.strip() else []


def _seconds(value) -> float | None:
    return None if value is None else round(float(value), 3)


def verbose_json(hyp: Hypothesis, duration: float, language: str, task: str, words: bool) -> dict:
    body = {
        "task": task,
        "language": language,
        "duration": round(duration, 3),
        "text": hyp.text,
        "segments": [
            {"id": n, "seek": 0, "start": _seconds(seg["start"]), "end": _seconds(seg["end"]),
             "text": seg["segment"], "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
             "compression_ratio": 0.0, "no_speech_prob": 0.0}
            for n, seg in enumerate(segments_of(hyp, duration))
        ],
    }
    if words:
        body["words"] = [{"word": w["word"], "start": _seconds(w["start"]), "end": _seconds(w["end"])}
                         for w in (hyp.timestamp or {}).get("word") or []]
    body["usage"] = {"type": "duration", "seconds": round(duration, 3)}
    return body


def render(hyp: Hypothesis, fmt: str, duration: float, language: str, task: str, words: bool = False) -> tuple[str, str]:
    """(body, media type) of one result in response format `fmt`."""
    if fmt == "json":
        body = json.dumps({"text": hyp.text, "usage": {"type": "duration", "seconds": round(duration, 3)}},
                          ensure_ascii=False)
    elif fmt == "text":
        body = hyp.text + "\n"
    elif fmt in ("srt", "vtt"):
        body = subtitles(SimpleNamespace(text=hyp.text, timestamp={"segment": segments_of(hyp, duration)}), fmt) + "\n"
    elif fmt == "verbose_json":
        body = json.dumps(verbose_json(hyp, duration, language, task, words), ensure_ascii=False)
    else:
        raise ValueError(f"unknown response format {fmt!r}")
    return body, MEDIA_TYPES[fmt]
