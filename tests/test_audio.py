"""Audio loading and log-mel features against NeMo 3.0.0's FilterbankFeatures outputs."""

import json
import os
import stat

import numpy as np
import pytest
import soundfile
import torch
import yaml

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus.audio import AudioError, FeatureConfig, LogMel, load_audio, mel_filterbank, validate_audio
from serinus.weights import extract_nemo

META = json.loads((REFERENCE / "tiny_canary2" / "encoder_meta.json").read_text())
CLIPS = META["clips"]
# NeMo's float32 STFT/log vs ours differ only by rounding (~5e-5 worst case in near-silent
# low mel bins, ~5e-7 on average); a real bug (window, mel, norm, lengths) is >1e-2.
ATOL, MEAN_ATOL = 2e-4, 2e-6


@pytest.fixture(scope="module")
def ref():
    return np.load(REFERENCE / "features.npz")


@pytest.fixture(scope="module")
def logmel():
    cfg = yaml.safe_load((REFERENCE / "tiny_canary2" / "model_config.yaml").read_text())["preprocessor"]
    return LogMel(FeatureConfig.from_nemo(cfg)).eval()


@pytest.fixture(scope="module")
def nemo_state(tmp_path_factory):
    dest = extract_nemo(FIXTURES / "tiny_canary2.nemo", tmp_path_factory.mktemp("tiny_canary2"))
    return torch.load(dest / "model_weights.ckpt", weights_only=True)


def _assert_close(ours: np.ndarray, theirs: np.ndarray, what: str):
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    err = np.abs(ours - theirs)
    assert err.max() < ATOL and err.mean() < MEAN_ATOL, f"{what}: max abs err {err.max():.3g}, mean {err.mean():.3g}"


# --- FeatureConfig --------------------------------------------------------------------------


def test_config_from_nemo_matches_featurizer(logmel):
    cfg, fz = logmel.config, META["featurizer"]
    assert (cfg.win_length, cfg.hop_length, cfg.n_fft, cfg.n_mels) == (
        fz["win_length"], fz["hop_length"], fz["n_fft"], fz["nfilt"])
    assert (cfg.normalize, cfg.preemph, cfg.pad_to, cfg.pad_value, cfg.mag_power) == (
        fz["normalize"], fz["preemph"], fz["pad_to"], fz["pad_value"], fz["mag_power"])
    assert cfg.log_zero_guard_value == fz["log_zero_guard_value"] and cfg.sample_rate == fz["sample_rate"]


def test_config_from_nemo_variants():
    cfg = FeatureConfig.from_nemo({"n_window_size": 320, "n_window_stride": 160, "features": 80, "normalize": "NA",
                                   "some_future_key": 1, "_target_": "x.AudioToMelSpectrogramPreprocessor"})
    assert (cfg.win_length, cfg.hop_length, cfg.n_fft, cfg.n_mels, cfg.normalize) == (320, 160, 512, 80, None)
    assert FeatureConfig.from_nemo(yaml.safe_load("dither: 1e-5\nhighfreq: null")).dither == 1e-5
    with pytest.raises(ValueError, match="frame_splicing"):
        FeatureConfig.from_nemo({"frame_splicing": 3})


# --- window, filterbank, features -----------------------------------------------------------


def test_window_and_filterbank_equal_nemo_buffers(logmel, nemo_state):
    window, fb = nemo_state["preprocessor.featurizer.window"], nemo_state["preprocessor.featurizer.fb"]
    assert torch.equal(logmel.window, window)
    assert torch.equal(logmel.fb, fb[0])  # NeMo stores [1, n_mels, F]
    assert torch.equal(torch.from_numpy(mel_filterbank(16000, 512, 128)), fb[0])
    assert "fb" not in logmel.state_dict() and "window" not in logmel.state_dict()


@pytest.mark.parametrize("clip", CLIPS)
def test_clip_features_match_nemo(clip, ref, logmel):
    audio = load_audio(AUDIO / f"{clip}.wav")
    assert len(audio) == ref[f"{clip}__num_samples"][0]
    feats, lens = logmel(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    assert lens.tolist() == ref[f"{clip}__len"].tolist()
    _assert_close(feats[0].numpy(), ref[clip], clip)


def test_batch_features_match_nemo(ref, logmel):
    feats, lens = logmel(torch.from_numpy(ref["batch3_audio"]), torch.from_numpy(ref["batch3_audio_lens"]))
    assert lens.tolist() == ref["batch3_lens"].tolist()
    _assert_close(feats.numpy(), ref["batch3_feats"], "batch3")


def test_items_do_not_depend_on_padding(ref, logmel):
    audio, lens = torch.from_numpy(ref["batch3_audio"]).clone(), torch.from_numpy(ref["batch3_audio_lens"])
    clean, _ = logmel(audio, lens)
    for i, n in enumerate(lens.tolist()):
        audio[i, n:] = torch.randn(audio.shape[1] - n)  # garbage in the padding
    noisy, _ = logmel(audio, lens)
    torch.testing.assert_close(noisy, clean, atol=1e-5, rtol=0)
    single, _ = logmel(audio[1:2, : lens[1]], lens[1:2])
    torch.testing.assert_close(clean[1:2, :, : single.shape[-1]], single, atol=1e-5, rtol=0)


def test_dither_only_in_training_and_float32_under_half():
    m = LogMel(FeatureConfig(dither=1e-5))
    audio = torch.zeros(1, 8000)
    audio[0, 2000:6000] = 0.1 * torch.sin(torch.arange(4000) * 0.3)
    a, _ = m.eval()(audio, torch.tensor([8000]))
    b, _ = m.eval()(audio, torch.tensor([8000]))
    assert torch.equal(a, b)
    c, _ = m.train()(audio, torch.tensor([8000]))
    assert not torch.equal(a, c)
    # model.half() must not round the filterbank (that alone costs ~0.1 in the features).
    h = LogMel(FeatureConfig(dither=1e-5)).half().eval()
    assert h.fb.dtype == h.window.dtype == torch.float32
    assert torch.equal(h(audio, torch.tensor([8000]))[0], a)


# --- load_audio ------------------------------------------------------------------------------


def test_load_audio_downmix_resample_int16(tmp_path):
    t = np.arange(44100) / 44100
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo_44k.wav"
    soundfile.write(path, np.stack([left, right], 1), 44100, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) == 16000
    assert abs(np.abs(audio[2000:14000]).max() - 0.3) < 5e-3  # mean of the two channels

    mono = tmp_path / "mono_16k.wav"
    pcm = (np.sin(np.arange(1600) * 0.1) * 16000).astype(np.int16)
    soundfile.write(mono, pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(mono), pcm.astype(np.float32) / 32768)


def _bad_files(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    soundfile.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], np.float32), 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "inf.wav", np.array([0.0, np.inf], np.float32), 16000, subtype="FLOAT")
    (tmp_path / "a_dir.wav").mkdir()
    return {
        "missing.wav": "no such audio file",
        "corrupt.wav": "unreadable or corrupt",
        "empty.wav": "empty",
        "nan.wav": "NaN/inf",
        "inf.wav": "NaN/inf",
        "a_dir.wav": "not a regular file",
    }


def test_load_audio_bad_inputs_name_the_file(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(AudioError, match=reason) as e:
            load_audio(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_compressed_audio_needs_ffmpeg(tmp_path, monkeypatch):
    path = tmp_path / "speech.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A not really")
    monkeypatch.setattr("serinus.audio.shutil.which", lambda name: None)
    with pytest.raises(AudioError, match="install ffmpeg") as e:
        load_audio(path)
    assert str(path) in str(e.value)


def _fake_ffmpeg(tmp_path, monkeypatch, body: str):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "ffmpeg"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_ffmpeg_fallback(tmp_path, monkeypatch):
    path = tmp_path / "speech.opus"
    path.write_bytes(b"OggS not really")
    _fake_ffmpeg(tmp_path, monkeypatch, "printf '\\000\\000\\000\\077\\000\\000\\000\\277'")  # [0.5, -0.5] f32le
    np.testing.assert_array_equal(load_audio(path), np.array([0.5, -0.5], np.float32))
    _fake_ffmpeg(tmp_path, monkeypatch, "echo 'Invalid data found when processing input' >&2; exit 1")
    with pytest.raises(AudioError, match="unreadable or corrupt.*Invalid data") as e:
        load_audio(path)
    assert str(path) in str(e.value)


def test_validate_audio():
    np.testing.assert_array_equal(validate_audio(np.array([0, 16384, -32768], np.int16)), [0.0, 0.5, -1.0])
    assert validate_audio(torch.ones(5, dtype=torch.float64), "x").dtype == np.float32
    for bad, reason in [(np.zeros((2, 10), np.float32), "1-D"), (np.zeros(0, np.float32), "empty"),
                        (np.array([0.0, np.nan]), "NaN/inf"), (np.array([True]), "dtype")]:
        with pytest.raises(AudioError, match=reason) as e:
            validate_audio(bad, "my_array")
        assert "my_array" in str(e.value)


def test_features_in_pieces_are_the_features_of_the_whole(ref):
    # the STFT runs over pieces of frames (a long clip's spectrum is never held whole): the frames
    # at and across every piece boundary are those of one pass. Equal to float32 rounding, not bit
    # for bit: on some CPUs (seen on AMD EPYC) the BLAS picks another kernel for a narrower matmul
    audio, lens = torch.from_numpy(ref["batch3_audio"]), torch.from_numpy(ref["batch3_audio_lens"])
    whole, pieces = LogMel().eval(), LogMel().eval()
    whole.FRAMES_PER_PIECE, pieces.FRAMES_PER_PIECE = 10**9, 7
    a, a_len = whole(audio, lens)
    b, b_len = pieces(audio, lens)
    assert a.shape[-1] > 5 * 7 and torch.equal(a_len, b_len)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
