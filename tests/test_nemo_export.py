"""`.nemo` export (`save_nemo`, `serinus export`): the archive has NeMo's own names, tensors and config
layout (compared with the archives NeMo wrote), and round-trips through Serinus's loader.
That NeMo itself restores it is checked by hand with tools/nemo_export_check.py (NeMo in its own venv)."""

import tarfile

import pytest
import torch
import yaml

from conftest import AUDIO, FIXTURES, MODELS
from serinus import CanaryModel
from serinus.weights import read_weights
from serinus.cli import main as cli


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name in MODELS:
        path = tmp_path_factory.mktemp("export") / f"{name}.nemo"
        CanaryModel.from_pretrained(FIXTURES / f"{name}.nemo").save_nemo(path)
        out[name] = path
    return out


@pytest.mark.parametrize("name", MODELS)
def test_weights_are_nemos_own_names_and_values(name, exported, tmp_path):
    ours, theirs = _members(exported[name]), _members(FIXTURES / f"{name}.nemo")
    for weights, config in (("model_weights.ckpt", "model_config.yaml"),
                            ("timestamps_asr_model_weights.ckpt", "timestamps_asr_model_config.yaml")):
        if weights not in theirs:
            assert weights not in ours
            continue
        (tmp_path / "a.ckpt").write_bytes(ours[weights])
        (tmp_path / "b.ckpt").write_bytes(theirs[weights])
        a, b = read_weights(tmp_path / "a.ckpt"), read_weights(tmp_path / "b.ckpt")
        assert sorted(a) == sorted(b)
        for key in b:  # derived tensors (window, filterbank, sinusoids) are recomputed: allow rounding
            assert a[key].shape == b[key].shape, key
            assert torch.allclose(a[key], b[key], atol=1e-5), key  # sin() at position 1000: ~2e-6
        mine, nemo = yaml.safe_load(ours[config]), yaml.safe_load(theirs[config])
        assert mine["target"] == nemo["target"]
        for section in ("encoder", "preprocessor"):
            for key, value in mine[section].items():
                if key in nemo[section] and key != "_target_":
                    assert value == nemo[section][key], f"{section}.{key}"
        if "transf_decoder" in nemo:
            dec = nemo["transf_decoder"]["config_dict"]
            for key, value in mine["transf_decoder"]["config_dict"].items():
                if key != "vocab_size":
                    assert value == dec[key], f"transf_decoder.config_dict.{key}"
            assert mine["head"]["num_classes"] == nemo["head"]["num_classes"]
            assert mine["prompt_format"] == nemo["prompt_format"]
        for entry in _tokenizer_entries(mine["tokenizer"]):  # every file the config names is in the archive
            for key in ("model_path", "vocab_path", "spe_tokenizer_vocab"):
                assert entry[key].removeprefix("nemo:") in ours


def _tokenizer_entries(section):
    return list(section["langs"].values()) if section.get("type") == "agg" else [section]


@pytest.mark.parametrize("name", MODELS)
def test_export_round_trips_through_our_loader(name, exported):
    original = CanaryModel.from_pretrained(FIXTURES / f"{name}.nemo")
    again = CanaryModel.from_pretrained(exported[name])
    a, b = original.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.cfg == original.cfg
    files = [str(AUDIO / "en_01.wav"), str(AUDIO / "de_01.wav")]
    want = original.transcribe(files, beam_size=1, source_lang="en", target_lang="en")
    got = again.transcribe(files, beam_size=1, source_lang="en", target_lang="en")
    assert [h.y_sequence for h in got] == [h.y_sequence for h in want]


def test_cli_exports_a_model_with_a_ctc_head_and_says_it_is_left_out(tmp_path, capsys):
    import dataclasses

    from serinus.model.canary import CanaryModel as Model

    base = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    with_head = Model(dataclasses.replace(base.cfg, ctc_weight=0.3), base.tokenizer)
    with_head.load_state_dict(base.state_dict(), strict=False)
    folder = tmp_path / "trained"
    with_head.save_pretrained(folder)
    out = tmp_path / "out.nemo"
    assert cli(["export", str(folder), str(out)]) == 0
    assert "CTC head" in capsys.readouterr().out
    (tmp_path / "w.ckpt").write_bytes(_members(out)["model_weights.ckpt"])
    assert not any(k.startswith("ctc_head") for k in read_weights(tmp_path / "w.ckpt"))
    again = CanaryModel.from_pretrained(out)
    assert again.ctc_head is None
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in again.state_dict().items())


def test_cli_refuses_an_output_that_is_not_nemo(tmp_path):
    with pytest.raises(SystemExit):
        cli(["export", str(FIXTURES / "tiny_canary2.nemo"), str(tmp_path / "out.tar")])


def test_cli_exports_a_ctc_model_as_nemos_ctc_model(tmp_path, capsys):
    """A CTC model (here the fixture's aligner, saved on its own, as `serinus train` with model.type ctc
    writes one) goes back to NeMo as an EncDecCTCModelBPE .nemo (NeMo 3.0.0 restores it, transcribes with
    it, and gives the fixture's recorded log-probs: checked by hand); our loader reads it back the same."""
    from serinus.checkpoint import load_ctc_model, save_ctc_model
    from serinus.audio import load_audio
    from serinus.nemo_export import CTC_TARGET

    ctc = load_ctc_model(FIXTURES / "tiny_canary2_v2style.nemo")
    folder = save_ctc_model(ctc, ctc.tokenizer, tmp_path / "ctc")
    out = tmp_path / "ctc.nemo"
    assert cli(["export", str(folder), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with tarfile.open(out) as tar:
        config = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
    assert config["target"] == CTC_TARGET and config["validation_ds"]["use_start_end_token"] is False
    back = load_ctc_model(out)
    audio = torch.from_numpy(load_audio(AUDIO / "en_01.wav"))[None]
    lengths = torch.tensor([audio.shape[1]])
    with torch.inference_mode():
        assert torch.equal(back(audio, lengths)[0], ctc(audio, lengths)[0])
