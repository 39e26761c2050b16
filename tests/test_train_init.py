"""Fine-tuning init with a changed tokenizer: token rows follow their pieces to the new ids, the rest is
new; the report (printed, and in the run folder) says what was loaded, skipped and new."""

import dataclasses
import json

import torch

from conftest import FIXTURES, REPO
from serinus import train as T
from serinus.checkpoint import load_model
from serinus.model.canary import CanaryModel, padded_vocab
from serinus.tokenizer import CanaryTokenizer
from serinus.train.init import init_from_model, piece_keys

NEMO = FIXTURES / "tiny_canary2.nemo"


def _summarize_tokenizer(tmp_path, old, order=None):
    """spl_tokens rebuilt with <|summarize|>/<|nosummarize|>, plus the checkpoint's language BPEs
    (in `order`, default the checkpoint's)."""
    from serinus.data.tokenizers import build_special_tokenizer

    spl = build_special_tokenizer(tmp_path / "spl_tokens", extra_tokens=["<|summarize|>", "<|nosummarize|>"])
    langs = old.save(tmp_path / "old")["langs"]
    models = {"spl_tokens": spl / "tokenizer.model"}
    for lang in order or [k for k in langs if k != "spl_tokens"]:
        models[lang] = tmp_path / "old" / langs[lang]["model_path"]
    return CanaryTokenizer(models)


def _new_model(old, tok):
    cfg = dataclasses.replace(old.cfg, decoder=dataclasses.replace(old.cfg.decoder, vocab_size=padded_vocab(tok.vocab_size)))
    torch.manual_seed(0)
    return CanaryModel(cfg, tok)


def _check_rows(new, old, tok, fresh) -> int:
    """Every piece of `tok` the old tokenizer has carries its old row; the others their fresh init.
    Returns how many rows moved to another id."""
    old_ids = {k: i for i, k in enumerate(piece_keys(old.tokenizer))}
    emb, old_emb = new.state_dict()["decoder.token_embedding.weight"], old.state_dict()["decoder.token_embedding.weight"]
    bias, old_bias = new.state_dict()["decoder.head_bias"], old.state_dict()["decoder.head_bias"]
    moved = 0
    for i, key in enumerate(piece_keys(tok)):
        if key in old_ids:
            assert torch.equal(emb[i], old_emb[old_ids[key]]) and bias[i] == old_bias[old_ids[key]]
            moved += i != old_ids[key]
        else:
            assert torch.equal(emb[i], fresh[i])  # a new token keeps its fresh init
    return moved


def test_rebuilt_special_tokens_keep_every_old_row(tmp_path):
    old = load_model(NEMO)
    tok = _summarize_tokenizer(tmp_path, old.tokenizer)
    new = _new_model(old, tok)
    fresh = new.state_dict()["decoder.token_embedding.weight"].clone()
    report = init_from_model(new, old, [], [], str(NEMO))
    # the two new tokens take the places of two unused placeholders; every other old token is kept
    gone = set(piece_keys(old.tokenizer)) - set(piece_keys(tok))
    assert sorted(p for _, p in gone) == ["<|spltoken28|>", "<|spltoken29|>"]
    assert report.rows["decoder.token_embedding.weight"] == (tok.vocab_size - 2, tok.vocab_size)
    assert sorted(report.new_pieces) == ["<|nosummarize|>", "<|summarize|>"]
    _check_rows(new, old, tok, fresh)
    enc = new.state_dict()["encoder.layers.0.feed_forward1.linear1.weight"]
    assert torch.equal(enc, old.state_dict()["encoder.layers.0.feed_forward1.linear1.weight"])
    assert not report.skipped and not report.new
    assert "2174 of 2176 token rows kept" in report.text()


def test_rows_follow_their_pieces_when_ids_move(tmp_path):
    old = load_model(NEMO)
    tok = _summarize_tokenizer(tmp_path, old.tokenizer, order=["fr", "es", "de", "en"])  # languages reordered
    new = _new_model(old, tok)
    fresh = new.state_dict()["decoder.token_embedding.weight"].clone()
    init_from_model(new, old, [], [], str(NEMO))
    assert _check_rows(new, old, tok, fresh) > 1000  # nearly every language row moved, and followed its piece


def test_train_writes_the_report_to_the_run_folder(tmp_path, capsys):
    old = load_model(NEMO)
    tok = _summarize_tokenizer(tmp_path / "tok", old.tokenizer)
    tok_dir = tmp_path / "tokdir"
    saved = tok.save(tok_dir)
    langs = {lang: str(tok_dir) for lang in saved["langs"]}  # each sub-model is <lang>_tokenizer.model there
    for lang, entry in saved["langs"].items():
        (tok_dir / lang).mkdir()
        (tok_dir / entry["model_path"]).rename(tok_dir / lang / "tokenizer.model")
        langs[lang] = str(tok_dir / lang)
    cfg = T.load_config(None, [
        "model.preset=init_from", f"init_from.path={NEMO}", "tokenizer.dir=null",
        f"tokenizer.langs={json.dumps(langs)}",
        f"train_ds.manifest_filepath={FIXTURES / 'audio' / 'manifest_train.jsonl'}", "train_ds.limit=2",
        "train_ds.batch_duration=null", "train_ds.batch_size=2", "validation_ds.manifest_filepath=null",
        "trainer.max_steps=1", "trainer.checkpoint_every=0", "trainer.val_check_interval=0",
        f"trainer.out_dir={tmp_path / 'run'}",
    ])
    T.train(cfg)
    out = capsys.readouterr().out
    assert "2174 of 2176 token rows kept" in out and "<|summarize|>" in out
    saved_report = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert saved_report["token_rows"]["decoder.token_embedding.weight"] == {"kept": 2174, "rows": 2176}
    assert (tmp_path / "run" / "init_report.txt").read_text().startswith(f"init_from {NEMO}")


def test_init_config_writes_the_seeds_finetuning_config_and_it_trains(tmp_path, capsys):
    import yaml

    out = tmp_path / "config" / "ft.yaml"
    assert T.main(["--init-config", str(NEMO), str(out)]) == 0
    assert "serinus train --config" in capsys.readouterr().out
    cfg = yaml.safe_load(out.read_text())
    src = load_model(NEMO)
    assert cfg["init_from_pretrained_model"] == str(NEMO)
    assert cfg["model"]["prompt_format"] == src.cfg.prompt_format
    assert cfg["model"]["encoder"]["n_layers"] == src.cfg.encoder.n_layers
    assert cfg["model"]["transf_decoder"]["config_dict"]["hidden_size"] == src.cfg.decoder.hidden_size
    assert cfg["model"]["train_ds"]["manifest_filepath"] == "???"
    langs = cfg["model"]["tokenizer"]["langs"]
    assert list(langs) == ["spl_tokens", "en", "de", "es", "fr"]  # the checkpoint's id order
    assert all((tmp_path / "config" / "ft_tokenizers" / lang / "tokenizer.model").is_file() for lang in langs)

    manifest = FIXTURES / "audio" / "manifest_train.jsonl"
    run = tmp_path / "runs"
    assert T.main(["--config", str(out), f"model.train_ds.manifest_filepath={manifest}",
                   f"model.validation_ds.manifest_filepath={manifest}", f"exp_manager.exp_dir={run}",
                   "trainer.max_steps=2", "model.train_ds.batch_duration=10", "trainer.val_check_interval=0",
                   "serinus.train_ds.limit=4", "serinus.validation_ds.limit=2"]) == 0
    printed = capsys.readouterr()
    assert "152 tensors loaded" in printed.out and "trainer.devices=-1: 1 process on cpu" in printed.err
    log = [json.loads(x) for x in next(run.glob("*/log.jsonl")).read_text().splitlines()]
    assert log[0]["loss"] < 1.0  # the checkpoint's own loss (about 0.01-0.07 here), not a random model's (7.7)
    tuned = load_model(next(run.glob("*/model")))
    assert tuned.tokenizer.vocab == src.tokenizer.vocab
