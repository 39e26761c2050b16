"""Uploaded bytes -> float32 mono samples at 16 kHz, decoded in memory.

The bytes are never written under a name the client chose and no path the client sent is
opened: the file name only labels messages. soundfile reads wav/flac/ogg/mp3 from memory;
anything else goes through ffmpeg's stdin when ffmpeg is installed. Each way an upload can fail
(empty, cut off, not audio, no samples, NaN) raises `UploadError` saying which.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import numpy as np
import soundfile
import soxr

from serinus.audio import SAMPLE_RATE, AudioError, validate_audio

FFMPEG_TIMEOUT_S = 120


class UploadError(ValueError):
    """An upload that is not usable audio; the message says why (HTTP 400)."""


def display_name(filename: str | None) -> str:
    """The client's file name as messages show it: quoted, cut to a sane length."""
    name = filename or "upload"
    return repr(name if len(name) <= 80 else name[:77] + "...")


def decode_upload(data: bytes, filename: str | None = None) -> np.ndarray:
    """The upload's samples (float32 [N], 16 kHz, channels averaged)."""
    name = display_name(filename)
    if not data:
        raise UploadError(f"{name}: the uploaded file is empty (0 bytes)")
    _check_wav_complete(data, name)
    try:
        frames, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [N, C]
        samples = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        samples, sr = _decode_ffmpeg(data, name, reason=str(e).split(": ", 1)[-1]), SAMPLE_RATE
    if samples.size == 0:
        raise UploadError(f"{name}: the audio holds no samples (0 s)")
    try:
        samples = validate_audio(samples, name)  # NaN/inf
    except AudioError as e:
        raise UploadError(str(e)) from None
    if sr != SAMPLE_RATE:
        samples = soxr.resample(samples, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return samples


def _check_wav_complete(data: bytes, name: str) -> None:
    """A RIFF/WAVE upload whose data chunk declares more bytes than arrived was cut off in transit
    (libsndfile would quietly read what is there)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos, byte_rate = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk == b"fmt " and pos + 16 <= len(data):
            byte_rate = struct.unpack("<I", data[pos + 16 : pos + 20])[0] if pos + 20 <= len(data) else None
        if chunk == b"data":
            present = len(data) - pos - 8
            if size in (0, 0xFFFFFFFF) or present >= size:  # 0 / -1: length unknown (streamed wav)
                return
            if byte_rate:
                raise UploadError(f"{name}: truncated WAV: the header declares {size / byte_rate:.2f} s of audio "
                                  f"but only {present / byte_rate:.2f} s arrived")
            raise UploadError(f"{name}: truncated WAV: the header declares {size} data bytes but only {present} arrived")
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    raise UploadError(f"{name}: truncated WAV: the file ends before its 'data' chunk")


def _decode_ffmpeg(data: bytes, name: str, reason: str) -> np.ndarray:
    if shutil.which("ffmpeg") is None:
        raise UploadError(f"{name}: not audio this server can decode ({reason}); it reads wav, flac, ogg and mp3 "
                          "(and more once ffmpeg is installed on the server)")
    cmd = ["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"]
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UploadError(f"{name}: could not be decoded: {e}") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UploadError(f"{name}: not audio this server can decode (ffmpeg: {lines[-1] if lines else 'failed'})")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
