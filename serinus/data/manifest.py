"""NeMo JSONL manifests: read, validate, write, build from LibriSpeech trees, convert to lhotse.

One JSON object per line:

    {"audio_filepath": "audio/en/x.flac", "duration": 2.2, "text": "Hi.", "source_lang": "en",
     "target_lang": "en", "pnc": "yes", ...}

A relative `audio_filepath` is resolved against the manifest's folder (as NeMo does). Every key
other than `audio_filepath`, `duration`, `offset` and `text` is kept: prompt slots (`source_lang`,
`target_lang`, `pnc`, `itn`, `timestamp`, `decodercontext`, or a new one like `summarize`) and
metadata alike. Bad lines raise `ManifestError("file:line: what is wrong")`; with
`skip_invalid=True` they are skipped, counted, and listed in `Manifest.skipped` instead.

CLI: `serinus manifest build ROOT OUT` and `serinus manifest check MANIFEST`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# Keys with a meaning of their own; everything else is an "extra" (prompt slot or metadata).
CORE_KEYS = ("audio_filepath", "duration", "offset", "text")
LANG_KEYS = ("source_lang", "target_lang", "lang")
# A manifest duration may differ this much from the real file length (rounding in manifests).
DURATION_TOLERANCE = 0.1


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message starts with `file:line:`."""


@dataclass
class ManifestEntry:
    audio_filepath: str  # absolute path (relative ones are resolved against the manifest's folder)
    duration: float | None  # None only where it may be left out (require_duration=False)
    text: str | None = None
    # seconds into the file; None: the whole file. NeMo reads [offset, offset + duration] wherever the key
    # is given, 0 included, and the whole file where it is not (its duration then only describes it)
    offset: float | None = None
    extra: dict = field(default_factory=dict)  # every other key, in file order: slots and metadata
    where: str = ""  # "manifest.jsonl:12", used in error messages downstream
    line: dict | None = field(default=None, repr=False, compare=False)  # the JSON object as read

    @property
    def lang(self) -> str | None:
        """Language of `text`: `target_lang` (what Canary's tokenizer keys on), else `lang`."""
        return self.extra.get("target_lang") or self.extra.get("lang")

    def to_dict(self, relative_to: str | os.PathLike | None = None) -> dict:
        """The JSON object for this entry; `audio_filepath` relative to `relative_to` when inside it."""
        path = self.audio_filepath
        if relative_to is not None:
            rel = os.path.relpath(path, relative_to)
            if not rel.startswith(".."):
                path = rel
        out = {"audio_filepath": path, "duration": self.duration}
        if self.offset is not None:
            out["offset"] = self.offset
        if self.text is not None:
            out["text"] = self.text
        out.update(self.extra)
        return out


@dataclass
class Manifest:
    path: Path
    entries: list[ManifestEntry]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" of lines left out (skip_invalid)
    num_lines: int = 0  # non-blank lines read

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ManifestEntry]:
        return iter(self.entries)

    def __getitem__(self, i: int) -> ManifestEntry:
        return self.entries[i]

    @property
    def total_duration(self) -> float:
        return sum(e.duration for e in self.entries)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_line(
    line: str,
    where: str,
    base_dir: Path,
    langs: Iterable[str] | None = None,
    require_text: bool = True,
    check_audio: bool = True,
    require_duration: bool = True,
) -> ManifestEntry:
    """Validate one manifest line and return its entry; raises `ManifestError` naming `where`.
    (Transcription manifests may leave out `duration` and `text`: the audio says how long it is.)"""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(item).__name__}")
    required = ("audio_filepath",) + (("duration",) if require_duration else ()) + (("text",) if require_text else ())
    missing = [k for k in required if k not in item]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    audio = item["audio_filepath"]
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"{where}: audio_filepath must be a non-empty string, got {audio!r}")
    duration = item.get("duration")
    if duration is not None or require_duration:
        if not _is_number(duration):
            raise ManifestError(f"{where}: duration must be a number of seconds, got {duration!r}")
        if duration <= 0:
            raise ManifestError(f"{where}: duration must be positive, got {duration!r}")
    offset = item.get("offset")
    if offset is not None and (not _is_number(offset) or offset < 0):
        raise ManifestError(f"{where}: offset must be a non-negative number of seconds, got {offset!r}")
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise ManifestError(f"{where}: text must be a string, got {type(text).__name__}")
    path = Path(audio).expanduser()
    if not path.is_absolute():
        path = Path(os.path.normpath(base_dir / path))
    if check_audio and not path.is_file():
        raise ManifestError(f"{where}: audio file not found: {path}")
    if langs is not None:
        langs = set(langs)
        for key in LANG_KEYS:
            value = item.get(key)
            if value is not None and value not in langs:
                raise ManifestError(f"{where}: unknown language {key}={value!r} (known: {', '.join(sorted(langs))})")
    extra = {k: v for k, v in item.items() if k not in CORE_KEYS}
    return ManifestEntry(str(path), None if duration is None else float(duration), text,
                         None if offset is None else float(offset), extra, where, item)


def iter_manifest(
    path: str | os.PathLike,
    langs: Iterable[str] | None = None,
    *,
    require_text: bool = True,
    check_audio: bool = True,
    skip_invalid: bool = False,
    skipped: list[str] | None = None,
) -> Iterator[ManifestEntry]:
    """Lazily yield validated entries. With `skip_invalid`, bad lines are appended to `skipped`."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    base_dir = Path(os.path.abspath(path)).parent  # the manifest's folder, as NeMo joins it (symlinks kept)
    langs = None if langs is None else set(langs)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines carry no entry (NeMo skips them too)
            where = f"{path}:{lineno}"
            try:
                yield parse_line(line, where, base_dir, langs, require_text, check_audio)
            except ManifestError as e:
                if not skip_invalid:
                    raise
                if skipped is not None:
                    skipped.append(str(e))


def read_manifest(
    path: str | os.PathLike,
    langs: Iterable[str] | None = None,
    *,
    require_text: bool = True,
    check_audio: bool = True,
    skip_invalid: bool = False,
) -> Manifest:
    """Read and validate a whole manifest. Bad lines raise, unless `skip_invalid` (then see `.skipped`)."""
    skipped: list[str] = []
    entries = list(
        iter_manifest(
            path, langs, require_text=require_text, check_audio=check_audio, skip_invalid=skip_invalid, skipped=skipped
        )
    )
    manifest = Manifest(Path(path), entries, skipped, len(entries) + len(skipped))
    if skipped:
        print(
            f"{path}: skipped {len(skipped)} invalid line(s) of {manifest.num_lines}; first: {skipped[0]}",
            file=sys.stderr,
        )
    return manifest


def write_manifest(path: str | os.PathLike, entries: Iterable[ManifestEntry | dict], relative: bool = True) -> Path:
    """Write entries as JSONL. With `relative`, audio paths under the manifest's folder become relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.abspath(path)).parent if relative else None
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            item = e.to_dict(base) if isinstance(e, ManifestEntry) else e
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# LibriSpeech / LibriLight trees


def build_librispeech_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    lowercase: bool = True,
    lang: str = "en",
    pnc: str | None = None,
) -> Manifest:
    """Manifest for a tree of `*.trans.txt` files (`<utt-id> <TRANSCRIPT>` lines) next to `<utt-id>.flac`.

    Like the Canary tutorial's `build_manifest`: durations are read from the audio headers, text is
    lower-cased unless `lowercase=False`, and `pnc` defaults to "no" for lower-cased text, "yes"
    otherwise (LibriSpeech transcripts have no punctuation, so "no" is usually right).
    """
    import soundfile

    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder")
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise ManifestError(f"{root}: no *.trans.txt transcript files found")
    pnc = pnc if pnc is not None else ("no" if lowercase else "yes")
    entries, listed = [], set()
    for tf in trans_files:
        with open(tf, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{tf}:{lineno}"
                utt_id, _, text = line.strip().partition(" ")
                text = " ".join(text.split())
                if not text:
                    raise ManifestError(f"{where}: no transcript after utterance id {utt_id!r}")
                audio = tf.parent / f"{utt_id}.flac"
                if not audio.is_file():
                    raise ManifestError(f"{where}: audio file not found: {audio}")
                try:
                    info = soundfile.info(str(audio))
                except Exception as e:  # soundfile raises its own error types
                    raise ManifestError(f"{where}: cannot read audio {audio}: {e}") from None
                listed.add(audio.resolve())
                extra = {"source_lang": lang, "target_lang": lang, "pnc": pnc, "lang": lang}
                duration = info.frames / info.samplerate
                text = text.lower() if lowercase else text
                entries.append(ManifestEntry(str(audio.resolve()), duration, text, None, extra, where))
    unlisted = [p for p in root.rglob("*.flac") if p.resolve() not in listed]
    if unlisted:
        print(
            f"{root}: {len(unlisted)} .flac file(s) have no transcript line and were not added, e.g. {unlisted[0]}",
            file=sys.stderr,
        )
    write_manifest(out, entries)
    return Manifest(out, entries, [], len(entries))


# ---------------------------------------------------------------------------------------------
# lhotse


def entry_to_cut(entry: ManifestEntry, cut_id: str, recordings: dict | None = None):
    """A lhotse MonoCut pointing at the audio file (nothing is copied or decoded).

    The supervision holds the text, its language (`target_lang`, else `lang`) and every extra
    field as custom fields, so prompt slots travel with the cut; `cut.origin` is "file:line".
    Without an offset the cut spans the whole file; with one (0 included) it spans [offset, offset +
    duration], as NeMo's lhotse reader does.
    """
    from lhotse import MonoCut, Recording, SupervisionSegment

    rec = recordings.get(entry.audio_filepath) if recordings is not None else None
    if rec is None:
        try:
            rec = Recording.from_file(entry.audio_filepath, recording_id=Path(entry.audio_filepath).stem)
        except Exception as e:
            raise ManifestError(f"{entry.where}: cannot read audio {entry.audio_filepath}: {e}") from None
        if recordings is not None:
            recordings[entry.audio_filepath] = rec
    if entry.offset is not None:
        start = entry.offset
        duration = rec.duration - start if entry.duration is None else entry.duration
        if start + duration > rec.duration + DURATION_TOLERANCE:
            raise ManifestError(
                f"{entry.where}: offset+duration {start + duration:.3f}s is past the end of the audio "
                f"({rec.duration:.3f}s)"
            )
        duration = min(duration, rec.duration - start)
    else:
        start, duration = 0.0, rec.duration
        if abs(entry.duration - rec.duration) > DURATION_TOLERANCE:
            raise ManifestError(
                f"{entry.where}: duration {entry.duration}s does not match the audio file ({rec.duration:.3f}s)"
            )
    sup = SupervisionSegment(
        id=cut_id,
        recording_id=rec.id,
        start=0.0,
        duration=duration,
        channel=0,
        text=entry.text,
        language=entry.lang,
        custom=dict(entry.extra) or None,
    )
    return MonoCut(
        id=cut_id, start=start, duration=duration, channel=0, recording=rec, supervisions=[sup],
        custom={"origin": entry.where},
    )


def manifest_to_cuts(
    manifest: Manifest | str | os.PathLike,
    langs: Iterable[str] | None = None,
    skip_invalid: bool = False,
    id_prefix: str | None = None,
):
    """lhotse CutSet for a manifest (validated first).

    Cut ids are `<id_prefix>-<line number>`, the prefix defaulting to the manifest's name without
    extension ("asr_train-12"); give distinct prefixes when combining manifests of the same name.
    """
    from lhotse import CutSet

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest, langs, skip_invalid=skip_invalid)
    prefix = id_prefix if id_prefix is not None else manifest.path.name.split(".")[0]
    recordings: dict = {}  # one Recording per audio file (AST manifests repeat each file)
    cuts = []
    for e in manifest:
        line = e.where.rpartition(":")[2]
        cuts.append(entry_to_cut(e, f"{prefix}-{line}", recordings))
    return CutSet.from_cuts(cuts)


def manifests_to_cuts(manifests: Iterable[Manifest | str | os.PathLike], langs: Iterable[str] | None = None):
    """One CutSet for several manifests, with unique cut ids: `<name>-<line>`, or
    `<folder>-<name>-<line>` where names repeat (e.g. synth-v1/asr_train and synth-v1-large/asr_train)."""
    from lhotse import CutSet

    manifests = [m if isinstance(m, Manifest) else read_manifest(m, langs) for m in manifests]
    names = [m.path.name.split(".")[0] for m in manifests]
    prefixes = [
        n if names.count(n) == 1 else f"{Path(os.path.abspath(m.path)).parent.name}-{n}"
        for m, n in zip(manifests, names)
    ]
    if len(set(prefixes)) < len(prefixes):
        prefixes = [f"{i}-{n}" for i, n in enumerate(names)]
    return CutSet.from_cuts(c for m, p in zip(manifests, prefixes) for c in manifest_to_cuts(m, id_prefix=p))


def write_shar(cuts, out_dir: str | os.PathLike, shard_size: int = 1000, audio_format: str = "flac") -> dict:
    """Write cuts as lhotse Shar shards (cuts.NNNNNN.jsonl.gz + recording.NNNNNN.tar).

    Shar packs the audio into tar shards for sequential reads on large datasets; flac keeps it lossless.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return cuts.to_shar(out_dir, fields={"recording": audio_format}, shard_size=shard_size)


# ---------------------------------------------------------------------------------------------
# CLI


def check_report(
    path: str | os.PathLike, langs: Iterable[str] | None = None, check_audio: bool = True
) -> tuple[Manifest, str]:
    """Validate every line (never stopping at the first error); returns the manifest and a report."""
    m = read_manifest(path, langs, check_audio=check_audio, skip_invalid=True)
    lines = [f"{path}: {len(m)} valid entries of {m.num_lines} lines, {m.total_duration / 3600:.2f} h"]
    if m.entries:
        durs = sorted(e.duration for e in m.entries)
        lines.append(f"  duration: min {durs[0]:.2f}s, median {durs[len(durs) // 2]:.2f}s, max {durs[-1]:.2f}s")
        counts: dict[str, int] = {}
        for e in m.entries:
            key = f"{e.extra.get('source_lang', '?')}->{e.extra.get('target_lang', '?')}"
            counts[key] = counts.get(key, 0) + 1
        lines.append("  languages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if m.skipped:
        lines.append(f"  {len(m.skipped)} invalid line(s):")
        lines += [f"    {s}" for s in m.skipped]
    return m, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serinus manifest", description="Build and check NeMo JSONL manifests.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="Manifest from a LibriSpeech/LibriLight tree (*.trans.txt next to .flac).")
    b.add_argument("root")
    b.add_argument("out")
    case = b.add_mutually_exclusive_group()
    case.add_argument(
        "--lowercase", dest="lowercase", action="store_true", default=True, help="lower-case text (default)"
    )
    case.add_argument("--keep-case", dest="lowercase", action="store_false", help="keep the transcript's case")
    b.add_argument("--pnc", choices=["yes", "no"], help="pnc slot (default: no with --lowercase, yes with --keep-case)")
    b.add_argument("--lang", default="en")
    c = sub.add_parser("check", help="Validate a manifest and report every bad line.")
    c.add_argument("manifest")
    c.add_argument("--langs", nargs="+", help="known languages; others are errors")
    c.add_argument("--no-audio-check", action="store_true", help="do not check that audio files exist")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            m = build_librispeech_manifest(args.root, args.out, lowercase=args.lowercase, lang=args.lang, pnc=args.pnc)
            print(f"{args.out}: {len(m)} entries, {m.total_duration / 3600:.2f} h")
            return 0
        m, report = check_report(args.manifest, args.langs, check_audio=not args.no_audio_check)
        print(report)
        return 1 if m.skipped else 0
    except ManifestError as e:
        print(f"serinus manifest: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
