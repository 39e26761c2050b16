"""serinus.train: a tiny model overfits a few synth-v1 utterances; config overrides and errors;
exact resume; fine-tune init with include/exclude."""

import json

import pytest
import torch

from conftest import DATA, FIXTURES, REPO
from serinus import train as T

TRAIN = DATA / "synth-v1" / "asr_train.jsonl"
DEV = DATA / "synth-v1" / "asr_dev.jsonl"
NEMO = FIXTURES / "tiny_canary2.nemo"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """spl_tokens + an English BPE-128 trained on synth-v1 English text (what `serinus tokenizer` builds)."""
    from serinus.data.tokenizers import build_special_tokenizer, manifest_texts, train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_special_tokenizer(d / "spl_tokens")
    train_bpe_tokenizer(manifest_texts([TRAIN, DEV], lang="en"), d / "en", 128)
    return d


def tiny_config(tokenizer_dir, out_dir, *extra):
    return T.load_config(REPO / "configs" / "canary_tiny.yaml", [
        f"tokenizer.dir={tokenizer_dir}", "tokenizer.from_checkpoint=null",
        f"train_ds.manifest_filepath={TRAIN}", "train_ds.limit=8", "train_ds.batch_duration=null",
        "train_ds.batch_size=3", f"validation_ds.manifest_filepath={DEV}", "validation_ds.limit=3",
        "optim.warmup_steps=5", "trainer.log_every=100", "trainer.val_check_interval=0",
        f"trainer.out_dir={out_dir}", *extra,
    ])


def test_overfit_loss_goes_down_and_checkpoint_loads(tokenizer_dir, tmp_path):
    cfg = tiny_config(tokenizer_dir, tmp_path, "trainer.max_steps=30", "trainer.checkpoint_every=0", "optim.lr=5e-3")
    hist = T.train(cfg)
    losses = hist["losses"]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)  # 7.1 -> ~3.5 (uniform over the vocabulary: ln 1280 = 7.2)
    val = hist["val"][-1]
    assert val["step"] == 30 and val["val_loss"] > 0 and 0 <= val["wer"]
    # the checkpoint is an ordinary model folder
    from serinus.checkpoint import load_model

    ckpt = T.last_checkpoint(cfg)
    model = load_model(ckpt / "model")
    assert model.cfg.encoder.n_layers == 2 and model.cfg.decoder.num_layers == 1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == losses


def test_dotted_overrides_change_config(tmp_path):
    cfg = T.load_config(REPO / "configs" / "canary_tiny.yaml",
                        ["model.encoder.n_layers=1", "optim.betas=[0.8,0.9]", "trainer.precision=bf16",
                         "model.preset=canary-180m-flash"])
    assert cfg["model"]["encoder"]["n_layers"] == 1 and cfg["model"]["encoder"]["d_model"] == 64
    assert cfg["optim"]["betas"] == [0.8, 0.9] and cfg["trainer"]["precision"] == "bf16"

    class Tok:
        vocab_size = 1283

    mcfg = T.build_model_config(cfg, Tok())
    assert mcfg.encoder.n_layers == 1 and mcfg.encoder.d_model == 64  # the overrides win over the preset
    # `trainer.precision=32` parses as an int, and Lightning's names mean the same
    for given, want in (("32", "32"), ("32-true", "32"), ("bf16-mixed", "bf16"), ("16-mixed", "16")):
        got = T.load_config(REPO / "configs" / "canary_tiny.yaml", [f"trainer.precision={given}"])
        assert got["trainer"]["precision"] == want
    assert mcfg.decoder.vocab_size == 1288 and mcfg.decoder.hidden_size == 64


@pytest.mark.parametrize("override, name", [
    ("trainer.max_stepz=3", "trainer.max_stepz"),
    ("model.encoder.n_layerz=3", "model.encoder.n_layerz"),
    ("optimizer.lr=1", "optimizer"),
])
def test_bad_key_names_it(override, name, capsys):
    with pytest.raises(T.ConfigError, match=name.replace(".", r"\.")):
        T.load_config(REPO / "configs" / "canary_tiny.yaml", [override])
    assert T.main(["--config", str(REPO / "configs" / "canary_tiny.yaml"), override]) == 2
    assert name in capsys.readouterr().err


def test_resume_continues_exactly(tokenizer_dir, tmp_path):
    # dropout on, so the RNG state has to come back too; 8 cuts in batches of 3 cross epoch ends
    extra = ["model.encoder.dropout=0.1", "model.decoder.dropout=0.1", "trainer.checkpoint_every=5",
             "validation_ds.manifest_filepath=null"]
    full = T.train(tiny_config(tokenizer_dir, tmp_path / "full", "trainer.max_steps=10", *extra))["losses"]
    first = T.train(tiny_config(tokenizer_dir, tmp_path / "cut", "trainer.max_steps=5", *extra))["losses"]
    rest = T.train(tiny_config(tokenizer_dir, tmp_path / "cut", "trainer.max_steps=10", "trainer.resume=true",
                               *extra))["losses"]
    assert len(first) == 5 and len(rest) == 5
    assert first == full[:5]
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full[5:]), rtol=1e-5, atol=1e-5)


def test_init_from_include_exclude(tmp_path):
    from serinus.checkpoint import load_model
    from serinus.model.canary import CanaryModel

    cfg = T.load_config(None, [f"init_from.path={NEMO}", "model.preset=init_from",
                               "init_from.include=[encoder.,decoder.blocks.]",
                               "init_from.exclude=[encoder.layers.1.]"])
    src = load_model(NEMO)
    tok = T.build_tokenizer(cfg)  # the init checkpoint's
    torch.manual_seed(0)
    model = CanaryModel(T.build_model_config(cfg, tok, src.cfg), tok)
    names = T.init_weights(model, src.state_dict(), cfg["init_from"]["include"], cfg["init_from"]["exclude"], "x")
    assert names and all(n.startswith(("encoder.", "decoder.blocks.")) for n in names)
    assert not any(n.startswith("encoder.layers.1.") for n in names)
    s, m = src.state_dict(), model.state_dict()
    for k in m:
        same = torch.equal(s[k], m[k])
        if k in names:
            assert same, k
        elif m[k].numel() > 1 and "num_batches_tracked" not in k and "running_" not in k:
            assert not same, k  # left at its random init
    # a new tokenizer: the embedding no longer fits and has to be excluded, by name
    cfg2 = T.load_config(None, [f"init_from.path={NEMO}", "model.preset=init_from"])

    class Tok:
        vocab_size = 1280

    small = CanaryModel(T.build_model_config(cfg2, Tok(), src.cfg), tok)
    with pytest.raises(T.ConfigError, match="decoder.token_embedding.weight"):
        T.init_weights(small, src.state_dict(), [], [], "x")
    n = T.init_weights(small, src.state_dict(), [], ["decoder.token_embedding", "decoder.head_bias"], "x")
    assert len(n) == len(src.state_dict()) - 2


def test_allow_unk_reaches_the_bucketing_pass():
    """train_ds.allow_unk must also cover the token count made for bucketing, not only the batches.
    (The fixture tokenizer cannot spell every letter of the synthetic text.)"""
    from serinus import CanaryModel
    from serinus.data.dataset import DataError

    tok = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo").tokenizer
    ds = {"manifest_filepath": str(DATA / "synth-v1" / "asr_dev.jsonl"), "limit": None}
    with pytest.raises(DataError, match="cannot encode"):
        T.load_cuts(dict(ds, allow_unk=False), tok)
    cuts = T.load_cuts(dict(ds, allow_unk=True), tok)
    assert len(cuts) == 56 and all(c.num_tokens > 0 for c in cuts)  # every line kept


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("synth_*.yaml")))
def test_shipped_recipes_load_and_write_only_into_their_run_folder(name):
    cfg = T.load_config(REPO / "configs" / name, ["exp_manager.exp_dir=runs/elsewhere"])
    assert cfg["trainer"]["out_dir"] == "runs/elsewhere"
    assert cfg["tokenizer"]["dir"] is None  # built into <exp_dir>/tokenizer, not shared between runs


def test_speed_perturbation_adds_each_utterance_at_each_speed():
    """train_ds.perturb_speed: every cut once per factor, resampled (slower = longer and lower-pitched),
    each speed cached apart, the transcript unchanged."""
    from serinus.data.dataset import load_audio
    from serinus.train.loop import ConfigError, perturb_speed, speed_factors

    assert speed_factors(False) == () and speed_factors(True) == (0.9, 1.0, 1.1)
    assert speed_factors([0.95, 1.05]) == (0.95, 1.05)
    with pytest.raises(ConfigError, match="perturb_speed"):
        speed_factors([0.1])
    cuts = T.load_cuts({"manifest_filepath": str(DEV), "source_langs": ["en"], "target_langs": ["en"], "limit": 3})
    sp = perturb_speed(cuts, speed_factors(True))
    assert len(sp) == 3 * len(cuts)
    cache = {}
    audio, lens = load_audio(sp, 16000, cache)
    assert len(cache) == len(sp)  # three copies of each recording, each at its own speed
    n = len(cuts)
    for i, cut in enumerate(cuts):
        texts = [sp[i + k * n].supervisions[0].text for k in range(3)]
        assert texts == [cut.supervisions[0].text] * 3
        base = int(lens[i + n])  # the factors' order: 0.9, 1.0 (as recorded), 1.1
        for k, f in ((0, 0.9), (2, 1.1)):
            assert abs(int(lens[i + k * n]) - base / f) <= 2
            assert abs(sp[i + k * n].duration - cut.duration / f) < 1e-3

    def crossings(a):  # zero crossings per sample: scales with pitch and formants
        return float((torch.sign(a[1:]) != torch.sign(a[:-1])).float().mean())

    ratio = crossings(audio[0, : lens[0]]) / crossings(audio[n, : lens[n]])
    assert 0.8 < ratio < 0.97, ratio  # 0.9x speed: every frequency 0.9x


def test_transcripts_longer_than_the_decoder_are_left_out_with_a_warning(tokenizer_dir, tmp_path, capsys):
    """A decoder of 20 positions cannot be teacher-forced on longer prompt + transcript: those training
    lines are left out (said, with the longest), validation still decodes them but leaves them out of
    its loss, and the run completes."""
    cfg = tiny_config(tokenizer_dir, tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=0",
                      "model.decoder.max_sequence_length=20")
    hist = T.train(cfg)
    err = capsys.readouterr().err
    assert "warning: train_ds:" in err and "left out of training" in err and "max_sequence_length 20" in err
    assert "warning: validation_ds:" in err and "left out of the validation loss" in err
    assert len(hist["losses"]) == 2 and hist["val"][-1]["step"] == 2
