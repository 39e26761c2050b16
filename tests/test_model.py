"""NeMo parity of the model core: encoder outputs, teacher-forced log-probs, losses, decoding."""

import json

import numpy as np
import pytest
import torch

from conftest import AUDIO, FIXTURES, REFERENCE
from serinus import CanaryModel
from serinus.audio import load_audio
from serinus.decoding import greedy_decode, max_new_tokens
from serinus.model.canary import PRESETS, CanaryModel as _Model, preset_config, sequence_loss
from serinus.prompt import encode_prompt

AED_MODELS = ["tiny_canary2", "tiny_canary2_unified"]


@pytest.fixture(scope="module", params=AED_MODELS)
def model_and_name(request):
    return CanaryModel.from_pretrained(FIXTURES / f"{request.param}.nemo"), request.param


@pytest.fixture(scope="module")
def features():
    return np.load(REFERENCE / "features.npz")


def test_encoder_matches_nemo(model_and_name, features):
    model, name = model_and_name
    ref = np.load(REFERENCE / name / "encoder.npz")
    clips = json.loads((REFERENCE / name / "encoder_meta.json").read_text())["clips"]
    worst = 0.0
    with torch.no_grad():
        for clip in clips:
            feats = torch.from_numpy(features[clip])[None]
            lengths = torch.from_numpy(features[clip + "__len"]).reshape(1)
            encoded, enc_len = model.encoder(feats, lengths)
            assert int(enc_len) == int(ref[clip + "__len"].reshape(-1)[0])
            n = int(enc_len)
            np.testing.assert_allclose(encoded[0, :, :n].numpy(), ref[clip][:, :n], atol=2e-5, rtol=1e-4)
            proj = model.encoder_decoder_proj(encoded.transpose(1, 2))[0, :n].numpy()
            np.testing.assert_allclose(proj, ref[clip + "__proj"][:n], atol=2e-5, rtol=1e-4)
            worst = max(worst, float(np.abs(encoded[0, :, :n].numpy() - ref[clip][:, :n]).max()))
        # the padded batch, from audio through the front end
        states, mask, lens = model.encode(torch.from_numpy(features["batch3_audio"]),
                                          torch.from_numpy(features["batch3_audio_lens"]))
    assert lens.tolist() == ref["batch3_encoded_lens"].tolist()
    for i, n in enumerate(lens.tolist()):
        np.testing.assert_allclose(states[i, :n].numpy(), ref["batch3_proj"][i, :n], atol=2e-5, rtol=1e-4)
    assert worst < 1e-5


def test_teacher_forced_log_probs_and_loss(model_and_name):
    model, name = model_and_name
    ref = np.load(REFERENCE / name / "teacher_forced.npz")
    losses = json.loads((REFERENCE / name / "loss.json").read_text())
    tokens = torch.from_numpy(ref["decoder_input_ids"])
    token_lens = torch.from_numpy(ref["prompted_transcript_lens"]) - 1
    with torch.no_grad():
        log_probs = model(torch.from_numpy(ref["audio"]), torch.from_numpy(ref["audio_lens"]), tokens, token_lens)
    for i, n in enumerate(token_lens.tolist()):
        np.testing.assert_allclose(log_probs[i, :n].numpy(), ref["log_probs"][i, :n], atol=5e-5, rtol=1e-5)
    labels = torch.from_numpy(ref["labels"])
    prompt_lens = torch.from_numpy(ref["prompt_lens"])
    pad = model.tokenizer.pad_id
    plain = sequence_loss(log_probs, labels, pad)
    masked = sequence_loss(log_probs, labels, pad, prompt_lens=prompt_lens, lengths=token_lens)
    assert plain.item() == pytest.approx(losses["loss_use_loss_mask_for_prompt_false"], rel=1e-5)
    assert masked.item() == pytest.approx(losses["loss_use_loss_mask_for_prompt_true"], rel=1e-3, abs=1e-6)


def _run_kwargs(run):
    """Our transcribe() options for one recorded NeMo run (its decoding config + kwargs)."""
    dec = run["decoding"]
    kwargs = dict(run["kwargs"])
    if dec["strategy"] == "beam":
        kwargs.update(beam_size=dec["beam"]["beam_size"],
                      length_penalty=dec["beam"].get("length_penalty") or 0.0,
                      max_generation_delta=dec["beam"]["max_generation_delta"])
    else:
        kwargs.update(beam_size=1, max_generation_delta=dec["greedy"]["max_generation_delta"])
    return kwargs


def _runs(name):
    return json.loads((REFERENCE / name / "transcribe.json").read_text())["runs"]


@pytest.mark.parametrize("name", AED_MODELS)
def test_decodercontext_is_used(name):
    """NeMo 3.0.0's transcribe() drops `decodercontext` for file input (its recorded run equals the
    run without context). Serinus puts the context in the prompt, as NeMo's own prompt encoder does
    (prompts.json `asr_en_ctx`); without context our output equals NeMo's recorded run."""
    model = CanaryModel.from_pretrained(FIXTURES / f"{name}.nemo")
    run = next(r for r in _runs(name) if "decodercontext" in r["kwargs"])
    kwargs = _run_kwargs(run)
    audio = [str(FIXTURES / a) for a in run["audio"]]
    context = kwargs.pop("decodercontext")
    without = model.transcribe(audio, **kwargs)
    assert [h.y_sequence for h in without] == [r["y_sequence"] for r in run["hyps"]]
    # with context: the prompt holds it (ids as NeMo's prompt encoder gives them) ...
    slots = {"source_lang": "en", "target_lang": "en", "pnc": kwargs["pnc"], "decodercontext": context}
    prompt = encode_prompt(model.tokenizer, model.cfg.prompt_format, slots)
    cases = json.loads((REFERENCE / name / "prompts.json").read_text())["user_turn_cases"]
    expected = next(c for c in cases if c["name"] == "asr_en_ctx")["context_ids"]
    pnc_token = model.tokenizer.token_to_id("<|pnc|>" if kwargs["pnc"] == "yes" else "<|nopnc|>")
    assert prompt == [pnc_token if t == model.tokenizer.token_to_id("<|pnc|>") else t for t in expected]
    # ... and transcribe() decodes with exactly that prompt
    with_context = model.transcribe(audio[:2], decodercontext=context, **kwargs)
    audio_t = torch.from_numpy(load_audio(audio[0]))[None]
    states, mask, enc_len = model.encode(audio_t, torch.tensor([audio_t.shape[1]]))
    limits = max_new_tokens(enc_len, len(prompt), model.cfg.decoding.__class__(max_generation_delta=-1), 1024)
    ids = greedy_decode(model.decoder, states, mask, torch.tensor([prompt]), limits, model.tokenizer.eos_id)[0]
    assert with_context[0].y_sequence == ids


def test_results_do_not_depend_on_batch():
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    files = sorted(str(p) for p in AUDIO.glob("*_0*.wav"))
    alone = [model.transcribe([f], beam_size=1)[0] for f in files]
    together = model.transcribe(files, batch_size=len(files), beam_size=1)
    assert [h.y_sequence for h in alone] == [h.y_sequence for h in together]


def test_mixed_prompts_in_one_batch():
    """One item transcribes English while the next translates to German, in the same batch."""
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    manifest_lines = [
        {"audio_filepath": str(AUDIO / "en_01.wav"), "source_lang": "en", "target_lang": "en", "pnc": "yes"},
        {"audio_filepath": str(AUDIO / "en_01.wav"), "source_lang": "en", "target_lang": "de", "pnc": "yes"},
    ]
    import tempfile, os

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(x) for x in manifest_lines) + "\n")
        mixed = model.transcribe(path, batch_size=2, beam_size=1)
    asr = model.transcribe([str(AUDIO / "en_01.wav")], target_lang="en", beam_size=1)[0]
    ast = model.transcribe([str(AUDIO / "en_01.wav")], target_lang="de", beam_size=1)[0]
    assert mixed[0].y_sequence == asr.y_sequence
    assert mixed[1].y_sequence == ast.y_sequence


@pytest.mark.parametrize("name,params_m", [("canary-180m-flash", 182), ("canary-1b-flash", 883), ("canary-1b-v2", 978)])
def test_presets_have_the_released_sizes(name, params_m):
    vocab = 16384 if name == "canary-1b-v2" else 5248
    with torch.device("meta"):
        model = _Model(preset_config(name, vocab))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - params_m) / params_m < 0.03, millions
    assert set(PRESETS) == {"canary-180m-flash", "canary-1b-flash", "canary-1b", "canary-1b-v2"}


def test_padding_rows_of_the_output_layer_are_never_chosen():
    """The unified model's decoder has 1536 outputs for 1535 tokens; even if the padding row
    scores highest, decoding must not emit it."""
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2_unified.nemo")
    vocab = model.tokenizer.vocab_size
    assert model.cfg.decoder.vocab_size > vocab
    with torch.no_grad():
        model.decoder.head_bias[vocab:] = 1e4  # make the padding row win every argmax
    for beam in (1, 3):
        hyp = model.transcribe([str(AUDIO / "en_01.wav")], beam_size=beam, max_generation_delta=5)[0]
        assert hyp.error is None
        assert all(t < vocab for t in hyp.y_sequence)


@pytest.mark.parametrize("kind", ["dw_striding", "striding"])
def test_subsampling_training_path_does_not_depend_on_padding(kind):
    # the training path zeroes padding only before the convs that mix time steps and at the end; each
    # item's valid frames must be those of the item in a batch of its own
    from serinus.model.encoder import ConvSubsampling, EncoderConfig

    torch.manual_seed(0)
    sub = ConvSubsampling(EncoderConfig(feat_in=40, d_model=32, subsampling_conv_channels=8,
                                        subsampling=kind, subsampling_factor=8)).train()
    x = torch.randn(3, 97, 40)
    lengths = torch.tensor([97, 61, 30])
    out, out_len = sub(x, lengths)
    for i in range(3):
        alone, alone_len = sub(x[i : i + 1, : lengths[i]], lengths[i : i + 1])
        assert int(alone_len) == int(out_len[i])
        torch.testing.assert_close(out[i, : out_len[i]], alone[0], rtol=1e-5, atol=1e-5)


def test_subsampling_inference_path_matches_training_path():
    # without autograd, the subsampling convs run one item at a time and in place (to bound memory);
    # the result must be the batched one, padding included
    from serinus.model.encoder import ConvSubsampling, EncoderConfig

    torch.manual_seed(0)
    sub = ConvSubsampling(EncoderConfig(feat_in=80, d_model=64, subsampling_conv_channels=16)).eval()
    x = torch.randn(3, 203, 80)
    lengths = torch.tensor([203, 150, 9])
    with torch.enable_grad():
        ref, ref_len = sub(x, lengths)
    x_before = x.clone()
    with torch.inference_mode():
        out, out_len = sub(x, lengths)
    assert torch.equal(x, x_before)  # the caller's features are not written to
    assert torch.equal(out_len, ref_len)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    # a long input goes through in time pieces with a halo: the same frames again
    x, lengths = torch.randn(2, 2500, 80), torch.tensor([2500, 1301])
    with torch.enable_grad():
        ref, ref_len = sub(x, lengths)
    sub.CHUNK_FRAMES = 256
    with torch.inference_mode():
        out, out_len = sub(x, lengths)
    assert torch.equal(out_len, ref_len)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    # a batch of one (a long clip decoded alone) takes the pieces too: count the conv calls
    calls, convs = [], sub._convs
    sub._convs = lambda *a: calls.append(1) or convs(*a)
    with torch.inference_mode():
        out1, out1_len = sub(x[:1], lengths[:1])
    del sub._convs
    assert len(calls) > 1 and torch.equal(out1_len, ref_len[:1])
    torch.testing.assert_close(out1, ref[:1].detach(), rtol=1e-5, atol=1e-5)


def test_inference_encoder_output_ends_at_the_longest_valid_frame():
    # features carry one frame past the valid length (the centred STFT); at inference the encoder's
    # output stops at the longest item's valid frames, so an unpadded batch runs with no masks at all.
    # The frames are the training path's (which keeps NeMo's full length), valid part and lengths
    from serinus.model.encoder import ConformerEncoder, EncoderConfig

    torch.manual_seed(0)
    enc = ConformerEncoder(EncoderConfig(feat_in=80, n_layers=2, d_model=64, n_heads=4,
                                         subsampling_conv_channels=16)).eval()
    x = torch.randn(2, 80, 201)  # 200 valid frames: 25 output frames, 26 for all 201 (8x subsampling)
    for lengths in (torch.tensor([200, 200]), torch.tensor([200, 120])):
        with torch.enable_grad():
            ref, ref_len = enc(x, lengths)
        with torch.inference_mode():
            out, out_len = enc(x, lengths)
        assert torch.equal(out_len, ref_len) and out.shape[-1] == int(ref_len.max()) < ref.shape[-1]
        for i, n in enumerate(ref_len.tolist()):
            torch.testing.assert_close(out[i, :, :n], ref[i, :, :n].detach(), rtol=1e-4, atol=1e-4)


def test_inference_attention_in_head_groups_is_the_attention_of_all_heads():
    # without autograd the position biases are built a few heads at a time (a long input's
    # [B, H, T, T] is never held whole): the output is the all-heads one, exactly, padding included
    from serinus.model.encoder import RelPositionMultiHeadAttention, relative_positions

    torch.manual_seed(0)
    attn = RelPositionMultiHeadAttention(64, 4, True, 0.0).eval()
    t = 37
    x, pos = torch.randn(2, t, 64), relative_positions(t, 64, "cpu", torch.float32)
    valid = torch.arange(t)[None] < torch.tensor([[t], [20]])
    mask = (valid[:, None, :, None] & valid[:, None, None, :])
    with torch.inference_mode():
        attn.BIAS_BYTES = 1 << 40
        all_heads = attn(x, pos, mask)
        attn.BIAS_BYTES = 1  # one head at a time
        one_by_one = attn(x, pos, mask)
    assert torch.equal(all_heads, one_by_one)
    with torch.enable_grad():  # the training path: the same values (to rounding)
        torch.testing.assert_close(attn(x, pos, mask), all_heads, rtol=1e-5, atol=1e-5)
    # no padding: no mask (None) is an all-True mask, on both paths
    full = torch.ones_like(mask)
    with torch.inference_mode():
        assert torch.equal(attn(x, pos, None), attn(x, pos, full))
    with torch.enable_grad():
        assert torch.equal(attn(x, pos, None), attn(x, pos, full))


def test_cross_attention_without_padding_needs_no_mask():
    # no padded frame: no mask at all (attention adds no zeros), and the same log-probs as a mask of zeros
    from serinus.model.decoder import DecoderConfig, TransformerDecoder, additive_mask, cross_attention_mask

    torch.manual_seed(0)
    decoder = TransformerDecoder(DecoderConfig(vocab_size=64, hidden_size=32, inner_size=64, num_layers=2,
                                               num_attention_heads=4, max_sequence_length=32)).eval()
    states, valid = torch.randn(2, 7, 32), torch.ones(2, 7, dtype=torch.bool)
    assert cross_attention_mask(valid, states.dtype) is None
    valid[1, 5:] = False
    assert torch.equal(cross_attention_mask(valid, states.dtype), additive_mask(valid[:, None, None, :], states.dtype))
    tokens = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with torch.inference_mode():
        kv = decoder.cross_kv(states)
        zeros = additive_mask(torch.ones(2, 1, 1, 7, dtype=torch.bool), states.dtype)
        out = [decoder.step(tokens, 0, kv, mask, decoder.new_caches(8), every_position=True) for mask in (None, zeros)]
    assert torch.equal(out[0], out[1])


def test_a_padded_batch_runs_under_bf16_autocast_without_autograd():
    """A bf16-mixed training run validates under autocast with autograd off: the encoder's inference
    path (position bias written in place) must take bf16 products; results stay near float32's."""
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", for_training=True).eval()
    ref = np.load(REFERENCE / "tiny_canary2" / "teacher_forced.npz")
    audio, audio_lens = torch.from_numpy(ref["audio"]), torch.from_numpy(ref["audio_lens"])
    assert len(set(audio_lens.tolist())) > 1  # padded
    tokens = torch.from_numpy(ref["decoder_input_ids"])
    token_lens = torch.from_numpy(ref["prompted_transcript_lens"]) - 1
    with torch.no_grad():
        full = model(audio, audio_lens, tokens, token_lens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(audio, audio_lens, tokens, token_lens)
    for i, n in enumerate(token_lens.tolist()):
        assert (mixed[i, :n].float().argmax(-1) == full[i, :n].argmax(-1)).float().mean() > 0.9
