"""Prompt formats against NeMo's own encodings (reference/<model>/prompts.json, teacher_forced.npz)."""

import io
import json

import numpy as np
import pytest
import sentencepiece as spm

from conftest import AUDIO, FIXTURES, MODELS, REF, REFERENCE
from serinus.prompt import (
    CANARY,
    CANARY2,
    PromptFormat,
    Slot,
    encode_prompt,
    encode_training_example,
    resolve_slots,
    select_slots,
)
from serinus.tokenizer import CanaryTokenizer

def prompts(model):
    return json.loads((REFERENCE / REF[model] / "prompts.json").read_text())


@pytest.mark.parametrize("model", MODELS)
def test_prompt_cases(tokenizers, model):
    tok = tokenizers[model]
    cases = {c["name"]: c for c in prompts(model)["user_turn_cases"]}
    for name, c in cases.items():
        ids = encode_prompt(tok, "canary2", c["slots"])
        if "error" in c:
            # NeMo's aggregate tokenizer fails when every slot is already a token (no
            # `prompt_language` gets injected). We always know the route, so we encode it anyway,
            # exactly as NeMo does once prompt_language is given.
            assert "prompt_language" in c["error"]
            assert ids == cases["explicit_tokens_with_prompt_language"]["context_ids"]
        else:
            assert ids == c["context_ids"], name
            assert tok.ids_to_tokens(ids) == c["pieces"], name
    plain = 9 if model == "tiny_canary2" else 10
    assert len(cases["asr_en_pnc"]["context_ids"]) == plain


@pytest.mark.parametrize("model", MODELS)
def test_defaults(tokenizers, model):
    tok, p = tokenizers[model], prompts(model)
    case = next(c for c in p["user_turn_cases"] if c["name"] == "asr_en_pnc")
    assert encode_prompt(tok, "canary2", {"source_lang": "en", "target_lang": "en"}) == case["context_ids"]
    defaults = {s.name: s.default for s in CANARY2.slots if s.name in p["defaults_filled_in"]}
    assert defaults == p["defaults_filled_in"]


@pytest.mark.parametrize("model", MODELS)
def test_training_cases(tokenizers, model):
    tok = tokenizers[model]
    for c in prompts(model)["training_cases_prompt_format_fn"]:
        ex = encode_training_example(tok, "canary2", c["text"], c["cut_custom"], c["supervision_language"])
        assert ex.context_ids == c["context_ids"], c["text"]
        assert ex.answer_ids == c["answer_ids"], c["text"]
        assert ex.input_ids == c["input_ids"], c["text"]
        assert ex.mask == c["mask"], c["text"]
        # lang defaults to the target language, which these cases share with the supervision.
        assert encode_training_example(tok, "canary2", c["text"], c["cut_custom"]) == ex


@pytest.mark.parametrize("model", ["tiny_canary2", "tiny_canary2_unified"])
def test_teacher_forced_batch(tokenizers, model):
    """The dataloader's prompt and prompted_transcript for en_01..03 of the manifest."""
    tok = tokenizers[model]
    z = np.load(REFERENCE / model / "teacher_forced.npz")
    entries = [json.loads(line) for line in (AUDIO / "manifest.jsonl").read_text().splitlines()[:3]]
    for b, e in enumerate(entries):
        ex = encode_training_example(tok, "canary2", e["text"], select_slots("canary2", e), e["lang"])
        assert ex.context_ids == z["prompt"][b, : z["prompt_lens"][b]].tolist()
        assert ex.answer_ids == z["transcript"][b, : z["transcript_lens"][b]].tolist()
        assert ex.input_ids == z["prompted_transcript"][b, : z["prompted_transcript_lens"][b]].tolist()


def test_empty_transcript_unified(tokenizers):
    # NeMo tokenises "text<|endoftext|>" in one go, so an empty unified answer is a lone "▁".
    uni, agg = tokenizers["tiny_canary2_unified"], tokenizers["tiny_canary2"]
    slots = {"source_lang": "en", "target_lang": "en"}
    assert encode_training_example(uni, "canary2", "", slots).answer_ids == [uni.token_to_id("▁")]
    assert encode_training_example(agg, "canary2", "", slots).answer_ids == []


def test_bool_spellings(tokenizers):
    tok = tokenizers["tiny_canary2"]
    base = {"source_lang": "en", "target_lang": "en"}
    for v in ("yes", "1", "True", "true", "itn", "<|itn|>", True, 1):  # a JSON manifest's true or 1 too
        assert resolve_slots(tok, "canary2", {**base, "itn": v})["itn"] == "<|itn|>", v
    # "Yes" is accepted but gives the "no" token, as in NeMo 3.0.0.
    for v in ("no", "No", "0", "False", "false", "noitn", "<|noitn|>", "Yes", False, 0):
        assert resolve_slots(tok, "canary2", {**base, "itn": v})["itn"] == "<|noitn|>", v
    with pytest.raises(ValueError, match=r"slot 'pnc' does not accept 'maybe'; allowed: yes, Yes"):
        encode_prompt(tok, "canary2", {**base, "pnc": "maybe"})
    with pytest.raises(ValueError, match=r"slot 'pnc' takes a string, got 2"):
        encode_prompt(tok, "canary2", {**base, "pnc": 2})


def test_lang_slots_accept_tokens(tokenizers):
    for tok in tokenizers.values():
        a = encode_prompt(tok, "canary2", {"source_lang": "<|fr|>", "target_lang": "es", "decodercontext": "El tren"})
        b = encode_prompt(tok, "canary2", {"source_lang": "fr", "target_lang": "<|es|>", "decodercontext": "El tren"})
        assert a == b


def test_prompt_errors(tokenizers):
    tok = tokenizers["tiny_canary2"]
    base = {"source_lang": "en", "target_lang": "en"}
    with pytest.raises(ValueError, match=r"unknown slot 'task'.*decodercontext, emotion, source_lang"):
        encode_prompt(tok, "canary2", {**base, "task": "asr"})
    with pytest.raises(ValueError, match=r"needs slot 'target_lang'"):
        encode_prompt(tok, "canary2", {"source_lang": "en"})
    with pytest.raises(ValueError, match=r"unknown language 'xx' for slot 'source_lang'.*\ben\b"):
        encode_prompt(tok, "canary2", {**base, "source_lang": "xx"})
    with pytest.raises(ValueError, match=r"'<\|emo:bored\|>'; allowed: <\|emo:undefined\|>"):
        encode_prompt(tok, "canary2", {**base, "emotion": "<|emo:bored|>"})
    with pytest.raises(ValueError, match=r"unknown prompt format 'canary3'; known formats: canary, canary2"):
        encode_prompt(tok, "canary3", base)
    # `it` has a prompt token but no text tokenizer in this aggregate: fine without context,
    # an error once its tokenizer is needed.
    assert len(encode_prompt(tok, "canary2", {"source_lang": "en", "target_lang": "it"})) == 9
    with pytest.raises(ValueError, match=r"'it'.*en, de, es, fr"):
        encode_prompt(tok, "canary2", {"source_lang": "en", "target_lang": "it", "decodercontext": "ciao"})
    with pytest.raises(ValueError, match=r"'it'.*en, de, es, fr"):
        encode_training_example(tok, "canary2", "ciao", {"source_lang": "en", "target_lang": "it"})


def test_new_slot_by_entry(tokenizers):
    tok = tokenizers["tiny_canary2"]
    base = {"source_lang": "en", "target_lang": "en"}
    fmt = CANARY2.add_slot(Slot("summarize", "bool", default="no"))
    assert fmt.template[-1] == "{summarize}" and CANARY2.template[-1] == "{diarize}"
    assert resolve_slots(tok, fmt, {**base, "summarize": "yes"})["summarize"] == "<|summarize|>"
    assert resolve_slots(tok, fmt, base)["summarize"] == "<|nosummarize|>"
    # The tiny vocabulary has no <|summarize|>, so map it to spare tokens to encode for real.
    fmt = CANARY2.add_slot(Slot("summarize", "bool", default="no", tokens=("<|spltoken0|>", "<|spltoken1|>")),
                           after="pnc")
    ids = encode_prompt(tok, fmt, {**base, "summarize": "yes"})
    plain = encode_prompt(tok, "canary2", base)
    assert ids == plain[:6] + [tok.token_to_id("<|spltoken0|>")] + plain[6:]
    with pytest.raises(ValueError, match="do not match"):
        PromptFormat("bad", ("{a}",), (Slot("b", "text"),))


def test_select_slots():
    entry = {"audio_filepath": "a.wav", "text": "hi", "source_lang": "en", "target_lang": "en",
             "pnc": "yes", "taskname": "asr", "lang": "en"}
    assert select_slots("canary2", entry) == {"source_lang": "en", "target_lang": "en", "pnc": "yes"}
    assert select_slots("canary", entry)["taskname"] == "asr"


@pytest.fixture(scope="module")
def v1_tokenizer(tmp_path_factory):
    """A canary-1b style aggregate: v1 special tokens plus the en/de fixture models."""
    toks = ["<|nospeech|>", "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|pnc|>", "<|nopnc|>",
            "<|transcribe|>", "<|translate|>", "<|en|>", "<|de|>"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a"]), model_writer=buf, vocab_size=len(toks) + 3,
                                   user_defined_symbols=toks, model_type="bpe", hard_vocab_limit=False,
                                   bos_id=-1, eos_id=-1, minloglevel=2)
    d = tmp_path_factory.mktemp("v1")
    (d / "spl.model").write_bytes(buf.getvalue())
    t = FIXTURES / "tokenizers"
    return CanaryTokenizer({"spl_tokens": d / "spl.model", "en": t / "en/tokenizer_spe_bpe_v256/tokenizer.model",
                            "de": t / "de/tokenizer_spe_bpe_v256/tokenizer.model"})


def test_canary_v1(v1_tokenizer):
    tok = v1_tokenizer
    sid = tok.token_to_id
    ids = encode_prompt(tok, "canary", {"source_lang": "en", "task": "asr", "target_lang": "en", "pnc": "yes"})
    assert ids == [sid("<|startoftranscript|>"), sid("<|en|>"), sid("<|transcribe|>"), sid("<|en|>"), sid("<|pnc|>")]
    for task in ("ast", "translate", "s2t_translation", "<|translate|>"):
        ids = encode_prompt(tok, CANARY, {"source_lang": "en", "task": task, "target_lang": "de", "pnc": "no"})
        assert ids[2:] == [sid("<|translate|>"), sid("<|de|>"), sid("<|nopnc|>")], task
    # Older manifests say taskname; pnc defaults to yes.
    assert encode_prompt(tok, "canary", {"source_lang": "en", "taskname": "transcribe", "target_lang": "en"}) == \
        encode_prompt(tok, "canary", {"source_lang": "en", "task": "asr", "target_lang": "en", "pnc": "yes"})
    with pytest.raises(ValueError, match=r"slot 'task' does not accept 'summarize'; allowed: asr"):
        encode_prompt(tok, "canary", {"source_lang": "en", "task": "summarize", "target_lang": "en"})
    # No task: transcription for equal languages, translation otherwise (tests/test_canary_v1.py has more).
    assert encode_prompt(tok, "canary", {"source_lang": "en", "target_lang": "en"}) == \
        [sid("<|startoftranscript|>"), sid("<|en|>"), sid("<|transcribe|>"), sid("<|en|>"), sid("<|pnc|>")]
    assert encode_prompt(tok, "canary", {"source_lang": "en", "target_lang": "de"})[2] == sid("<|translate|>")
    assert CANARY.slot("task").default is None and CANARY.slot("task").derive_default is not None
    ex = encode_training_example(tok, "canary", "hello", {"source_lang": "en", "task": "asr", "target_lang": "en"})
    assert ex.answer_ids == tok.text_to_ids("hello", "en") and ex.input_ids[-1] == tok.eos_id
