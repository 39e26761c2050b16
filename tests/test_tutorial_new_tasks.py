"""The tutorial's "new task" recipes, end to end at the data level: a `summarize` task with its own
special tokens and prompt slot, timestamp-token targets, and a decoder context."""

from serinus.data.tokenizers import build_special_tokenizer, train_bpe_tokenizer
from serinus.prompt import CANARY2, Slot, encode_prompt, encode_training_example
from serinus.tokenizer import CanaryTokenizer

TEXTS = ["the report is ready", "it's almost beyond conjecture", "please send me the summary",
         "the meeting has not started yet", "a short summary of the talk"] * 20


def _tokenizer(tmp_path):
    spl = build_special_tokenizer(tmp_path / "spl_tokens", extra_tokens=["<|summarize|>", "<|nosummarize|>"])
    en = train_bpe_tokenizer(TEXTS, tmp_path / "en", vocab_size=64)
    return CanaryTokenizer({"spl_tokens": spl / "tokenizer.model", "en": en / "tokenizer.model"})


def test_summarize_task_prompt_and_training_example(tmp_path):
    tok = _tokenizer(tmp_path)
    fmt = CANARY2.add_slot(Slot("summarize", "bool", default="no"))
    slots = {"source_lang": "en", "target_lang": "en", "summarize": "true"}
    prompt = encode_prompt(tok, fmt, slots)
    assert tok.token_to_id("<|summarize|>") in prompt
    assert tok.token_to_id("<|nosummarize|>") in encode_prompt(tok, fmt, {"source_lang": "en", "target_lang": "en"})
    example = encode_training_example(tok, fmt, "a short summary", slots)
    assert example.input_ids[: len(prompt)] == prompt and example.input_ids[-1] == tok.eos_id
    assert tok.ids_to_text(example.answer_ids).strip() == "a short summary"
    assert example.mask == [False] * len(prompt) + [True] * (len(example.answer_ids) + 1)


def test_timestamp_targets_and_decoder_context(tmp_path):
    tok = _tokenizer(tmp_path)
    text = "<|3|> it's <|7|> <|8|> almost <|9|> <|14|> beyond <|20|> <|20|> conjecture <|28|>"
    example = encode_training_example(tok, CANARY2, text, {"source_lang": "en", "target_lang": "en",
                                                           "timestamp": "yes", "decodercontext": "the report"})
    frames = [tok.timestamp_frame(i) for i in example.answer_ids if tok.is_timestamp_id(i)]
    assert frames == [3, 7, 8, 9, 14, 20, 20, 28]
    assert tok.token_to_id("<|timestamp|>") in example.context_ids
    context = tok.text_to_ids("the report", "en")
    start = example.context_ids.index(tok.token_to_id("<|startofcontext|>")) + 1
    assert example.context_ids[start : start + len(context)] == context
