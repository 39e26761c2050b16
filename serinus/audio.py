"""Audio loading and the log-mel front end.

`load_audio` turns a file (or a span of it) into float32 mono samples at 16 kHz (soundfile,
or ffmpeg for compressed formats soundfile cannot read). `LogMel` reproduces NeMo 3.0.0's
`FilterbankFeatures` (the `preprocessor` of every Canary model) so that features match the
ones the checkpoints were trained on:

    dither (training only) -> pre-emphasis -> zero past length -> STFT (center, zero pad)
    -> |X| -> |X|^2 -> Slaney mel -> log(x + 2^-24) -> per-feature norm -> pad frames = 0
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
import torch.nn as nn

SAMPLE_RATE = 16000
NORM_EPS = 1e-5  # NeMo adds this to the per-feature std (CONSTANT in features.py)


class AudioError(ValueError):
    """Audio that cannot be loaded or used, with the reason and the file (or array) name."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def validate_audio(samples, name: str = "<array>") -> np.ndarray:
    """Check samples given directly and return them as contiguous float32 [N].

    Accepts numpy arrays, torch tensors and lists. Float input is taken as-is (expected range
    [-1, 1]); signed integer PCM (int16/int32) is scaled to [-1, 1) as soundfile does.
    """
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples)
    if samples.dtype.kind == "i":
        samples = samples.astype(np.float64) / float(2 ** (8 * samples.dtype.itemsize - 1))
    elif samples.dtype.kind != "f":
        raise AudioError(f"{name}: audio must be float (or signed int PCM) samples, got dtype {samples.dtype}")
    if samples.ndim != 1:
        raise AudioError(
            f"{name}: audio must be a 1-D mono array of samples, got shape {tuple(samples.shape)} "
            "(down-mix multi-channel audio first)"
        )
    if samples.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(f"{name}: audio contains {bad} NaN/inf sample(s)")
    return samples


def _decode_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    # ffmpeg does the down-mix and resampling itself; output is raw float32 little-endian.
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path),
           "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"]
    try:
        proc = subprocess.run(cmd, capture_output=True, check=False)
    except OSError as e:
        raise AudioError(f"{path}: could not run ffmpeg: {e}") from e
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioError(f"{path}: unreadable or corrupt audio (ffmpeg: {msg[-1] if msg else 'failed'})")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, start: int = 0,
               stop: int | None = None) -> np.ndarray:
    """Read an audio file as float32 mono samples [N] at `sample_rate`.

    soundfile reads wav/flac/ogg (and what else libsndfile knows); other formats (mp3, m4a,
    opus, ...) are decoded with `ffmpeg` when it is on PATH. Channels are averaged; a different
    rate is resampled with soxr 'HQ' (what librosa's default resampler uses).
    `start`/`stop` (samples at `sample_rate`) read only that span: soundfile seeks, so an hour of
    a 3-hour file costs an hour of memory; what ffmpeg decodes is decoded whole, then cut.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such audio file")
    if not path.is_file():
        raise AudioError(f"{path}: not a regular file")
    whole = start == 0 and stop is None
    try:
        if whole:
            data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)  # [N, C]
        else:
            sr = soundfile.info(str(path)).samplerate
            a, b = start * sr // sample_rate, None if stop is None else -(-stop * sr // sample_rate)
            data, _ = soundfile.read(str(path), start=a, stop=b, dtype="float32", always_2d=True)
        samples = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_error:
        if shutil.which("ffmpeg") is None:
            suffix = path.suffix.lower().lstrip(".")
            if suffix.upper() in soundfile.available_formats() or suffix in ("wav", "flac", "ogg", "oga"):
                raise AudioError(f"{path}: unreadable or corrupt audio file ({sf_error})") from sf_error
            raise AudioError(
                f"{path}: soundfile cannot decode this format ({path.suffix or 'no extension'}: {sf_error}); "
                "install ffmpeg (e.g. `apt install ffmpeg` or `brew install ffmpeg`) to read mp3/m4a/opus and "
                "other compressed audio"
            ) from sf_error
        samples, sr = _decode_ffmpeg(path, sample_rate)[start:stop], sample_rate
    if samples.size == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)")
    if sr != sample_rate:
        samples = soxr.resample(samples, sr, sample_rate, quality="HQ")
        if stop is not None:
            samples = samples[: stop - start]
    return validate_audio(samples, str(path))


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


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureConfig:
    """Log-mel settings; field names follow NeMo's AudioToMelSpectrogramPreprocessor."""

    sample_rate: int = SAMPLE_RATE
    window_size: float = 0.025  # seconds -> win_length = int(window_size * sample_rate)
    window_stride: float = 0.01  # seconds -> hop_length
    n_fft: int = 512
    n_mels: int = 128  # NeMo: `features`
    normalize: str | None = "per_feature"  # "per_feature", "all_features" or None
    dither: float = 1e-5  # only applied in training mode
    preemph: float | None = 0.97
    log_zero_guard_value: float = 2**-24
    log_zero_guard_type: str = "add"  # "add": log(x + g), "clamp": log(max(x, g))
    pad_to: int = 0
    pad_value: float = 0.0
    mag_power: float = 2.0
    lowfreq: float = 0.0
    highfreq: float | None = None  # None -> sample_rate / 2
    window: str = "hann"
    log: bool = True

    @property
    def win_length(self) -> int:
        return int(self.window_size * self.sample_rate)  # int() truncates, as NeMo does

    @property
    def hop_length(self) -> int:
        return int(self.window_stride * self.sample_rate)

    @classmethod
    def from_nemo(cls, cfg: dict) -> "FeatureConfig":
        """Build from a NeMo `preprocessor:` config section (a dict). Unknown keys are ignored."""
        cfg = dict(cfg)
        target = str(cfg.get("_target_", ""))
        if target and not target.endswith("AudioToMelSpectrogramPreprocessor"):
            raise ValueError(f"preprocessor config: unsupported preprocessor {target!r} "
                             "(need AudioToMelSpectrogramPreprocessor)")
        if int(cfg.get("frame_splicing", 1) or 1) != 1:
            raise ValueError(f"preprocessor config: frame_splicing={cfg['frame_splicing']} is not supported (need 1)")
        if cfg.get("exact_pad") or cfg.get("stft_exact_pad") or cfg.get("stft_conv"):
            raise ValueError("preprocessor config: exact_pad/stft_exact_pad/stft_conv are not supported")
        if cfg.get("use_torchaudio"):
            raise ValueError("preprocessor config: use_torchaudio=true (FilterbankFeaturesTA) is not supported")
        if cfg.get("mel_norm", "slaney") not in ("slaney",):
            raise ValueError(f"preprocessor config: mel_norm={cfg['mel_norm']!r} is not supported (need 'slaney')")

        out = cls()
        names = {f.name for f in fields(cls)}
        for key, value in cfg.items():
            if key in names and key not in ("n_mels", "window_size", "window_stride"):
                setattr(out, key, value)
        out.n_mels = int(cfg.get("features", cfg.get("nfilt", cfg.get("n_mels", out.n_mels))))
        out.sample_rate = int(out.sample_rate)
        # Window/hop may be given in seconds (usual) or in samples (n_window_size/n_window_stride).
        if cfg.get("window_size") is not None:
            out.window_size = float(cfg["window_size"])
        elif cfg.get("n_window_size") is not None:
            out.window_size = int(cfg["n_window_size"]) / out.sample_rate
        if cfg.get("window_stride") is not None:
            out.window_stride = float(cfg["window_stride"])
        elif cfg.get("n_window_stride") is not None:
            out.window_stride = int(cfg["n_window_stride"]) / out.sample_rate
        if cfg.get("n_fft") is None:  # NeMo: next power of two >= win_length
            out.n_fft = 2 ** math.ceil(math.log2(out.win_length))
        out.n_fft = int(out.n_fft)
        # PyYAML reads e.g. `1e-5` (no dot) as a string: coerce the numeric fields.
        for key in ("dither", "lowfreq", "mag_power", "pad_value"):
            setattr(out, key, _as_float(getattr(out, key), key))
        for key in ("preemph", "highfreq"):
            if getattr(out, key) is not None:
                setattr(out, key, _as_float(getattr(out, key), key))
        if out.log_zero_guard_value not in ("tiny", "eps"):
            out.log_zero_guard_value = _as_float(out.log_zero_guard_value, "log_zero_guard_value")
        # NeMo normalises only for these two strings; anything else ("NA", null, ...) means none.
        out.normalize = out.normalize if out.normalize in ("per_feature", "all_features") else None
        if isinstance(out.log_zero_guard_value, str):
            guard = {"tiny": torch.finfo(torch.float32).tiny, "eps": torch.finfo(torch.float32).eps}
            if out.log_zero_guard_value not in guard:
                raise ValueError(f"preprocessor config: log_zero_guard_value={out.log_zero_guard_value!r} "
                                 "must be a number, 'tiny' or 'eps'")
            out.log_zero_guard_value = guard[out.log_zero_guard_value]
        if out.log_zero_guard_type not in ("add", "clamp"):
            raise ValueError(f"preprocessor config: log_zero_guard_type={out.log_zero_guard_type!r} "
                             "must be 'add' or 'clamp'")
        if not isinstance(out.pad_to, int) or isinstance(out.pad_to, bool) or out.pad_to < 0:
            raise ValueError(f"preprocessor config: pad_to={out.pad_to!r} is not supported (need an int >= 0)")
        if out.window not in _WINDOWS:
            raise ValueError(f"preprocessor config: window={out.window!r} must be one of {sorted(_WINDOWS)}")
        return out


def _as_float(value, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"preprocessor config: {key}={value!r} is not a number") from None


_WINDOWS = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "bartlett": torch.bartlett_window,
    "none": None,
}


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mels = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Slaney-style mel filterbank [n_mels, n_fft//2 + 1] float32, equal to
    `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm='slaney')`."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)  # [F]
    mel_pts = np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)  # [n_mels + 2] triangle edges
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]  # [n_mels + 2, F]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # librosa stores the triangles in float32 before the area normalisation; keep that rounding.
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (hz_pts[2:] - hz_pts[:-2])  # slaney: each triangle has unit area
    return (weights * enorm[:, None]).astype(np.float32)


def feature_lengths(num_samples: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """Valid frame count per item (NeMo 3.0 get_seq_len): floor(N / hop) for even n_fft.

    The centred STFT yields one frame more; NeMo leaves that last frame out (zeroed, not normalised).
    """
    pad = (n_fft // 2) * 2
    return torch.div(num_samples.long() + pad - n_fft, hop_length, rounding_mode="floor").clamp(min=0)


class LogMel(nn.Module):
    """NeMo `FilterbankFeatures` (log-mel + normalisation) as a module without parameters."""

    def __init__(self, config: FeatureConfig | None = None):
        super().__init__()
        self.config = cfg = config or FeatureConfig()
        if cfg.win_length <= 0 or cfg.hop_length <= 0 or cfg.win_length > cfg.n_fft:
            raise ValueError(f"LogMel: bad window settings win_length={cfg.win_length} hop_length={cfg.hop_length} "
                             f"n_fft={cfg.n_fft} (need 0 < win_length <= n_fft, hop_length > 0)")
        window, fb = self._make_buffers()
        # Non-persistent: computed, not loaded, yet they follow .to(device).
        self.register_buffer("window", window, persistent=False)  # [win_length]
        self.register_buffer("fb", fb, persistent=False)  # [n_mels, n_fft//2 + 1]

    def _make_buffers(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        window_fn = _WINDOWS[cfg.window]
        # NeMo uses the symmetric (periodic=False) window of win_length; stft centres it in n_fft.
        # on the CPU even in a model built on the meta device (loading), where they are not loaded
        window = window_fn(cfg.win_length, periodic=False, device="cpu") if window_fn else torch.ones(cfg.win_length, device="cpu")
        fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.lowfreq, cfg.highfreq or None)
        return window.float().to(device), torch.from_numpy(fb).to(device)

    def _apply(self, fn, recurse=True):
        # Follow device moves, but stay float32 under model.half()/.to(bfloat16): features are
        # always computed in float32 (as NeMo does), and a half-precision filterbank costs ~0.1.
        super()._apply(fn, recurse)
        if self.fb.dtype != torch.float32 or self.window.dtype != torch.float32:
            self.window, self.fb = self._make_buffers(self.fb.device)
        return self

    FRAMES_PER_PIECE = 1024  # STFT frames computed at once (10 s at a 10 ms hop)

    def _log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """Padded samples [B, N'] -> log-mel [B, n_mels, T'] of the frames that fit in them (no centring)."""
        cfg = self.config
        spec = torch.stft(
            x, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
            window=self.window.float(), center=False, return_complex=True,
        )  # [B, F, T'] complex
        # NeMo's exact op order: sqrt(re^2 + im^2), then ^mag_power (not |X|^2 directly).
        mag = torch.view_as_real(spec).pow(2).sum(-1).sqrt()  # [B, F, T']
        if cfg.mag_power != 1.0:
            mag = mag.pow(cfg.mag_power)
        feats = torch.matmul(self.fb.float(), mag)  # [n_mels, F] @ [B, F, T'] -> [B, n_mels, T']
        if cfg.log:
            if cfg.log_zero_guard_type == "add":
                feats = torch.log(feats + cfg.log_zero_guard_value)
            else:
                feats = torch.log(feats.clamp(min=cfg.log_zero_guard_value))
        return feats

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, N] float, lengths [B] (valid samples) -> (features [B, n_mels, T], frames [B]).

        T = N // hop + 1 (the centred STFT); frames[b] = lengths[b] // hop are valid, the rest
        hold pad_value. Each item depends only on its own first lengths[b] samples.
        """
        cfg = self.config
        if audio.dim() != 2:
            raise ValueError(f"LogMel: audio must be [B, N], got shape {tuple(audio.shape)}")
        if lengths.shape != audio.shape[:1]:
            raise ValueError(f"LogMel: lengths must be [B]={audio.shape[0]}, got shape {tuple(lengths.shape)}")
        x = audio.float()  # [B, N]; always float32, as NeMo (autocast off), even if the model is half
        lengths = lengths.to(x.device)
        frames = feature_lengths(lengths, cfg.n_fft, cfg.hop_length)  # [B]

        if self.training and cfg.dither > 0:
            x = x + cfg.dither * torch.randn_like(x)
        if cfg.preemph is not None:
            x = torch.cat((x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]), dim=1)
        # Zero everything past each length so padding from other items cannot leak into the STFT.
        time_mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # [B, N]
        x = x.masked_fill(~time_mask, 0.0)

        # The centred STFT as NeMo computes it, in pieces of frames: a long input's spectrum is never
        # held whole (a 77 s clip's complex spectrum and its magnitudes are ~50 MB at once otherwise).
        # Each frame's FFT sees only its own samples, so the pieces are the frames of the whole (the
        # filterbank product may round differently per piece width: some BLAS pick kernels by shape).
        pad = cfg.n_fft // 2
        x = nn.functional.pad(x, (pad, pad))
        n_frames = (x.shape[1] - cfg.n_fft) // cfg.hop_length + 1
        pieces = []
        for j0 in range(0, n_frames, self.FRAMES_PER_PIECE):
            j1 = min(j0 + self.FRAMES_PER_PIECE, n_frames)
            pieces.append(self._log_mel(x[:, j0 * cfg.hop_length : (j1 - 1) * cfg.hop_length + cfg.n_fft]))
        feats = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)  # [B, n_mels, T]

        valid = torch.arange(feats.shape[-1], device=x.device)[None, :] < frames[:, None]  # [B, T]
        if cfg.normalize == "per_feature":
            n = valid.sum(dim=1).to(feats.dtype)[:, None]  # [B, 1]
            mean = torch.where(valid[:, None], feats, 0.0).sum(dim=2) / n.clamp(min=1)  # [B, n_mels]
            sq = torch.where(valid[:, None], feats - mean[:, :, None], 0.0) ** 2
            # Unbiased (n-1) std; a single valid frame gives std 0 (NeMo: NaN -> 0), then + eps.
            std = torch.sqrt(sq.sum(dim=2) / (n - 1.0).clamp(min=1)) + NORM_EPS  # [B, n_mels]
            feats = (feats - mean[:, :, None]) / std[:, :, None]
        elif cfg.normalize == "all_features":
            v = valid[:, None].expand_as(feats)
            n = (frames * feats.shape[1]).to(feats.dtype)  # [B]
            mean = torch.where(v, feats, 0.0).sum(dim=(1, 2)) / n.clamp(min=1)
            sq = torch.where(v, feats - mean[:, None, None], 0.0) ** 2
            std = torch.sqrt(sq.sum(dim=(1, 2)) / (n - 1.0).clamp(min=1)) + NORM_EPS
            feats = (feats - mean[:, None, None]) / std[:, None, None]

        feats = feats.masked_fill(~valid[:, None], cfg.pad_value)
        if cfg.pad_to > 0 and feats.shape[-1] % cfg.pad_to:
            feats = nn.functional.pad(feats, (0, cfg.pad_to - feats.shape[-1] % cfg.pad_to), value=cfg.pad_value)
        return feats, frames


def collate_audio(samples, device="cpu", length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad 1-D clips (arrays or tensors) into a float32 batch [B, max(length, longest)] with
    their lengths [B]."""
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.long)
    batch = torch.zeros(len(samples), max(int(lengths.max()), length or 0), dtype=torch.float32)
    for i, s in enumerate(samples):
        batch[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.float32))
    return batch.to(device), lengths.to(device)
