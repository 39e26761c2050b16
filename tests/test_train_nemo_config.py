"""NeMo's own fast-conformer_aed.yaml, unchanged, through `serinus train`: the seed tutorial's
from-scratch overrides translate to Serinus keys and train; unknown keys are errors with a
suggestion; keys Serinus does not act on are warned about once; init_from_pretrained_model with
NeMo's substring rule; trainer.devices=-1 on a CPU; gradient accumulation; the ordered tokenizer."""

import json

import pytest
import torch
import yaml

from conftest import DATA, FIXTURES
from serinus import train as T
from serinus.tokenizer import langs_tokenizer
from serinus.train import nemo_config as N
from serinus.train.init import nemo_names, nemo_selected

CONFIGS = FIXTURES / "configs"
YAML = CONFIGS / "fast-conformer_aed.yaml"
NEMO = FIXTURES / "tiny_canary2.nemo"
TRAIN = DATA / "synth-v1" / "asr_train.jsonl"
SEED_EXCLUDE = ["transf_decoder._embedding.token_embedding", "log_softmax.mlp.layer0"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """What the seed builds: tokenizers/spl_tokens and a BPE per language (tokenizer_spe_bpe_v<N>/ inside)."""
    from serinus.data.tokenizers import build_special_tokenizer, manifest_texts, train_bpe_tokenizer

    d = tmp_path_factory.mktemp("nemo_tok")
    build_special_tokenizer(d / "spl_tokens")
    langs = {lang: train_bpe_tokenizer(manifest_texts([TRAIN], lang=lang), d / f"{lang}_synth_128", 128)
             for lang in ("en", "de")}
    return {"spl_tokens": d / "spl_tokens", **langs}


def seed(tok, exp_dir, *extra):
    """The seed tutorial's from-scratch command line (speech_to_text_aed.py), then test-sized extras."""
    return [
        "name=canary-small", "model.prompt_format=canary2",
        f"model.train_ds.manifest_filepath={TRAIN}", f"model.validation_ds.manifest_filepath={TRAIN}",
        f"model.test_ds.manifest_filepath={TRAIN}", f"model.tokenizer.langs.en.dir={tok['en']}",
        f"model.tokenizer.langs.spl_tokens.dir={tok['spl_tokens']}", f"spl_tokens.model_dir={tok['spl_tokens']}",
        "model.encoder.n_layers=2", "model.transf_decoder.config_dict.num_layers=2",
        f"exp_manager.exp_dir={exp_dir}", "exp_manager.resume_ignore_no_checkpoint=true",
        "trainer.max_steps=2", "trainer.log_every_n_steps=1", *extra,
    ]


# CPU-sized: small hidden sizes through NeMo's own model_defaults interpolations, English lines only
SMALL = ["model.model_defaults.asr_enc_hidden=64", "model.model_defaults.lm_dec_hidden=64",
         "model.encoder.subsampling_conv_channels=32", "model.train_ds.num_workers=0",
         "serinus.train_ds.target_langs=[en]", "serinus.train_ds.limit=40",
         "serinus.validation_ds.target_langs=[en]", "serinus.validation_ds.limit=2"]


def test_seed_overrides_translate_to_serinus_keys(tok, tmp_path, capsys):
    argv = ["--config", str(YAML), *seed(tok, tmp_path, *SMALL), "--print-config"]
    assert T.main(argv) == 0
    out = capsys.readouterr()
    cfg = yaml.safe_load(out.out)
    m = cfg["model"]
    assert m["type"] == "aed" and m["prompt_format"] == "canary2" and m["use_loss_mask_for_prompt"] is False
    assert m["encoder"]["n_layers"] == 2 and m["encoder"]["d_model"] == 64 and m["encoder"]["feat_in"] == 128
    assert m["encoder"]["subsampling_conv_channels"] == 32 and m["encoder"]["n_heads"] == 8
    assert m["decoder"]["num_layers"] == 2 and m["decoder"]["hidden_size"] == 64
    assert m["decoder"]["inner_size"] == 256  # ${multiply:${model.model_defaults.lm_dec_hidden}, 4}
    assert "vocab_size" not in m["decoder"] and m["features"]["n_mels"] == 128
    assert m["spec_augment"] == {"freq_masks": 2, "freq_width": 27, "time_masks": 10, "time_width": 0.05}
    assert m["decoding"]["beam_size"] == 1 and m["decoding"]["max_generation_delta"] == 50
    assert list(cfg["tokenizer"]["langs"].items()) == [("spl_tokens", str(tok["spl_tokens"])), ("en", str(tok["en"]))]
    ds = cfg["train_ds"]
    assert ds["manifest_filepath"] == str(TRAIN) and ds["batch_duration"] == 360 and ds["quadratic_duration"] == 15
    assert ds["num_buckets"] == 20 and ds["shuffle"] is True and ds["num_workers"] == 0 and ds["limit"] == 40
    assert cfg["validation_ds"]["manifest_filepath"] == str(TRAIN) and cfg["validation_ds"]["batch_size"] == 8
    assert cfg["optim"] == {"lr": 3e-4, "betas": [0.9, 0.98], "weight_decay": 1e-3, "warmup_steps": 2500,
                            "min_lr": 1e-6, "schedule": "inverse_sqrt", "decay_fraction": 0.0}
    tr = cfg["trainer"]
    assert tr["max_steps"] == 2 and tr["log_every"] == 1 and tr["precision"] == "bf16" and tr["grad_clip"] == 0.0
    assert tr["accumulate_grad_batches"] == 1 and tr["resume"] is True and tr["device"] == "auto"
    assert tr["out_dir"] == str(tmp_path / "canary-small")  # exp_manager.exp_dir / name, as NeMo
    assert tr["val_check_interval"] == tr["checkpoint_every"] > 0  # val_check_interval: 1.0 = one epoch
    assert "fraction of an epoch" in out.err and "trainer.val_check_interval=1.0" in out.err
    if not torch.cuda.is_available():
        assert "trainer.devices=-1: 1 process on cpu" in out.err  # NeMo's -1 ("all"), on a CPU: one process
    warnings = [line for line in out.err.splitlines() if "does not act on" in line]
    assert len(warnings) == 1  # every NeMo setting Serinus ignores, once, on one line
    assert "model.test_ds.manifest_filepath=" in warnings[0] and "trainer.num_sanity_val_steps=2" in warnings[0]
    for acted in ("model.encoder", "model.train_ds.batch_duration", "trainer.max_steps", "model.model_defaults",
                  "model.tokenizer", "trainer.devices", "trainer.precision", "model.optim.lr", "serinus."):
        assert f" {acted}" not in warnings[0], acted


def test_nemo_cosine_annealing_is_the_cosine_schedule(tok, tmp_path, capsys):
    argv = ["--config", str(YAML), *seed(tok, tmp_path, *SMALL), "model.optim.sched.name=CosineAnnealing",
            "--print-config"]
    assert T.main(argv) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["optim"]["schedule"] == "cosine"
    assert "sched.name" not in out.err  # acted on, so not reported as ignored


def test_seed_from_scratch_trains_two_steps_and_writes_a_model(tok, tmp_path, capsys):
    from serinus.checkpoint import load_model

    argv = ["--config-path", str(CONFIGS), "--config-name", "fast-conformer_aed",  # Hydra's name, no .yaml
            *seed(tok, tmp_path, *SMALL, "+trainer.limit_train_batches=20000")]
    assert T.main(argv) == 0  # trainer.devices=-1 (the YAML's) on this CPU: one process, no failure
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "does not act on" in line]
    assert len(warnings) == 1 and "trainer.limit_train_batches=20000" in warnings[0]
    run = tmp_path / "canary-small"
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    model = load_model(run / "model")
    assert model.cfg.encoder.n_layers == 2 and model.cfg.encoder.d_model == 64
    assert model.cfg.decoder.num_layers == 2 and model.tokenizer.langs == ("en",)
    assert model.cfg.use_loss_mask_for_prompt is False


@pytest.mark.parametrize("override, name, hint", [
    ("trainer.max_stepz=3", "trainer.max_stepz", "max_steps"),
    ("model.encoder.n_layerz=2", "model.encoder.n_layerz", "n_layers"),
    ("model.train_ds.batch_duraton=100", "model.train_ds.batch_duraton", "batch_duration"),
    ("+trainer.max_epoch=3", "trainer.max_epoch", "max_epochs"),
    ("exp_manager.exp_dirr=x", "exp_manager.exp_dirr", "exp_dir"),
    ("serinus.trainer.max_stepz=3", "serinus.trainer.max_stepz", "max_steps"),
    ("optimizer.lr=1", "optimizer", None),
])
def test_unknown_key_is_an_error_with_a_suggestion(tok, tmp_path, capsys, override, name, hint):
    with pytest.raises(T.ConfigError, match=name.replace(".", r"\.")) as e:
        N.load_nemo_config(YAML, seed(tok, tmp_path, override))
    if hint:
        assert f"did you mean {hint!r}" in str(e.value)
    assert T.main(["--config", str(YAML), *seed(tok, tmp_path, override), "--print-config"]) == 2
    assert name in capsys.readouterr().err


def test_nemo_settings_checked_against_this_run(tok, tmp_path):
    def load(*extra):
        return N.load_nemo_config(YAML, seed(tok, tmp_path, *extra))[0]

    with pytest.raises(T.ConfigError, match="torchrun --nnodes 1 --nproc_per_node 2"):
        load("trainer.devices=2")  # one process here: Serinus does not spawn, torchrun does
    assert load("trainer.devices=1")["trainer"]["device"] == "auto"
    assert load("trainer.accelerator=cpu", "trainer.precision=32-true")["trainer"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(T.ConfigError, match="16-mixed.*bf16-mixed or 32"):
            load("trainer.precision=16-mixed")
    tr = load("trainer.val_check_interval=5", "trainer.gradient_clip_val=1.5",
              "trainer.accumulate_grad_batches=4", "trainer.max_time=00:01:00:00")["trainer"]
    assert tr["val_check_interval"] == tr["checkpoint_every"] == 5 and tr["grad_clip"] == 1.5
    assert tr["accumulate_grad_batches"] == 4 and tr["max_time"] == "00:01:00:00"
    with pytest.raises(T.ConfigError, match="resume_ignore_no_checkpoint=true"):  # NeMo's rule, its message
        load("exp_manager.resume_ignore_no_checkpoint=false")
    cfg = load("exp_manager.resume_if_exists=false", "~model.test_ds")
    assert cfg["trainer"]["resume"] is False
    with pytest.raises(T.ConfigError, match="model.prompt_format is required"):
        N.load_nemo_config(YAML, [o for o in seed(tok, tmp_path) if not o.startswith("model.prompt_format")])


def _finetune_yaml(tmp_path):
    """The seed's fine-tuning config: fast-conformer_aed.yaml with the checkpoint's architecture copied in
    and init_from_pretrained_model: model0 {name, exclude} instead of init_from_nemo_model."""
    from serinus.weights import extract_nemo

    base = yaml.safe_load(YAML.read_text())
    model_cfg = yaml.safe_load((extract_nemo(NEMO, tmp_path / "x") / "model_config.yaml").read_text())
    base.pop("init_from_nemo_model")
    base["init_from_pretrained_model"] = {"model0": {"name": str(NEMO), "exclude": SEED_EXCLUDE}}
    for key in ("prompt_format", "model_defaults", "preprocessor", "encoder", "transf_decoder", "transf_encoder"):
        base["model"][key] = model_cfg[key]
    path = tmp_path / "canary-finetune.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def test_init_from_pretrained_model_with_the_seeds_exclude_list(tok, tmp_path):
    """NeMo's rule (a substring of NeMo's parameter names) on Serinus's tensors: the seed's exclude list
    leaves out exactly decoder.token_embedding.weight (NeMo's token embedding = the tied head weight)
    and decoder.head_bias (log_softmax.mlp.layer0.bias); everything else loads."""
    from serinus.checkpoint import load_model
    from serinus.train.loop import Runtime, build_model

    overrides = [o for o in seed(tok, tmp_path / "run") if not o.startswith(("model.encoder", "model.transf",
                                                                              "model.prompt_format"))]
    cfg, _, _ = N.load_nemo_config(_finetune_yaml(tmp_path), overrides)
    assert cfg["init_from"] == {"path": str(NEMO), "include": [], "exclude": SEED_EXCLUDE, "match": "nemo_substring"}
    src = load_model(NEMO)
    excluded = sorted(k for k in src.state_dict() if not nemo_selected(k, [], SEED_EXCLUDE))
    assert excluded == ["decoder.head_bias", "decoder.token_embedding.weight"]
    for one in SEED_EXCLUDE:  # tied: NeMo loads the shared tensor through whichever of its two names is left
        assert nemo_selected("decoder.token_embedding.weight", [], [one])
    assert nemo_selected("encoder_decoder_proj.weight", ["encoder"], [])  # NeMo: "encoder" in the name

    tokenizer = T.build_tokenizer(cfg)  # the new tokenizer: another vocabulary, so the embedding must go
    torch.manual_seed(0)
    model, report = build_model(cfg, T.make_task(cfg), tokenizer, Runtime(torch.device("cpu"), 0, 0, 1, None))
    assert report.skipped == excluded  # re-initialised, and the report says so
    assert f"skipped: {', '.join(excluded)}" in report.text()
    mine, theirs = model.state_dict(), src.state_dict()
    assert mine["decoder.token_embedding.weight"].shape != theirs["decoder.token_embedding.weight"].shape
    for k, v in mine.items():
        if k in excluded:
            continue
        assert torch.equal(v, theirs[k]), k  # loaded
    with pytest.raises(T.ConfigError, match="decoder.token_embedding.weight"):  # without the exclude list
        T.init_weights(model, theirs, [], [], "x", match="nemo_substring")


def test_nemo_names_invert_the_checkpoint_renames(tmp_path):
    from serinus.weights import extract_nemo, nemo_to_serinus_state_dict, read_weights

    raw = read_weights(extract_nemo(NEMO, tmp_path / "x") / "model_weights.ckpt")
    for key, value in raw.items():
        renamed = list(nemo_to_serinus_state_dict({key: value}))
        if key == "log_softmax.mlp.layer0.weight":
            renamed = ["decoder.token_embedding.weight"]  # tied: dropped by the rename, one tensor here
        for name in renamed:
            assert key in nemo_names(name), (key, name)


def test_tokenizer_langs_keeps_the_config_order(tok):
    """NeMo's aggregate tokenizer numbers spl_tokens, then the languages in the config's order."""
    spl, de, en = str(tok["spl_tokens"]), str(tok["de"]), str(tok["en"])
    de_first = langs_tokenizer({"spl_tokens": spl, "de": de, "en": en})
    en_first = langs_tokenizer({"spl_tokens": spl, "en": en, "de": de})
    assert de_first.langs == ("de", "en") and en_first.langs == ("en", "de")
    n_spl, n_en = de_first.sub_vocab_sizes["spl_tokens"], de_first.sub_vocab_sizes["en"]
    assert de_first.token_id_offset["de"] == en_first.token_id_offset["en"] == n_spl
    assert en_first.text_to_ids("Hallo", "de") == [i + n_en for i in de_first.text_to_ids("Hallo", "de")]
    cfg = {"tokenizer": {"langs": {"spl_tokens": spl, "de": de, "en": en}}}
    assert T.build_tokenizer(cfg).langs == ("de", "en")  # the schema key, as the training loop reads it
    with pytest.raises(T.ConfigError, match="holds no tokenizer.model"):
        T.build_tokenizer({"tokenizer": {"langs": {"spl_tokens": str(tok["spl_tokens"]), "en": "/nonexistent"}}})


def test_accumulate_grad_batches_averages_the_batch_losses(tok, tmp_path):
    """One step of accumulate_grad_batches=2 sees the two batches two plain steps see; at (almost) zero
    lr the weights do not move, so its loss is the mean of theirs."""
    def run(out, *extra):
        cfg, _, _ = N.load_nemo_config(YAML, seed(tok, out, *SMALL, "model.train_ds.batch_size=3",
                                                   "model.optim.lr=1e-30", "model.optim.sched.min_lr=1e-31",
                                                   "trainer.precision=32", "trainer.val_check_interval=0",
                                                   "model.validation_ds.manifest_filepath=null", *extra))
        return T.train(cfg)["losses"]

    plain = run(tmp_path / "a", "trainer.max_steps=2")
    accumulated = run(tmp_path / "b", "trainer.max_steps=1", "trainer.accumulate_grad_batches=2")
    assert len(accumulated) == 1 and abs(plain[0] - plain[1]) > 1e-5  # two different batches
    assert accumulated[0] == pytest.approx(sum(plain) / 2, rel=1e-6)
    log = [json.loads(x) for x in (tmp_path / "b" / "canary-small" / "log.jsonl").read_text().splitlines()]
    assert log[0]["batch_size"] == 6


def test_nemo_perturb_speed_is_acted_on(tok, tmp_path, capsys):
    argv = ["--config", str(YAML), *seed(tok, tmp_path, *SMALL, "model.train_ds.perturb_speed=true"), "--print-config"]
    assert T.main(argv) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["train_ds"]["perturb_speed"] is True
    assert "perturb_speed" not in out.err  # read, so not in the "does not act on" warning
