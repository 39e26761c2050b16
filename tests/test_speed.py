"""Speed and memory features: lean loading, precision modes, the static KV cache, NeMo's length limit."""

import warnings

import pytest
import torch

from conftest import AUDIO, FIXTURES
from serinus import CanaryModel
from serinus import precision
from serinus.audio import load_audio
from serinus.decoding import greedy_decode
from serinus.model.canary import CanaryModel as Model
from serinus.model.encoder import calc_subsampled_length
from serinus.weights import WEIGHTS_FILE, extract_nemo, nemo_to_serinus_state_dict, read_weights

CLIPS = sorted(str(p) for p in AUDIO.glob("*_0*.wav"))


@pytest.fixture(scope="module")
def model():
    return CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")


@pytest.fixture(scope="module")
def float32_ids(model):
    return [h.y_sequence for h in model.transcribe(CLIPS, batch_size=4)]


# -- lean loading -----------------------------------------------------------------------------

def test_nemo_read_in_place_gives_the_extracted_weights(model, tmp_path):
    """Weights read straight from the archive into a meta-built model equal those of the old path
    (extract, torch.load, copy into a randomly initialised model), and no tensor is left on meta."""
    extracted = nemo_to_serinus_state_dict(read_weights(extract_nemo(FIXTURES / "tiny_canary2.nemo", tmp_path) / WEIGHTS_FILE))
    state = model.state_dict()
    assert set(state) == set(extracted)
    for key, value in extracted.items():
        assert torch.equal(state[key], value), key
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    fresh = dict(Model(model.cfg).named_buffers())  # derived buffers as a model built normally computes them
    derived = [name for name, _ in model.named_buffers() if name not in state]
    assert derived
    for name, mine in model.named_buffers():
        if name in derived:
            assert torch.equal(mine, fresh[name]), name


def test_extraction_can_leave_the_weights_in_the_archive(tmp_path):
    root = extract_nemo(FIXTURES / "tiny_canary2.nemo", tmp_path, skip=(WEIGHTS_FILE,))
    assert (root / "model_config.yaml").is_file() and not (root / WEIGHTS_FILE).exists()


def test_lazy_archive_weights_read_the_same_tensors():
    from serinus.weights import read_archive_weights, read_archive_weights_lazily, real

    path = FIXTURES / "tiny_canary2_v2style.nemo"
    lazy, full = read_archive_weights_lazily(path, WEIGHTS_FILE), read_archive_weights(path, WEIGHTS_FILE)
    assert set(lazy) == set(full)
    for key, value in full.items():
        assert lazy[key].shape == value.shape and torch.equal(real(lazy[key]), value), key


def test_int8_loading_streams_and_quantises_as_the_whole_model_path(monkeypatch):
    """int8 from a .nemo quantises each Linear as its weights arrive (low peak memory); the model is the
    one quantize_int8 makes of the whole float32 model: same quantised weights, same tokens."""
    import serinus.checkpoint as ckpt

    path = FIXTURES / "tiny_canary2_v2style.nemo"  # with a packed CTC aligner
    streamed = CanaryModel.from_pretrained(path, dtype="int8")
    monkeypatch.setattr(ckpt, "read_archive_weights_lazily", lambda *a: None)  # the whole-model path
    whole = CanaryModel.from_pretrained(path, dtype="int8")

    def flat(v):
        if isinstance(v, torch.Tensor):
            return [v.dequantize() if v.is_quantized else v]
        return [x for item in v for x in flat(item)] if isinstance(v, (tuple, list)) else []

    a, b = streamed.state_dict(), whole.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert all(torch.equal(x, y) for x, y in zip(flat(a[key]), flat(b[key]), strict=True)), key
    assert precision.model_dtype(streamed) == "int8"
    clips = CLIPS[:3]
    assert [h.y_sequence for h in streamed.transcribe(clips, batch_size=3)] == \
        [h.y_sequence for h in whole.transcribe(clips, batch_size=3)]


# -- precision modes --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_precision_modes_load_and_agree_with_float32(dtype, float32_ids):
    if dtype == "bfloat16" and not precision.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantised tensors
        m = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype=dtype)
    assert precision.model_dtype(m) == dtype
    ids = [h.y_sequence for h in m.transcribe(CLIPS, batch_size=4)]
    same = sum(a == b for a, b in zip(float32_ids, ids))
    assert same >= len(CLIPS) - 1, (same, len(CLIPS))  # measured: all 9 equal, both models, both modes


def test_bad_precisions_are_refused_clearly(monkeypatch):
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype="int4")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="AVX-512 BF16 or AMX"):
        CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype="bfloat16")
    with pytest.raises(ValueError, match="CPU only"):
        precision.check_dtype("int8", "cuda")


# -- decoding ---------------------------------------------------------------------------------

def test_static_cache_steps_equal_the_full_forward(model):
    """Each incremental step over the preallocated cache gives the log-probs of the teacher-forced
    pass over the whole sequence (what the concatenating cache computed), for a batch of 2."""
    audio = [torch.from_numpy(load_audio(c)) for c in CLIPS[:2]]
    n = max(len(a) for a in audio)
    batch = torch.stack([torch.nn.functional.pad(a, (0, n - len(a))) for a in audio])
    with torch.inference_mode():
        states, mask, _ = model.encode(batch, torch.tensor([len(a) for a in audio]))
        tokens = torch.randint(0, 1000, (2, 12))
        full = model.decoder(tokens, states, mask)  # [2, 12, V]
        caches = model.decoder.new_caches(12)
        cross = model.decoder.cross_kv(states)
        cross_mask = (~mask[:, None, None, :]).float() * -10000.0
        steps = [model.decoder.step(tokens[:, :4], 0, cross, cross_mask, caches)]
        steps += [model.decoder.step(tokens[:, i : i + 1], i, cross, cross_mask, caches) for i in range(4, 12)]
    assert caches[0].length == 12
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=1e-5, rtol=1e-5)


def test_length_limit_counts_the_encoder_output_as_nemo_does(model):
    """NeMo's limit counts its encoder output tensor, which spans every feature frame (963 for the 77 s
    clip), one frame more than its valid part (962); so with max_generation_delta 0 it allows one token
    more. Serinus's encoder output stops at the valid part (the extra frame is padding), so the limit
    comes from the audio length alone."""
    stages = model.encoder.pre_encode.num_stages
    audio = torch.from_numpy(load_audio(str(AUDIO / "en_long.wav")))[None]
    lengths = torch.tensor([audio.shape[1]])
    with torch.inference_mode():
        features, _ = model.preprocessor(audio, lengths)
        states, mask, enc_len = model.encode(audio, lengths)
    assert int(enc_len) == 962 and states.shape[1] == 962 and bool(mask.all())
    nemo_frames = int(calc_subsampled_length(torch.tensor(features.shape[-1]), stages))
    assert nemo_frames == 963 and model.limit_lengths(lengths).tolist() == [nemo_frames]
    for clip in CLIPS:  # an item alone: always the length of NeMo's encoder output
        n = torch.tensor([len(load_audio(clip))])
        with torch.inference_mode():
            features, _ = model.preprocessor(torch.zeros(1, int(n)), n)
        assert model.limit_lengths(n).tolist() == [int(calc_subsampled_length(torch.tensor(features.shape[-1]), stages))]


def test_greedy_generates_up_to_the_limit(model):
    audio = torch.from_numpy(load_audio(CLIPS[0]))[None]
    with torch.inference_mode():
        states, mask, _ = model.encode(audio, torch.tensor([audio.shape[1]]))
    prompt = torch.tensor([[model.tokenizer.token_to_id("<|startoftranscript|>")]])
    ids = greedy_decode(model.decoder, states, mask, prompt, [7], eos_id=-1)[0]  # no EOS: runs to the limit
    assert len(ids) == 7


def test_a_beam_search_writes_one_token_past_the_limit_as_nemo_does(model):
    """NeMo's beam search (any beam size, and its default `strategy: beam` with beam_size 1) takes its
    first token from the prompt's pass and then `limit` more steps, so an item that never writes EOS
    gets limit + 1 tokens where greedy decoding stops at `limit` (checked against NeMo 3.0.0 by
    tools/nemo_variants_check.py)."""
    import copy

    from serinus.decoding import max_new_tokens

    looping = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    with torch.no_grad():
        looping.decoder.head_bias[model.tokenizer.eos_id] = -1e4  # never ends: every item runs to its limit
    clip = CLIPS[0]
    n = torch.tensor([len(load_audio(clip))])
    greedy_cfg = copy.deepcopy(model.cfg.decoding)
    greedy_cfg.strategy, greedy_cfg.beam_size, greedy_cfg.max_generation_delta = "greedy", 1, 3
    prompt_len = 9  # canary2, aggregate tokenizer, no context
    limit = max_new_tokens(looping.limit_lengths(n), prompt_len, greedy_cfg, looping.cfg.decoder.max_sequence_length)[0]
    greedy = looping.transcribe([clip], beam_size=1, max_generation_delta=3)[0].y_sequence
    beam = looping.transcribe([clip], beam_size=2, max_generation_delta=3)[0].y_sequence
    assert len(greedy) == limit and len(beam) == limit + 1
    assert looping.cfg.decoding.strategy == "beam" and looping.cfg.decoding.beam_size == 1  # NeMo's yaml default
    default = looping.transcribe([clip], max_generation_delta=3)[0].y_sequence  # beam of size 1: greedy's tokens
    assert default[:limit] == greedy and len(default) == limit + 1


def test_pad_to_does_not_change_the_length_limit(model):
    """NeMo's transcribe() sets the preprocessor's pad_to to 0 (as it does dither), so padding the
    features to a multiple of 16 frames must not lengthen the limit (checked against NeMo 3.0.0)."""
    import dataclasses

    padded = Model(dataclasses.replace(model.cfg, features=dataclasses.replace(model.cfg.features, pad_to=16)),
                   model.tokenizer).eval()
    padded.load_state_dict(model.state_dict())
    for clip in CLIPS[:3]:
        n = torch.tensor([len(load_audio(clip))])
        with torch.inference_mode():
            features, _ = padded.preprocessor(torch.zeros(1, int(n)), n)
        assert features.shape[-1] % 16 == 0
        assert padded.limit_lengths(n).tolist() == model.limit_lengths(n).tolist()


def test_an_int8_model_is_not_saved(tmp_path):
    from serinus.checkpoint import CheckpointError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype="int8")
    with pytest.raises(CheckpointError, match="int8"):
        m.save_pretrained(tmp_path / "out")


# -- Linear layers packed for the CPU (oneDNN) ------------------------------------------------

needs_onednn = pytest.mark.skipif(not precision.onednn_packing_available(), reason="no oneDNN in this torch")


@needs_onednn
def test_packed_linear_computes_nn_linear_and_keeps_the_dense_weight():
    torch.manual_seed(0)
    for bias in (True, False):
        dense = torch.nn.Linear(48, 80, bias=bias).eval()
        packed = precision.PackedLinear(dense)
        x = torch.randn(3, 5, 48)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed(x[:, :1]), dense(x[:, :1]), rtol=1e-5, atol=1e-5)  # one decoder row
            # SiLU fused into the matmul (the encoder's feed-forward): silu(linear(x)), to rounding
            torch.testing.assert_close(precision.linear_silu(packed, x), torch.nn.functional.silu(dense(x)),
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(precision.linear_silu(dense, x), torch.nn.functional.silu(dense(x)))
        state = packed.state_dict()
        assert set(state) == set(dense.state_dict()) and torch.equal(state["weight"], dense.weight)
        assert torch.equal(packed.weight, dense.weight)
        # load_state_dict repacks; gradients still reach the input; training is refused, clearly
        other = torch.nn.Linear(48, 80, bias=bias)
        packed.load_state_dict(other.state_dict())
        assert torch.equal(packed.weight, other.weight)
        x.requires_grad_(True)
        packed(x).sum().backward()
        torch.testing.assert_close(x.grad, other.weight.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="for_training=True"):
            packed.train()(x)
        # moved to a dtype oneDNN does not take (float16), it keeps a dense weight
        packed.eval().to(torch.float16)
        assert packed.weight.dtype == torch.float16 and not packed._packed


@needs_onednn
def test_models_load_packed_for_inference_and_plain_for_training(model, float32_ids, tmp_path):
    from serinus.checkpoint import load_any

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and any(isinstance(m, precision.PackedLinear) for m in model.modules())
    # what transcribe() decodes on the packed model is what the plain model decodes
    plain = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", for_training=True)
    assert not any(isinstance(m, precision.PackedLinear) for m in plain.modules())
    assert [h.y_sequence for h in plain.eval().transcribe(CLIPS, batch_size=4)] == float32_ids
    # saving a packed model writes the ordinary weights
    model.save_pretrained(tmp_path / "m")
    again = load_any(tmp_path / "m")  # training's loader: plain layers
    for name, tensor in plain.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_int8_quantises_the_pointwise_convs():
    """int8 makes the conv modules' kernel-1 convs the int8 Linear layers they are; the streamed
    load and the whole-model quantisation agree on them (the earlier test compares every weight)."""
    m = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype="int8")
    convs = [layer.conv for layer in m.encoder.layers]
    assert convs and all(isinstance(c.pointwise_conv1, precision.Int8Linear)
                         and isinstance(c.pointwise_conv2, precision.Int8Linear) for c in convs)
    assert not any(type(mod) is torch.nn.Linear for mod in m.modules())  # every Linear is int8
    assert m.transcribe(CLIPS[:1])[0].text  # and it runs


def test_int8_linear_is_torch_dynamic_quantisation():
    """Int8Linear packs once what torch.ao's dynamic quantised Linear computes: the same int8
    weights and scales (one per row, a zero row included), the same outputs, exactly (with 8-bit
    activations where the CPU has AVX-512 VNNI, torch.ao's 7 elsewhere)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    torch.manual_seed(0)
    for bias in (True, False):
        linear = torch.nn.Linear(96, 40, bias=bias)
        linear.weight.data[3] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            ref = DynamicLinear.from_float(linear)
            ref_weight = ref._packed_params._weight_bias()[0]
        mine = precision.Int8Linear(linear.weight, linear.bias)
        weight = mine.weight_and_bias()[0]
        assert torch.equal(weight.int_repr(), ref_weight.int_repr())
        assert torch.equal(weight.q_per_channel_scales(), ref_weight.q_per_channel_scales())
        x = 3 * torch.randn(5, 96)
        assert torch.equal(mine(x), torch.ops.quantized.linear_dynamic(x, ref._packed_params._packed_params,
                                                                       precision._REDUCE_RANGE))
        if precision._REDUCE_RANGE:
            assert torch.equal(mine(x), ref(x))


def test_int8_activations_use_all_8_bits_only_where_nothing_overflows():
    """Full-range activations against full-range weights of one sign: two adjacent products sum past
    16 bits, which a kernel without VNNI would saturate. The result is still the product of the
    quantised values (to rounding); and where all 8 bits are used, random inputs come closer to
    float32 than with 7."""
    torch.manual_seed(0)

    def rel_err(layer, x, reduce_range):
        exact = x @ layer.weight_and_bias()[0].dequantize().T
        y = torch.ops.quantized.linear_dynamic(x, layer._packed, reduce_range)
        return float((y - exact).abs().max() / exact.abs().max())

    ones = precision.Int8Linear(torch.ones(64, 512), None)
    x = 10 * torch.rand(4, 512)
    assert torch.equal(ones(x), torch.ops.quantized.linear_dynamic(x, ones._packed, precision._REDUCE_RANGE))
    assert rel_err(ones, x, precision._REDUCE_RANGE) < 1e-3  # a saturated sum would be far off
    if not precision._REDUCE_RANGE:
        layer, x = precision.Int8Linear(torch.randn(64, 512), None), 3 * torch.randn(4, 512)
        assert rel_err(layer, x, False) < rel_err(layer, x, True)


def test_int8_stacks_the_self_attention_projections_exactly():
    """int8 runs the decoder's self-attention query, key and value as one stacked layer: the same
    int8 rows and scales, so the outputs of the three layers, exactly, from one call."""
    torch.manual_seed(0)
    layers = [precision.Int8Linear(torch.randn(24, 16), torch.randn(24)) for _ in range(3)]
    stacked = precision.Int8Linear.stacked(layers)
    x = torch.randn(2, 5, 16)
    assert torch.equal(stacked(x), torch.cat([layer(x) for layer in layers], dim=-1))
    m = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo", dtype="int8")
    attn = m.decoder.blocks[0].self_attn
    assert isinstance(attn.qkv, precision.Int8Linear) and not hasattr(attn, "query")
