"""Tokenizers against NeMo's own outputs (reference/<model>/tokenizer.json)."""

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import FIXTURES, MODELS, REF, REFERENCE
from serinus.tokenizer import (
    CanaryTokenizer,
    UnifiedTokenizer,
    load_tokenizer,
    nemo_resolver,
)

def ref(model):
    return json.loads((REFERENCE / REF[model] / "tokenizer.json").read_text())


@pytest.mark.parametrize("model", MODELS)
def test_vocab_and_special_ids(tokenizers, model):
    tok, t = tokenizers[model], ref(model)
    assert isinstance(tok, CanaryTokenizer if model == "tiny_canary2" else UnifiedTokenizer)
    assert tok.vocab_size == t["vocab_size"]
    assert list(tok.vocab) == t["vocab"]
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == t["vocab"]
    for piece, i in t["special_ids"].items():
        assert tok.token_to_id(piece) == i, piece
        assert tok.is_special_id(i)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.nospeech_id) == (
        t["bos_id"], t["eos_id"], t["pad_id"], t["nospeech_id"])
    assert len(tok.special_tokens) == 1150  # the spl_tokens builder's list, <pad> included
    assert {"en", "de", "es", "fr"} <= set(tok.prompt_langs)
    assert not {"pnc", "itn"} & set(tok.prompt_langs)


def test_aggregate_layout(tokenizers):
    tok, t = tokenizers["tiny_canary2"], ref("tiny_canary2")
    assert tok.token_id_offset == t["token_id_offset"]
    assert list(tok.token_id_offset) == t["langs"]
    assert tok.sub_vocab_sizes == t["sub_vocab_sizes"]
    assert tok.langs == ("en", "de", "es", "fr")
    assert tok.spl_id_range == range(0, 1152)
    assert not tok.is_special_id(1152)  # en's <unk>
    assert tok.token_to_id("▁the", "en") == 1157
    assert (tok.token_to_id("▁", "en"), tok.token_to_id("▁", "es")) == (1362, 1875)


@pytest.mark.parametrize("model", MODELS)
def test_encodings(tokenizers, model):
    tok = tokenizers[model]
    for e in ref(model)["encodings"]:
        ids = tok.text_to_ids(e["text"], e["lang"])
        assert ids == e["ids"], e["text"]
        assert tok.ids_to_tokens(ids) == e["pieces"], e["text"]
        assert tok.ids_to_text(e["ids"]) == e["decoded"], e["text"]


@pytest.mark.parametrize("model", MODELS)
def test_decode_mixed(tokenizers, model):
    tok, d = tokenizers[model], ref(model)["decode_mixed"]
    assert tok.ids_to_text(d["ids"]) == d["ids_to_text"]
    assert tok.ids_to_text(np.array(d["ids"])) == d["ids_to_text"]
    assert tok.ids_to_text(torch.tensor(d["ids"])) == d["ids_to_text"]


def test_text_decode_conventions(tokenizers):
    agg, uni = tokenizers["tiny_canary2"], tokenizers["tiny_canary2_unified"]
    text = "<|3|> it's <|7|> <|8|> almost <|9|>"
    # Aggregate: leading space kept, special tokens glued to the words.
    assert agg.ids_to_text(agg.text_to_ids(text, "en")) == "<|3|> it's<|7|><|8|> almost<|9|>"
    assert agg.ids_to_text(agg.text_to_ids("hello", "en")) == " hello"
    # Unified: plain SentencePiece round trip.
    assert uni.ids_to_text(uni.text_to_ids(text)) == text
    assert uni.ids_to_text(uni.text_to_ids("hello")) == "hello"


def test_aggregate_eos_and_timestamp_rules(tokenizers):
    tok = tokenizers["tiny_canary2"]
    eos = tok.eos_id
    assert tok.text_to_ids("hello world<|endoftext|>", "en") == tok.text_to_ids("hello world", "en") + [eos]
    assert tok.text_to_ids("<|endoftext|>", "en") == [eos]
    # NeMo's positional rule: <|a|> w1 <|b|> <|c|> w2 <|d|>, wherever the tokens stood.
    w = lambda s: tok.text_to_ids(s, "en")  # noqa: E731
    ts = [tok.timestamp_token_id(n) for n in (1, 2, 3, 4)]
    assert w("<|1|><|2|> a b <|3|><|4|>") == [ts[0]] + w("a") + [ts[1], ts[2]] + w("b") + [ts[3]]
    # Words are encoded one by one, so extra spaces vanish (unlike plain text).
    assert w("<|1|> a   b <|2|>") == [ts[0]] + w("a") + [ts[1]] + w("b")
    # Timestamps but no words: only the last one survives (NeMo does the same).
    assert w("<|1|> <|2|>") == [ts[1]]
    assert tok.text_to_tokens("<|3|> hello <|4|>", "en") == ["<|3|>", "▁", "he", "ll", "o", "<|4|>"]
    with pytest.raises(ValueError, match=r"<\|900\|>"):
        tok.text_to_ids("<|900|> hi <|901|>", "en")


@pytest.mark.parametrize("model", MODELS)
def test_timestamp_helpers(tokenizers, model):
    tok = tokenizers[model]
    assert tok.max_timestamp_frame == 899
    ids = tok.timestamp_token_ids
    assert len(ids) == 900 and ids[0] == 205 and ids[-1] == 1104
    for n in (0, 1, 7, 899):
        i = tok.timestamp_token_id(n)
        assert i == tok.token_to_id(f"<|{n}|>") and tok.timestamp_frame(i) == n and tok.is_timestamp_id(i)
    assert not tok.is_timestamp_id(tok.token_to_id("<|en|>"))
    assert tok.timestamp_frame(tok.eos_id) is None
    with pytest.raises(ValueError, match="<|900|>"):
        tok.timestamp_token_id(900)


def test_text_to_tokens_shows_unknown_surface(tokenizers):
    # Like NeMo (SentencePiece's encode_as_pieces), not "<unk>": the CTC aligner's char items rely on it.
    uni, agg = tokenizers["tiny_canary2_unified"], tokenizers["tiny_canary2"]
    assert uni.text_to_tokens("狐") == ["▁", "狐"]
    assert uni.ids_to_tokens(uni.text_to_ids("狐")) == ["▁", "<unk>"]
    assert agg.text_to_tokens("5", "en") == ["▁", "5"]


def test_ctc_aligner_tokenizer(extracted, tokenizers):
    """The CTC model packed in v2style uses a plain SentencePieceTokenizer on the same file."""
    d = extracted["tiny_canary2_v2style"]
    cfg = yaml.safe_load((d / "timestamps_asr_model_config.yaml").read_text())["tokenizer"]
    ctc = load_tokenizer(cfg, nemo_resolver(d))
    assert ctc.vocab == tokenizers["tiny_canary2_unified"].vocab and ctc.unk_id == 0
    # NeMo's aligner tokenises word by word; the char items record those tokens (surface form),
    # their ids, and ids_to_text of each id.
    cases = json.loads((REFERENCE / "tiny_canary2_v2style" / "alignment_gt.json").read_text())["cases"]
    checked = 0
    for c in cases:
        chars = c["timestamp"].get("char") if c["timestamp_type"] == "char" else None
        if not chars:
            continue
        words = " ".join(c["text"].split()).split(" ")
        assert [x["token"] for x in chars] == [t for w in words for t in ctc.text_to_tokens(w)], c["name"]
        ids = [i for w in words for i in ctc.text_to_ids(w)]
        assert [x["token_id"] for x in chars] == ids, c["name"]
        assert [x["char"] for x in chars] == [ctc.ids_to_text([i]) for i in ids], c["name"]
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("model", ["tiny_canary2", "tiny_canary2_unified"])
def test_save_reload(tokenizers, model, tmp_path):
    tok = tokenizers[model]
    cfg = tok.save(tmp_path)
    assert cfg["type"] == ("agg" if model == "tiny_canary2" else "bpe")
    # Plain data, as it would sit in a yaml config. The order of `langs` fixes the id offsets,
    # so it must survive (sort_keys=False).
    assert list(cfg.get("langs", {})) == list(getattr(tok, "token_id_offset", {}))
    cfg = yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False))
    again = load_tokenizer(cfg, resolve=lambda p: tmp_path / p)
    assert type(again) is type(tok) and again.vocab == tok.vocab
    assert again.special_tokens == tok.special_tokens
    for e in ref(model)["encodings"]:
        assert again.text_to_ids(e["text"], e["lang"]) == e["ids"]
        assert again.ids_to_text(e["ids"]) == e["decoded"]


def test_errors(tokenizers, tmp_path):
    agg, uni = tokenizers["tiny_canary2"], tokenizers["tiny_canary2_unified"]
    with pytest.raises(ValueError, match=r"'it'.*en, de, es, fr"):
        agg.text_to_ids("ciao", "it")
    with pytest.raises(ValueError, match=r"'xx'.*known languages"):
        uni.text_to_ids("hi", "xx")
    with pytest.raises(ValueError, match="out of range"):
        agg.ids_to_text([3, 2176])
    with pytest.raises(ValueError, match="out of range"):
        uni.ids_to_text([1535])  # the decoder's padding row
    with pytest.raises(ValueError, match=r"<\|nope\|>"):
        agg.token_to_id("<|nope|>")
    with pytest.raises(ValueError, match="not in the 'en' vocabulary"):
        agg.token_to_id("zzzz", "en")
    with pytest.raises(ValueError, match=r"unknown tokenizer type 'wpe'.*agg, bpe"):
        load_tokenizer({"type": "wpe", "model_path": "x"})
    with pytest.raises(ValueError, match="spl_tokens"):
        load_tokenizer({"type": "agg", "langs": {"en": {"type": "bpe", "model_path": "x"}}},
                       resolve=lambda p: FIXTURES / "tokenizers/en/tokenizer_spe_bpe_v256/tokenizer.model")
    with pytest.raises(ValueError, match="nemo:abc"):
        load_tokenizer({"type": "bpe", "model_path": "nemo:abc"})
    with pytest.raises(FileNotFoundError):
        load_tokenizer({"type": "bpe", "model_path": str(tmp_path / "missing.model")})


def test_region_code_fallback(tmp_path):
    # NeMo maps "en" to "en-US" when a model's languages are region codes.
    t = FIXTURES / "tokenizers"
    tok = CanaryTokenizer({"spl_tokens": t / "spl_tokens/tokenizer.model",
                           "en-US": t / "en/tokenizer_spe_bpe_v256/tokenizer.model"})
    assert tok.langs == ("en-US",)
    assert tok.text_to_ids("hello", "en") == tok.text_to_ids("hello", "en-US")


def test_ids_to_text_is_fast(tokenizers):
    import time

    tok = tokenizers["tiny_canary2"]
    ids = list(range(tok.vocab_size)) * 20
    t0 = time.perf_counter()
    for _ in range(10):
        tok.ids_to_text(ids)
    assert time.perf_counter() - t0 < 1.0
