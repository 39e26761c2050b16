"""Joint CTC/attention and CTC-only training, language filters, max_time, the built-in tokenizer
build, per-language validation, and a CTC model packed as the aligner of a trained AED."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import AUDIO, DATA, FIXTURES
from serinus import train as T

TRAIN = DATA / "synth-v1" / "asr_train.jsonl"
DEV = DATA / "synth-v1" / "asr_dev.jsonl"


def small(out_dir, *extra, model_type="aed"):
    return T.load_config(None, [
        f"model.type={model_type}", f"tokenizer.dir={out_dir}/tok", "tokenizer.vocab_size=64",
        f"train_ds.manifest_filepath={TRAIN}", "train_ds.source_langs=[en]", "train_ds.limit=12",
        "train_ds.batch_size=4", f"validation_ds.manifest_filepath={DEV}", "validation_ds.source_langs=[en]",
        "validation_ds.limit=4", "model.encoder.n_layers=1", "model.encoder.d_model=32", "model.encoder.n_heads=2",
        "model.encoder.subsampling_conv_channels=16", "model.decoder.hidden_size=32", "model.decoder.inner_size=64",
        "model.decoder.num_layers=1", "model.decoder.num_attention_heads=2", "model.decoder.max_sequence_length=128",
        "optim.lr=3e-3", "optim.warmup_steps=2", "trainer.log_every=100", "trainer.val_check_interval=0",
        "trainer.checkpoint_every=0", f"trainer.out_dir={out_dir}", *extra,
    ])


def test_joint_loss_is_the_weighted_sum_of_ctc_and_attention(tmp_path):
    from serinus.data.dataset import PromptedDataset
    from serinus.model.canary import sequence_loss

    cfg = small(tmp_path, "model.ctc_weight=0.3", "model.spec_augment=null")
    task = T.make_task(cfg)
    tok = T.build_tokenizer(cfg)
    assert (tmp_path / "tok" / "spl_tokens").is_dir() and (tmp_path / "tok" / "en").is_dir()
    torch.manual_seed(0)
    model = task.build_model(tok).eval()
    batch = PromptedDataset(tok, "canary2")[list(T.load_cuts(cfg["train_ds"], tok))[:3]]
    loss, parts = task.loss(model, batch, torch.device("cpu"))
    # independently: the decoder's CE on answer+EOS, and torch's CTC on the encoder's head output
    inputs, labels = batch.decoder_inputs_outputs()
    lp = model(batch.audio, batch.audio_lens, inputs, batch.prompted_transcript_lens - 1)
    att = sequence_loss(lp, labels, tok.pad_id, batch.prompt_lens, batch.prompted_transcript_lens - 1)
    enc, enc_lens = model.encode_raw(batch.audio, batch.audio_lens)
    ctc_lp = model.ctc_head(enc.transpose(1, 2)).float().log_softmax(-1)
    ctc = F.ctc_loss(ctc_lp.transpose(0, 1), batch.transcript, enc_lens, batch.transcript_lens,
                     blank=model.cfg.decoder.vocab_size, reduction="mean", zero_infinity=True)
    torch.testing.assert_close(parts["attention"], att)
    torch.testing.assert_close(parts["ctc"], ctc)
    torch.testing.assert_close(loss, 0.3 * ctc + 0.7 * att)


def test_language_filter_and_unknown_language(tmp_path):
    cfg = small(tmp_path)
    cuts = T.load_cuts(dict(cfg["train_ds"], limit=None), None)
    assert len(cuts) == 135 and all(c.supervisions[0].language == "en" for c in cuts)
    with pytest.raises(T.ConfigError, match="source_langs"):
        T.load_cuts(dict(cfg["train_ds"], source_langs=["xx"]), None)


@pytest.mark.parametrize("value, seconds", [("00:00:30:00", 1800), ("01:00:00", 3600), (30, 1800), ("1.5", 90),
                                            (None, None)])
def test_max_time_formats(value, seconds):
    assert T.parse_max_time(value) == seconds


def test_bad_max_time_and_misspelt_key():
    with pytest.raises(T.ConfigError, match="max_time"):
        T.load_config(None, ["trainer.max_time=half an hour"])
    with pytest.raises(T.ConfigError, match="did you mean 'ctc_weight'"):
        T.load_config(None, ["model.ctc_wieght=0.3"])


def test_aed_with_ctc_head_trains_stops_on_time_and_reports_per_language(tmp_path):
    cfg = small(tmp_path, "model.ctc_weight=0.3", "trainer.max_steps=1000", "trainer.max_time=0.05")  # 3 s
    hist = T.train(cfg)
    assert 1 <= len(hist["losses"]) < 1000  # stopped by the clock
    val = hist["val"][-1]
    assert {"wer", "wer_en", "val_ctc_loss", "val_attention_loss"} <= set(val)
    from serinus import CanaryModel

    model = CanaryModel.from_pretrained(tmp_path / "model")  # the final model folder
    assert model.ctc_head is not None and model.cfg.ctc_weight == 0.3
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("ctc" in r and "attention" in r for r in log)


def test_ctc_model_trains_and_packs_as_the_aligner(tmp_path):
    from serinus import CanaryModel
    from serinus.checkpoint import load_ctc_model, main as pack_main

    # BPE-200: at 80 ms a frame, a character-sized vocabulary would not fit CTC's frames
    ctc_cfg = small(tmp_path / "ctc", "trainer.max_steps=8", "train_ds.limit=8", "tokenizer.vocab_size=200",
                    model_type="ctc")
    hist = T.train(ctc_cfg)
    first, last = sum(hist["losses"][:2]) / 2, sum(hist["losses"][-2:]) / 2
    assert last < first
    assert "wer_en" in hist["val"][-1]
    ctc = load_ctc_model(tmp_path / "ctc" / "model")
    assert ctc.cfg.num_classes == ctc.tokenizer.vocab_size

    # into a Canary that transcribes the clip (the fixture; an 8-step AED would print noise)
    out = tmp_path / "packed"
    assert pack_main([str(FIXTURES / "tiny_canary2.nemo"), str(tmp_path / "ctc" / "model"), str(out)]) == 0
    model = CanaryModel.from_pretrained(out)
    assert model.aligner is not None
    hyp = model.transcribe([str(AUDIO / "en_01.wav")], timestamps=True)[0]
    assert hyp.error is None
    words = hyp.timestamp["word"]
    assert [w["word"] for w in words] == hyp.text.split()
    assert hyp.text.strip() == "The quick brown fox jumps over the lazy dog." and len(words) == 9
    times = [(w["start"], w["end"]) for w in words]
    assert all(s is not None and s <= e for s, e in times) and times == sorted(times)


def test_ctc_task_refuses_an_aggregate_tokenizer(tmp_path):
    from serinus.data.tokenizers import build_special_tokenizer, train_bpe_tokenizer

    build_special_tokenizer(tmp_path / "agg" / "spl_tokens")
    train_bpe_tokenizer(["a b c d e f g h"] * 10, tmp_path / "agg" / "en", 20)
    cfg = small(tmp_path, f"tokenizer.dir={tmp_path / 'agg'}", model_type="ctc")
    with pytest.raises(T.ConfigError, match="one SentencePiece"):
        T.make_task(cfg).build_model(T.build_tokenizer(cfg))


def test_ctc_spells_what_is_said_and_follows_its_schedule(tmp_path):
    """A translation row's CTC target is its manifest's `source_text` (the same audio's transcript);
    a translation row without one adds no CTC loss."""
    from serinus.data.dataset import PromptedDataset

    ast = DATA / "synth-v1" / "ast_train.jsonl"
    cfg = small(tmp_path, "model.ctc_weight=0.3", "model.spec_augment=null", "model.ctc_weight_start=0.9",
                "model.ctc_weight_steps=10", "train_ds.source_langs=null", "train_ds.target_langs=null",
                f"train_ds.manifest_filepath=[{TRAIN},{ast}]", "train_ds.lang_pairs=[en-en,en-de]")
    task = T.make_task(cfg)
    tok = T.build_tokenizer(cfg)
    torch.manual_seed(0)
    model = task.build_model(tok).eval()
    cuts = list(T.load_cuts(cfg["train_ds"]))
    custom = lambda c: c.supervisions[0].custom or {}  # noqa: E731
    pairs = {custom(c).get("source_lang", "en") + "-" + custom(c).get("target_lang", "en") for c in cuts}
    assert pairs == {"en-en", "en-de"}
    ast_cuts = [c for c in cuts if custom(c).get("target_lang") == "de"][:2]
    by_audio = {c.recording.sources[0].source: c for c in cuts if custom(c).get("target_lang") == "en"}
    asr = [by_audio[c.recording.sources[0].source] for c in ast_cuts]  # the same audio, transcribed
    assert [custom(c)["source_text"] for c in ast_cuts] == [c.supervisions[0].text for c in asr]
    ds = PromptedDataset(tok, "canary2")
    batch = ds[asr + ast_cuts]
    assert torch.equal(batch.spoken[:2], batch.spoken[2:]) and torch.equal(batch.spoken_lens[:2], batch.spoken_lens[2:])
    _, mixed = task.loss(model, batch, torch.device("cpu"))
    _, only_asr = task.loss(model, ds[asr], torch.device("cpu"))
    torch.testing.assert_close(mixed["ctc"], only_asr["ctc"], atol=1e-5, rtol=1e-4)  # same audio, same text
    bare = [c for c in ast_cuts]
    for c in bare:
        c.supervisions[0].custom = {k: v for k, v in custom(c).items() if k != "source_text"}
    _, without = task.loss(model, ds[asr[:1] + bare], torch.device("cpu"))
    _, first = task.loss(model, ds[asr[:1]], torch.device("cpu"))
    torch.testing.assert_close(without["ctc"], first["ctc"], atol=1e-5, rtol=1e-4)  # rows without it add nothing
    loss, parts = task.loss(model.train(), ds[asr], torch.device("cpu"))  # step 0 of the schedule: w = 0.9
    torch.testing.assert_close(loss, 0.9 * parts["ctc"] + 0.1 * parts["attention"])
    task.step = 5
    assert abs(task.ctc_weight(0.3) - 0.6) < 1e-9
    task.step = 50
    assert task.ctc_weight(0.3) == 0.3


def test_char_tokenizer_build(tmp_path):
    """tokenizer.type=char builds one piece per character of the training text (no merges)."""
    cfg = small(tmp_path, "tokenizer.type=char", "tokenizer.vocab_size=200")
    tok = T.build_tokenizer(cfg)
    import sentencepiece as spm

    sub = spm.SentencePieceProcessor(model_file=str(next((tmp_path / "tok" / "en").glob("*/tokenizer.model"))))
    pieces = [sub.id_to_piece(i).lstrip("▁") for i in range(sub.get_piece_size())]
    assert all(len(p) <= 1 or p.startswith("<") for p in pieces)
    text = "The chairs are new."
    ids = tok.text_to_ids(text, "en")
    assert tok.ids_to_text(ids).strip() == text and len(ids) >= len(text.replace(" ", ""))
    with pytest.raises(T.ConfigError, match="tokenizer.type"):
        small(tmp_path / "bad", "tokenizer.type=wordpiece")


def test_tokenizer_is_built_into_the_run_folder_by_default(tmp_path):
    cfg = small(tmp_path, "tokenizer.dir=null", "tokenizer.type=char")
    T.build_tokenizer(cfg)
    assert cfg["tokenizer"]["dir"] == str(tmp_path / "tokenizer")
    assert (tmp_path / "tokenizer" / "spl_tokens").is_dir() and (tmp_path / "tokenizer" / "en").is_dir()


def test_translation_rows_spell_nothing_where_the_tokenizer_lacks_the_source_language(tmp_path):
    # an en -> de model may have a German vocabulary only: its translation rows carry no CTC target
    # (and no error), whatever their `source_text`
    from serinus.data.dataset import PromptedDataset
    from serinus.data.tokenizers import build_special_tokenizer, train_bpe_tokenizer

    ast = DATA / "synth-v1" / "ast_train.jsonl"
    lines = [json.loads(line) for line in ast.read_text().splitlines()]
    build_special_tokenizer(tmp_path / "agg" / "spl_tokens")
    train_bpe_tokenizer([x["text"] for x in lines if x["target_lang"] == "de"], tmp_path / "agg" / "de", 128)
    cfg = small(tmp_path, f"tokenizer.dir={tmp_path / 'agg'}", "train_ds.source_langs=null",
                "train_ds.target_langs=[de]", f"train_ds.manifest_filepath={ast}")
    tok = T.build_tokenizer(cfg)
    cuts = list(T.load_cuts(cfg["train_ds"]))[:2]
    assert all((c.supervisions[0].custom or {}).get("source_text") for c in cuts)
    batch = PromptedDataset(tok, "canary2")[cuts]
    assert batch.spoken_lens.tolist() == [0, 0] and batch.transcript_lens.min() > 0


def test_a_character_ctc_encoder_starts_an_aed_with_its_own_tokenizer(tmp_path):
    """The multilingual recipe's two stages: a character CTC model, then an AED whose encoder comes
    from it (init_from.include=[encoder.]) and whose tokenizer the run builds itself
    (tokenizer.vocab_size), not the CTC model's characters."""
    from serinus.checkpoint import load_ctc_model
    from serinus.tokenizer import CanaryTokenizer
    from serinus.train.loop import build_model as build_run_model, setup_runtime

    T.train(small(tmp_path / "ctc", "trainer.max_steps=2", "train_ds.limit=4", "tokenizer.type=char",
                  "tokenizer.vocab_size=100", "trainer.val_check_interval=0", "trainer.final_validation=false",
                  model_type="ctc"))
    ctc = load_ctc_model(tmp_path / "ctc" / "model")
    cfg = small(tmp_path / "aed", f"init_from.path={tmp_path / 'ctc' / 'model'}", "init_from.include=[encoder.]",
                "tokenizer.dir=null")
    tok = T.build_tokenizer(cfg)
    assert isinstance(tok, CanaryTokenizer) and (tmp_path / "aed" / "tokenizer" / "spl_tokens").is_dir()
    model, report = build_run_model(cfg, T.make_task(cfg), tok, setup_runtime(cfg["trainer"]))
    for name, value in ctc.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    assert model.cfg.decoder.vocab_size >= tok.vocab_size
