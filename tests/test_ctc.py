"""CTC: the loss, the joint loss, the CTC model against NeMo 3.0.0 (the v2-style fixture's aligner),
loading a NeMo EncDecCTCModelBPE .nemo, our CTC format, and a Canary model with a CTC head."""

import dataclasses
import io
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus import CanaryModel
from serinus.audio import load_audio
from serinus.checkpoint import CheckpointError, load_ctc_model, load_model, save_ctc_model
from serinus.model.canary import joint_loss
from serinus.model.ctc import CTCModel, ctc_loss

CTC_REF = REFERENCE / "tiny_canary2_v2style"
CLIPS = ["en_02", "de_02", "es_02", "fr_01", "en_short"]  # en_01, de_01 and en_short__pad1s are in the batch


# -- the loss -----------------------------------------------------------------------------------

def _close(got, want, rtol=1e-6, atol=1e-6):
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (got, want)  # (torch.testing imports a lot)


def _case():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 12, 6).log_softmax(-1)
    lengths = torch.tensor([12, 9, 3])
    targets = torch.tensor([[1, 2, 2, 3], [4, 4, 0, 0], [1, 2, 3, 4]])  # the last needs >= 4 frames: impossible
    target_lengths = torch.tensor([4, 2, 4])
    return log_probs, lengths, targets, target_lengths


def test_ctc_loss_matches_torch():
    lp, lengths, targets, tl = _case()
    blank = 5
    want = F.ctc_loss(lp.transpose(0, 1), targets, lengths, tl, blank=blank, reduction="mean", zero_infinity=True)
    got = ctc_loss(lp, lengths, targets, tl, blank)
    _close(got, want, rtol=1e-6, atol=1e-6)
    per = ctc_loss(lp, lengths, targets, tl, blank, reduction="none")
    assert per[2] == 0 and math.isfinite(float(got))  # zero_infinity
    raw = F.ctc_loss(lp.transpose(0, 1), targets, lengths, tl, blank=blank, reduction="none")
    assert math.isinf(float(raw[2]))
    _close(per[:2], raw[:2])
    _close(got, (per / tl).mean())
    # NeMo's CTCLoss reductions
    _close(ctc_loss(lp, lengths, targets, tl, blank, reduction="mean_batch"), per.mean())
    _close(ctc_loss(lp, lengths, targets, tl, blank, reduction="mean_volume"), per.sum() / tl.sum())
    lp.requires_grad_(True)
    ctc_loss(lp, lengths, targets, tl, blank).backward()
    assert torch.isfinite(lp.grad).all()


def test_ctc_loss_by_hand():
    p = torch.tensor([[0.6, 0.4], [0.3, 0.7]])  # 2 frames, classes (blank=0, a=1)
    lp = p.log()[None]
    one = torch.tensor([1])
    # one frame: -log p(a); two frames: paths aa, a-, -a
    assert ctc_loss(lp[:, :1], one, torch.tensor([[1]]), one, 0).item() == pytest.approx(-math.log(0.4))
    want = -math.log(0.4 * 0.7 + 0.4 * 0.3 + 0.6 * 0.7)
    assert ctc_loss(lp, torch.tensor([2]), torch.tensor([[1]]), one, 0).item() == pytest.approx(want, rel=1e-6)
    # "aa" needs a blank between: 3 frames at least, so in 2 frames it is impossible -> 0
    assert ctc_loss(lp, torch.tensor([2]), torch.tensor([[1, 1]]), torch.tensor([2]), 0).item() == 0.0


def test_joint_loss():
    att, ctc = torch.tensor(2.0), torch.tensor(4.0)
    assert joint_loss(att, ctc, 0.3).item() == pytest.approx(0.3 * 4 + 0.7 * 2)
    assert joint_loss(att, None, 0.0) is att and joint_loss(att, ctc, 0.0) is att
    assert joint_loss(att, ctc, 1.0).item() == 4.0
    with pytest.raises(ValueError, match="no CTC loss"):
        joint_loss(att, None, 0.5)


# -- the CTC model against NeMo -------------------------------------------------------------------

def _nemo_ctc_archive(extracted, out):
    """A NeMo EncDecCTCModelBPE .nemo (what `save_to` writes) made of the v2-style fixture's aligner members."""
    root = extracted["tiny_canary2_v2style"]
    rename = {"timestamps_asr_model_config.yaml": "model_config.yaml",
              "timestamps_asr_model_weights.ckpt": "model_weights.ckpt"}
    with tarfile.open(out, "w") as tar:
        for f in sorted(root.iterdir()):
            if f.name in ("model_config.yaml", "model_weights.ckpt"):
                continue
            tar.add(f, arcname="./" + rename.get(f.name, f.name))
    return out


@pytest.fixture(scope="module")
def nemo_ctc(extracted, tmp_path_factory):
    path = _nemo_ctc_archive(extracted, tmp_path_factory.mktemp("ctc") / "ctc.nemo")
    return load_ctc_model(path)


def _clip(name):
    audio = np.asarray(load_audio(AUDIO / f"{name.split('__')[0]}.wav"), dtype=np.float32)
    if name.endswith("__pad1s"):  # NeMo's CTC transcribe pads < 1 s to 1 s on both sides
        pad = 16000 - len(audio)
        audio = np.pad(audio, (pad // 2, pad - pad // 2))
    return audio


def test_ctc_forward_matches_nemo(nemo_ctc):
    """Features, encoder output and log-probs of each clip; max abs diffs ~6e-5 / 3e-6 / 1.4e-5."""
    ref = np.load(CTC_REF / "ctc_outputs.npz")
    model = nemo_ctc
    assert model.blank_id == 1535 and model.tokenizer.vocab_size == 1535 and not model.training
    seen = {}
    hooks = [model.preprocessor.register_forward_hook(lambda m, i, o: seen.update(feats=o)),
             model.encoder.register_forward_hook(lambda m, i, o: seen.update(encoded=o))]
    worst = dict(feats=0.0, encoded=0.0, logprobs=0.0)
    try:
        with torch.no_grad():
            for clip in CLIPS:
                audio = _clip(clip)
                assert len(audio) == int(ref[clip + "__num_samples"][0])
                log_probs, T = model(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
                assert int(T[0]) == int(ref[clip + "__len"][0]) == ref[clip + "__logprobs"].shape[0]
                got = dict(feats=seen["feats"][0][0], encoded=seen["encoded"][0][0], logprobs=log_probs[0])
                for key in worst:
                    want = ref[f"{clip}__{key}"]
                    diff = float(np.abs(got[key].numpy()[tuple(slice(n) for n in want.shape)] - want).max())
                    worst[key] = max(worst[key], diff)
            # a padded batch: the valid part of each row as alone
            clips = ["en_01", "de_01", "en_short__pad1s"]
            audio = [_clip(c) for c in clips]
            batch = torch.from_numpy(np.stack([np.pad(a, (0, max(map(len, audio)) - len(a))) for a in audio]))
            log_probs, T = model(batch, torch.tensor([len(a) for a in audio]))
            for i, clip in enumerate(clips):
                want = ref[clip + "__logprobs"]
                assert int(T[i]) == want.shape[0]
                worst["batch"] = max(worst.get("batch", 0.0), float(np.abs(log_probs[i, : int(T[i])].numpy() - want).max()))
    finally:
        for h in hooks:
            h.remove()
    print("CTC max abs diff vs NeMo:", worst)
    assert worst["feats"] < 1e-4 and worst["encoded"] < 1e-4 and worst["logprobs"] < 1e-4 and worst["batch"] < 1e-4


def test_spec_augment_only_in_training(nemo_ctc):
    assert nemo_ctc.cfg.spec_augment is not None  # read from the NeMo config
    model = CTCModel(nemo_ctc.cfg)  # a copy: training mode updates the BatchNorm statistics
    model.load_state_dict(nemo_ctc.state_dict())
    model.eval()
    audio = torch.from_numpy(_clip("en_01"))[None]
    n = torch.tensor([audio.shape[1]])
    plain = CTCModel(dataclasses.replace(model.cfg, spec_augment=None))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    with torch.no_grad():
        a, _ = model(audio, n)
        b, _ = plain(audio, n)
        assert torch.equal(a, b)  # bit-identical in eval
        calls = []
        h = model.spec_augment.register_forward_hook(lambda m, i, o: calls.append(not torch.equal(i[0], o)))
        try:
            model.train()
            model(audio, n)
        finally:
            model.eval()
            h.remove()
    assert calls == [True]


def test_ctc_format_round_trip(nemo_ctc, tmp_path):
    save_ctc_model(nemo_ctc, nemo_ctc.tokenizer, tmp_path / "ctc")
    again = load_ctc_model(tmp_path / "ctc")
    assert again.cfg == nemo_ctc.cfg and again.tokenizer.vocab_size == 1535
    a, b = nemo_ctc.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.text_to_ids("The quick brown fox.") == nemo_ctc.tokenizer.text_to_ids("The quick brown fox.")
    # the packed aligner of a v2-style checkpoint loads as the same CTC model
    packed = load_ctc_model(FIXTURES / "tiny_canary2_v2style.nemo")
    assert all(torch.equal(a[k], packed.state_dict()[k]) for k in a)
    with pytest.raises(CheckpointError, match="load_ctc_model"):
        load_model(tmp_path / "ctc")
    with pytest.raises(CheckpointError, match="without a packed CTC aligner"):
        load_ctc_model(FIXTURES / "tiny_canary2.nemo")
    wrong = CTCModel(dataclasses.replace(nemo_ctc.cfg, num_classes=1000))
    with pytest.raises(CheckpointError, match="1000 classes"):
        save_ctc_model(wrong, nemo_ctc.tokenizer, tmp_path / "bad")


# -- a Canary model with a CTC head ---------------------------------------------------------------

def test_canary_ctc_head_forward_train_and_reload(tmp_path):
    src = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    cfg = dataclasses.replace(src.cfg, ctc_weight=0.3)
    model = CanaryModel(cfg, src.tokenizer)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    assert missing == ["ctc_head.weight", "ctc_head.bias"] and not unexpected
    model.eval()
    V = cfg.decoder.vocab_size
    assert model.ctc_head.out_features == V + 1 and model.ctc_blank_id == V
    audio = torch.from_numpy(np.stack([_clip("en_01")[:16000], _clip("de_01")[:16000]]))
    lens = torch.tensor([16000, 12000])
    tokens = torch.tensor([[7, 4, 20, 21, 30], [7, 4, 20, 21, 0]])
    tlens = torch.tensor([5, 4])
    with torch.no_grad():
        dec, ctc, enc_len = model.forward_train(audio, lens, tokens, tlens)
        assert torch.equal(dec, model(audio, lens, tokens, tlens))  # the same decoder output as forward()
        assert ctc.dtype == torch.float32 and ctc.shape == (2, int(enc_len.max()), V + 1)
        assert src.ctc_head is None and src.forward_train(audio[:1], lens[:1], tokens[:1], tlens[:1])[1] is None
    loss = ctc_loss(ctc, enc_len, torch.tensor([[30, 31], [32, 0]]), torch.tensor([2, 1]), model.ctc_blank_id)
    assert math.isfinite(float(loss))
    model.save_pretrained(tmp_path / "m")
    again = CanaryModel.from_pretrained(tmp_path / "m")
    assert again.cfg == cfg and again.cfg.ctc_weight == 0.3 and again.cfg.spec_augment == src.cfg.spec_augment
    assert torch.equal(again.ctc_head.weight, model.ctc_head.weight)
    with torch.no_grad():
        # loaded for inference, its Linear layers run packed (oneDNN): equal to rounding
        torch.testing.assert_close(again.forward_train(audio, lens, tokens, tlens)[1], ctc, rtol=1e-5, atol=1e-5)
    # SpecAugment runs in encode() in training only
    calls = []
    h = model.spec_augment.register_forward_hook(lambda m, i, o: calls.append(not torch.equal(i[0], o)))
    with torch.no_grad():
        model.train()
        model.forward_train(audio, lens, tokens, tlens)
        model.eval()
        model(audio, lens, tokens, tlens)
    h.remove()
    assert calls == [True, False]


def test_old_config_dicts_get_the_defaults():
    from serinus.model.canary import CanaryConfig

    cfg = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2_v2style.nemo").cfg
    d = cfg.to_dict()
    assert d["ctc_weight"] == 0.0 and d["spec_augment"]["time_width"] == 0.05
    assert CanaryConfig.from_dict(d) == cfg
    for key in ("spec_augment", "ctc_weight"):
        d.pop(key)
    d["aligner"].pop("spec_augment")
    old = CanaryConfig.from_dict(d)
    assert old.spec_augment is None and old.ctc_weight == 0.0 and old.aligner.spec_augment is None
