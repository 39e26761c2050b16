"""Writing transcription results: txt, jsonl, srt and vtt, as they complete, with resume.

    txt    AUDIO_PATH<TAB>TEXT per input
    jsonl  the manifest line (or {"audio_filepath", "duration"}) + "pred_text" (NeMo's key)
    srt    SubRip cues from segment timestamps, one file per input
    vtt    WebVTT, likewise

Each result is written (and flushed) the moment its file is done, so an interrupted run keeps
what it finished. `resume=True` reads what the output already holds and skips those inputs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FORMATS = ("txt", "jsonl", "srt", "vtt")


class OutputError(ValueError):
    """An output that cannot be written as asked (bad path, format/input mismatch)."""


def format_from_path(path: str | None) -> str:
    """txt unless the output's extension names another format."""
    suffix = Path(path).suffix.lower() if path else ""
    return {".jsonl": "jsonl", ".json": "jsonl", ".srt": "srt", ".vtt": "vtt"}.get(suffix, "txt")


def _offset(item) -> object:
    entry = item.entry or {}
    return entry.get("offset") if entry.get("offset") not in (None, 0, 0.0) else None


def txt_key(item) -> str:
    """How a txt line names its input: the audio path (@offset for a manifest span)."""
    offset = _offset(item)
    return item.name if offset is None else f"{item.name}@{offset}"


def jsonl_key(record: dict) -> tuple:
    return (str(record.get("audio_filepath")), record.get("offset") if record.get("offset") not in (0, 0.0) else None)


def jsonl_record(item, hyp) -> dict:
    """The manifest line with every field kept, plus pred_text (and word/segment timestamps)."""
    if item.entry is not None:
        record = dict(item.entry)
    else:
        record = {"audio_filepath": item.name, "duration": round(item.duration, 4)}
    record["pred_text"] = hyp.text
    for key in ("word", "segment"):
        if hyp.timestamp and hyp.timestamp.get(key) is not None:
            record[key] = hyp.timestamp[key]
    if hyp.warnings:
        record["warnings"] = hyp.warnings
    return record


def format_time(seconds: float, fmt: str) -> str:
    """HH:MM:SS,mmm (srt) or HH:MM:SS.mmm (vtt)."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{',' if fmt == 'srt' else '.'}{ms:03d}"


def subtitles(hyp, fmt: str) -> str:
    """srt/vtt text of a hypothesis' segment timestamps. Raises OutputError when there are none
    for a non-empty text."""
    segments = (hyp.timestamp or {}).get("segment") or []
    if not segments and hyp.text.strip():
        raise OutputError("no segment timestamps for this text (transcribe with timestamps, or use txt/jsonl)")
    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    for n, seg in enumerate(segments, 1):
        if fmt == "srt":
            lines.append(str(n))
        lines.append(f"{format_time(seg['start'], fmt)} --> {format_time(seg['end'], fmt)}")
        lines += [seg["segment"].strip(), ""]
    return "\n".join(lines)


class Writer:
    """Writes results as they come; knows which inputs an earlier run already wrote."""

    def __init__(self, path: str | None, fmt: str, items: list, resume: bool = False):
        if fmt not in FORMATS:
            raise OutputError(f"unknown output format {fmt!r}; formats: {', '.join(FORMATS)}")
        self.fmt, self.path, self.resume = fmt, Path(path) if path else None, resume
        self.done_keys: set = set()
        self.stream = None
        self.subtitle_paths: dict[str, Path | None] = {}  # txt_key -> file (None: stdout)
        if fmt in ("srt", "vtt"):
            self._open_subtitles(items)
        elif self.path is None:
            self.stream = sys.stdout
        else:
            if self.path.is_dir():
                raise OutputError(f"{self.path}: is a folder; --format {fmt} writes one file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume and self.path.is_file():
                self.done_keys = self._read_done()
                self.stream = open(self.path, "a", encoding="utf-8")
            else:
                self.stream = open(self.path, "w", encoding="utf-8")

    # -- subtitles: one file per input
    def _open_subtitles(self, items: list) -> None:
        if self.path is None or (len(items) == 1 and self.path.suffix.lower() == f".{self.fmt}"):
            if len(items) != 1:
                raise OutputError(f"--format {self.fmt} writes one file per input: give a folder with --output")
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.subtitle_paths = {txt_key(items[0]): self.path}
            return
        if self.path.is_file():
            raise OutputError(f"{self.path}: is a file; --format {self.fmt} with several inputs needs a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        stems: dict[str, int] = {}
        for item in items:
            stem = Path(item.name).stem or "audio"
            stems[stem] = stems.get(stem, 0) + 1
        for n, item in enumerate(items):
            stem = Path(item.name).stem or "audio"
            name = stem if stems[stem] == 1 else f"{stem}-{n}"  # the input's position tells same-named files apart
            self.subtitle_paths.setdefault(txt_key(item), self.path / f"{name}.{self.fmt}")

    def _subtitle_path(self, item) -> Path | None:
        return self.subtitle_paths.get(txt_key(item))

    # -- resume
    def _read_done(self) -> set:
        """Keys of the results already in the output; a last line cut off mid-write is removed."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        keys = set()
        for line in data.decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            if self.fmt == "txt":
                keys.add(line.split("\t", 1)[0])
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "pred_text" in record:
                    keys.add(jsonl_key(record))
        return keys

    def _key(self, item):
        if self.fmt == "txt":
            return txt_key(item)
        return jsonl_key(jsonl_record(item, _Empty))

    def is_done(self, item) -> bool:
        if item.error is not None:
            return False
        if self.fmt in ("srt", "vtt"):
            path = self._subtitle_path(item)
            return self.resume and path is not None and path.is_file()
        return self._key(item) in self.done_keys

    # -- writing
    def write(self, item, hyp) -> str | None:
        """Write one result; returns an error message instead when it cannot be written."""
        if self.fmt == "txt":
            text = " ".join(hyp.text.split())
            self._line(f"{txt_key(item)}\t{text}")
        elif self.fmt == "jsonl":
            self._line(json.dumps(jsonl_record(item, hyp), ensure_ascii=False))
        else:
            try:
                content = subtitles(hyp, self.fmt)
            except OutputError as e:
                return f"{item.label}: {e}"
            path = self._subtitle_path(item)
            if path is None:
                sys.stdout.write(content + "\n")
                sys.stdout.flush()
            else:
                tmp = path.with_name(path.name + ".part")  # renamed when complete: resume trusts whole files only
                tmp.write_text(content + "\n", encoding="utf-8")
                os.replace(tmp, path)
        return None

    def _line(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.stream is not sys.stdout:
            self.stream.close()
        self.stream = None


class _Empty:
    text = ""
    timestamp: dict = {}
    warnings: list = []


def open_writer(path: str | None, fmt: str, items: list, resume: bool = False) -> Writer:
    return Writer(path, fmt, items, resume)
