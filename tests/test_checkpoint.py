"""Loading is safe by construction; our own format round-trips; importing stays light."""

import io
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import AUDIO, FIXTURES
from serinus import CanaryModel
from serinus.checkpoint import CheckpointError, extract_nemo, load_model


def _tar(path, members):
    """members: list of (TarInfo, bytes or None)."""
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("bad", ["../../x", "/abs/x", "sub/../../x"])
def test_refuses_paths_that_leave_the_archive(tmp_path, bad):
    archive = _tar(tmp_path / "bad.nemo", [_file("model_config.yaml"), _file(bad)])
    dest = tmp_path / "out" / "deep"
    with pytest.raises(CheckpointError, match="refusing archive member"):
        extract_nemo(archive, dest)
    assert not dest.exists()  # nothing written, not even the good member
    assert not (tmp_path / "x").exists() and not (tmp_path / "out" / "x").exists()


def test_refuses_links(tmp_path):
    link = tarfile.TarInfo("evil")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = _tar(tmp_path / "link.nemo", [_file("model_config.yaml"), (link, None)])
    with pytest.raises(CheckpointError, match="links are not allowed"):
        extract_nemo(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Payload:
    def __reduce__(self):  # would create a file when unpickled without weights_only
        return (open, ("/tmp/serinus-pwned", "w"))


def test_refuses_pickled_code_in_weights(tmp_path):
    import os

    buf = io.BytesIO()
    torch.save({"encoder.x": torch.zeros(1), "evil": _Payload()}, buf)
    with tarfile.open(FIXTURES / "tiny_canary2.nemo") as src:  # the real archive, weights swapped
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    for i, (info, data) in enumerate(members):
        if info.name.endswith("model_weights.ckpt"):
            info.size = len(buf.getvalue())
            members[i] = (info, buf.getvalue())
    archive = _tar(tmp_path / "pickle.nemo", members)
    if os.path.exists("/tmp/serinus-pwned"):
        os.remove("/tmp/serinus-pwned")
    with pytest.raises(CheckpointError):
        load_model(archive)
    assert not os.path.exists("/tmp/serinus-pwned")


def test_missing_or_unexpected_weights_are_named(tmp_path):
    with tarfile.open(FIXTURES / "tiny_canary2.nemo") as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    out = []
    for info, data in members:
        if info.name.endswith("model_weights.ckpt"):
            state = torch.load(io.BytesIO(data), weights_only=True)
            state.pop("encoder.layers.1.norm_out.bias")
            state["encoder.extra"] = torch.zeros(1)
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            info.size = len(data)
        out.append((info, data))
    archive = _tar(tmp_path / "partial.nemo", out)
    with pytest.raises(CheckpointError, match=r"missing keys: encoder.layers.1.norm_out.bias.*unexpected keys: encoder.extra"):
        load_model(archive)


@pytest.mark.parametrize("name", ["tiny_canary2", "tiny_canary2_v2style"])
def test_own_format_round_trip(tmp_path, name):
    model = CanaryModel.from_pretrained(FIXTURES / f"{name}.nemo")
    model.save_pretrained(tmp_path / "saved")
    again = CanaryModel.from_pretrained(tmp_path / "saved")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.cfg == model.cfg
    files = [str(AUDIO / "en_01.wav"), str(AUDIO / "de_01.wav")]
    kwargs = dict(beam_size=1, timestamps=False)
    assert [h.y_sequence for h in model.transcribe(files, **kwargs)] == [h.y_sequence for h in again.transcribe(files, **kwargs)]


def test_save_tokenizers(tmp_path):
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    cfg = model.save_tokenizers(tmp_path / "tok")
    from serinus.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg, lambda p: tmp_path / "tok" / p)
    assert tok.text_to_ids("hello world", "en") == model.tokenizer.text_to_ids("hello world", "en")


def test_unknown_path_gives_clear_error():
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model("./does-not-exist.nemo")


def test_import_is_light():
    """`import serinus` must not pull in training-only dependencies."""
    code = "import sys, serinus; bad = [m for m in ('lhotse', 'omegaconf', 'jiwer', 'sacrebleu') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_shared_position_biases_load_as_nemo_stores_them(tmp_path):
    """untie_biases=False: NeMo shares one pair of rel-pos biases, listed under every layer."""
    import yaml

    with tarfile.open(FIXTURES / "tiny_canary2.nemo") as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    shared_u = None
    for i, (info, data) in enumerate(members):
        if info.name.endswith("model_config.yaml"):
            cfg = yaml.safe_load(data)
            cfg["encoder"]["untie_biases"] = False
            data = yaml.safe_dump(cfg).encode()
        elif info.name.endswith("model_weights.ckpt"):
            state = torch.load(io.BytesIO(data), weights_only=True)
            shared_u = state["encoder.layers.0.self_attn.pos_bias_u"]
            for key in list(state):
                if key.endswith("pos_bias_u"):
                    state[key] = shared_u
                elif key.endswith("pos_bias_v"):
                    state[key] = state["encoder.layers.0.self_attn.pos_bias_v"]
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
        info.size = len(data) if data is not None else 0
        members[i] = (info, data)
    model = load_model(_tar(tmp_path / "shared.nemo", members))
    assert model.encoder.layers[1].self_attn.pos_bias_u is model.encoder.layers[0].self_attn.pos_bias_u
    assert torch.equal(model.encoder.layers[1].self_attn.pos_bias_u, shared_u)
    model.save_pretrained(tmp_path / "saved")
    again = CanaryModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.encoder.layers[1].self_attn.pos_bias_u, shared_u)


@pytest.mark.parametrize("fmt", ["nemo", "folder"])
def test_weights_stored_in_bfloat16_load_into_a_float32_model(tmp_path, fmt):
    """A checkpoint saved in half precision (NeMo: `model.to(torch.bfloat16).save_to(...)`) loads as the
    asked dtype, every weight converted, and decodes as the float32 model made from the same rounded weights."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype="bfloat16")
    path = tmp_path / ("m.nemo" if fmt == "nemo" else "m")
    half.save_nemo(path) if fmt == "nemo" else half.save_pretrained(path)
    loaded = CanaryModel.from_pretrained(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    clip = [str(AUDIO / "en_01.wav")]
    (hyp,) = loaded.transcribe(clip)
    assert hyp.error is None
    (want,) = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo").transcribe(clip)
    assert hyp.y_sequence == want.y_sequence  # bf16-rounded weights: the same tokens on this clip
