"""Speculative greedy decoding: an int8 draft proposes, the model checks several tokens in one pass.
Whatever the draft proposes, the result must be plain greedy decoding's."""

import pytest
import torch

from conftest import AUDIO, FIXTURES
from serinus.audio import collate_audio, load_audio
from serinus.decoding import greedy_decode, speculative_greedy_decode
from serinus.model.canary import CanaryModel
from serinus.model.decoder import TransformerDecoder
from serinus.precision import Int8Linear, int8_draft
from serinus.prompt import encode_prompt
from serinus.transcribe import transcribe


@pytest.fixture(scope="module")
def model():
    return CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")


@pytest.fixture(scope="module")
def encoded(model):
    clips = [load_audio(AUDIO / name) for name in ("en_01.wav", "en_02.wav", "de_01.wav")]
    audio, lengths = collate_audio(clips, model.device)
    with torch.inference_mode():
        states, mask, _ = model.encode(audio, lengths)
    prompt = encode_prompt(model.tokenizer, model.cfg.prompt_format,
                           {"source_lang": "en", "target_lang": "en", "pnc": "yes"})
    return states, mask, torch.tensor([prompt] * len(clips))


def other_draft(model) -> torch.nn.Module:
    """A draft that mostly disagrees: the int8 copy of a decoder with other random weights."""
    torch.manual_seed(1)
    return int8_draft(TransformerDecoder(model.decoder.cfg).eval())


@pytest.mark.parametrize("which", ["int8 copy", "unrelated"])
@pytest.mark.parametrize("draft_len", [1, 3, 8])
def test_same_tokens_as_greedy_whatever_the_draft(model, encoded, which, draft_len):
    states, mask, prompts = encoded
    draft = int8_draft(model.decoder) if which == "int8 copy" else other_draft(model)
    eos, vocab = model.tokenizer.eos_id, model.tokenizer.vocab_size
    for limits in ([40, 40, 40], [0, 5, 40], [1, 2, 3], [0, 0, 0], [200, 7, 200]):
        want = greedy_decode(model.decoder, states, mask, prompts, limits, eos, vocab)
        got = speculative_greedy_decode(model.decoder, draft, states, mask, prompts, limits, eos, vocab,
                                        draft_len=draft_len)
        assert got == want, (limits, draft_len)
        # rows alone: the same as in the batch
        for i in range(3):
            alone = speculative_greedy_decode(model.decoder, draft, states[i : i + 1], mask[i : i + 1],
                                              prompts[i : i + 1], limits[i : i + 1], eos, vocab, draft_len=draft_len)
            assert alone[0] == got[i] or limits[i] == 0


def test_every_token_is_checked_even_past_eos(model, encoded):
    """A draft that proposes EOS at once never ends a row early: rows end at the model's own EOS."""
    states, mask, prompts = encoded
    eos, vocab = model.tokenizer.eos_id, model.tokenizer.vocab_size
    draft = int8_draft(model.decoder)
    draft.head_bias = torch.nn.Parameter(torch.full_like(model.decoder.head_bias, -1e4))
    draft.quantized_head = Int8Linear(model.decoder.token_embedding.weight, draft.head_bias.detach().index_fill(0, torch.tensor([eos]), 1e4))
    want = greedy_decode(model.decoder, states, mask, prompts, [60] * 3, eos, vocab)
    assert speculative_greedy_decode(model.decoder, draft, states, mask, prompts, [60] * 3, eos, vocab) == want
    assert all(len(w) > 0 for w in want)


def test_draft_is_int8_and_shares_the_rest(model):
    draft = int8_draft(model.decoder)
    assert not [n for n, p in list(draft.named_parameters()) + list(draft.named_buffers()) if p.is_meta]
    assert draft.token_embedding is model.decoder.token_embedding
    assert draft.blocks[0].mlp_norm is model.decoder.blocks[0].mlp_norm
    layers = [m for m in draft.modules() if isinstance(m, Int8Linear)]
    # per block: q/k/v stacked, self out, cross query and out, two FFN layers; and the head
    assert len(layers) == 6 * len(draft.blocks) + 1
    assert not any(isinstance(m, torch.nn.Linear) for m in draft.modules())
    assert "_draft" not in dict(model.named_modules()) and not any("draft" in k for k in model.state_dict())


def test_when_the_draft_is_used(model, monkeypatch):
    assert model.speculative_draft() is None  # a tiny decoder sits in the CPU's caches: no gain
    monkeypatch.setattr(CanaryModel, "DRAFT_MIN_BYTES", 0)
    assert model.speculative_draft() is model.speculative_draft() is not None  # made once
    int8 = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype="int8")
    trainable = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", for_training=True)
    assert int8.speculative_draft() is None and trainable.speculative_draft() is None


def test_transcribe_uses_it_and_gives_the_same_result(model, monkeypatch):
    files = [str(AUDIO / n) for n in ("en_01.wav", "en_02.wav", "es_01.wav")]
    kwargs = dict(batch_size=3, beam_size=1, source_lang="en", target_lang="en")
    plain = transcribe(model, files, **kwargs)
    monkeypatch.setattr(CanaryModel, "DRAFT_MIN_BYTES", 0)
    calls = []
    real = speculative_greedy_decode

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr("serinus.pipeline.decode.speculative_greedy_decode", counting)
    fast = transcribe(model, files, **kwargs)
    assert calls and [h.y_sequence for h in fast] == [h.y_sequence for h in plain]
    off = transcribe(model, files, speculative=False, **kwargs)
    assert len(calls) == 1 and [h.y_sequence for h in off] == [h.y_sequence for h in plain]


def test_cli_no_speculative(capsys, monkeypatch):
    from serinus import cli

    monkeypatch.setattr(CanaryModel, "DRAFT_MIN_BYTES", 0)
    calls = []
    real = speculative_greedy_decode
    monkeypatch.setattr("serinus.pipeline.decode.speculative_greedy_decode",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    args = [str(AUDIO / "en_01.wav"), "--model", str(FIXTURES / "tiny_canary2.nemo"), "--beam-size", "1", "--quiet"]
    assert cli.transcribe_main(args) == 0
    with_draft = capsys.readouterr().out
    assert calls
    assert cli.transcribe_main(args + ["--no-speculative"]) == 0
    assert capsys.readouterr().out == with_draft and len(calls) == 1


def test_the_draft_run_grows_while_the_model_accepts_it(model, encoded):
    """A draft that always agrees (here the model itself) gets runs of 1, 2, 4, ... up to max_draft_len:
    a long decode takes far fewer passes of the model than fixed runs would, with the same tokens."""
    states, mask, prompts = encoded
    torch.manual_seed(2)
    decoder = TransformerDecoder(model.decoder.cfg).eval()  # random weights: decodes to its limit
    eos, vocab = model.tokenizer.eos_id, model.tokenizer.vocab_size
    want = greedy_decode(decoder, states[:1], mask[:1], prompts[:1], [150], eos, vocab)
    assert len(want[0]) == 150
    passes, real_step = [], decoder.step

    def counting(x, *args, **kwargs):
        if kwargs.get("every_position"):
            passes.append(x.shape[1] - 1)  # the tokens proposed
        return real_step(x, *args, **kwargs)

    decoder.step = counting
    got = speculative_greedy_decode(decoder, decoder, states[:1], mask[:1], prompts[:1], [150], eos, vocab,
                                    draft_len=1, max_draft_len=32)
    assert got == want
    assert passes[:6] == [1, 2, 4, 8, 16, 32] and len(passes) == 9  # runs of 8: 17 passes
    passes.clear()
    fixed = speculative_greedy_decode(decoder, decoder, states[:1], mask[:1], prompts[:1], [150], eos, vocab,
                                      draft_len=8, max_draft_len=8)
    assert fixed == want and set(passes[:-1]) == {8}
