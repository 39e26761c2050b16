"""Tokenizer builders reproduce NeMo's: the fixtures' spl_tokens, per-language and unified models."""

import json

import pytest
import sentencepiece as spm

from conftest import FIXTURES
from serinus.data import tokenizers as tk

TOK = FIXTURES / "tokenizers"
CORPUS = TOK / "text_corpus"


def same_model(a, b) -> bool:
    """Equal pieces, and (with protobuf) equal trainer and normaliser specs too."""
    return pieces(a) == pieces(b) and (pb is None or model_proto(a) == model_proto(b))


def pieces(path):
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [
        (sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_unknown(i)) for i in range(sp.get_piece_size())
    ]


try:  # reading the model proto needs protobuf, which sentencepiece does not require
    from sentencepiece import sentencepiece_model_pb2 as pb
except ImportError:
    pb = None


def model_proto(path):
    """The whole model (pieces, trainer and normaliser spec) without the machine-specific paths."""
    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    m.trainer_spec.ClearField("input")
    m.trainer_spec.ClearField("model_prefix")
    return m


def test_special_token_list_matches_fixture_order():
    assert tk.canary2_special_tokens() == (TOK / "spl_tokens" / "train_text.txt").read_text().split("\n")
    assert len(tk.canary2_special_tokens()) == 1150  # + <unk> + "▁" = 1152


def test_special_tokenizer_equals_fixture(tmp_path):
    out = tk.build_special_tokenizer(tmp_path / "spl_tokens")
    ref = TOK / "spl_tokens"
    assert same_model(out / "tokenizer.model", ref / "tokenizer.model")
    for name in ("train_text.txt", "tokenizer.vocab", "vocab.txt"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_special_tokenizer_ids_match_nemo_model_json(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tk.build_special_tokenizer(tmp_path) / "tokenizer.model"))
    ref = json.loads((FIXTURES / "reference" / "tiny_canary2" / "tokenizer.json").read_text())["special_ids"]
    assert {t: sp.piece_to_id(t) for t in ref} == ref


def test_extra_tokens_keep_every_other_id(tmp_path):
    base = tk.canary2_special_tokens()
    extra = tk.canary2_special_tokens(["summarize", "<|nosummarize|>"])
    assert len(extra) == len(base) and extra[-2:] == ["<|summarize|>", "<|nosummarize|>"]
    assert extra[:-2] == base[:-2]  # they take the last two <|spltokenN|> slots
    out = tk.build_special_tokenizer(tmp_path, ["summarize", "nosummarize"])
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == 1152
    ids = [sp.piece_to_id(t) for t in ("<|summarize|>", "<|nosummarize|>", "<|en|>", "<|spltoken27|>")]
    assert ids == [1149, 1150, 62, 1148]
    with pytest.raises(ValueError, match="already"):
        tk.canary2_special_tokens(["pnc"])


@pytest.mark.parametrize("lang", ["en", "de", "es", "fr"])
def test_per_language_bpe_equals_fixture(tmp_path, lang):
    out = tk.train_bpe_tokenizer(CORPUS / f"{lang}.txt", tmp_path, 256)
    ref = TOK / lang / "tokenizer_spe_bpe_v256"
    assert out.name == "tokenizer_spe_bpe_v256"
    assert same_model(out / "tokenizer.model", ref / "tokenizer.model")
    for name in ("tokenizer.vocab", "vocab.txt"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_unified_bpe_equals_fixture(tmp_path):
    out = tk.train_unified_tokenizer(CORPUS / "all.txt", tmp_path, 1535)
    ref = TOK / "unified" / "tokenizer_spe_bpe_v1535"
    assert same_model(out / "tokenizer.model", ref / "tokenizer.model")
    assert (out / "tokenizer.vocab").read_bytes() == (ref / "tokenizer.vocab").read_bytes()


@pytest.mark.skipif(pb is None, reason="protobuf is not installed")
def test_trainer_spec_matches_fixture():
    # The fixtures' own record of NeMo's options; our builders pass the same ones.
    ref = model_proto(TOK / "en" / "tokenizer_spe_bpe_v256" / "tokenizer.model")
    ts = ref.trainer_spec
    assert (ts.model_type, ts.vocab_size, ts.character_coverage, ts.bos_id, ts.eos_id) == (2, 256, 1.0, -1, -1)
    assert ts.shuffle_input_sentence and not ts.hard_vocab_limit
    assert ref.normalizer_spec.name == "nmt_nfkc" and not ref.normalizer_spec.remove_extra_whitespaces


def test_cli_train_from_manifest(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    lines = [l for l in (CORPUS / "en.txt").read_text().splitlines() if l]
    with open(manifest, "w") as f:
        for l in lines:
            f.write(json.dumps({"audio_filepath": "x.wav", "duration": 1.0, "text": l, "target_lang": "en"}) + "\n")
        f.write(json.dumps({"audio_filepath": "y.wav", "duration": 1.0, "text": "Nicht", "target_lang": "de"}) + "\n")
    args = ["train", "--vocab-size", "256", "--lang", "en", "--manifest", str(manifest), str(tmp_path / "en")]
    assert tk.main(args) == 0
    out = tmp_path / "en" / "tokenizer_spe_bpe_v256"
    assert (tmp_path / "en" / "text_corpus" / "document.txt").read_text().splitlines() == lines
    assert pieces(out / "tokenizer.model") == pieces(TOK / "en" / "tokenizer_spe_bpe_v256" / "tokenizer.model")
    assert tk.main(["special", str(tmp_path / "spl")]) == 0
    assert "1152 pieces" in capsys.readouterr().out
    args = ["train", "--manifest", str(manifest), "--lang", "xx", "--vocab-size", "64", str(tmp_path / "x")]
    assert tk.main(args) == 1
