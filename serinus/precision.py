"""Precision modes of a loaded model: float32, bfloat16 (weights and compute), int8 (dynamic).

int8 quantises every Linear layer of the encoder and decoder (the conv modules' pointwise convs
among them; the decoder's self-attention query, key and value stacked into one), and the decoder's
output head, to int8 weights with per-step int8 activations (`Int8Linear`: torch's dynamic
quantisation, whose x86 kernels use AVX-512 VNNI / AMX where present); the front end, the other
convolutions, norms and attention stay float32.
bfloat16 runs everything after the front end in bf16; on a CPU this only pays with native bf16
instructions (AVX-512 BF16 or AMX), so it is refused on CPUs without them.

On a CPU, float32 and bfloat16 Linear layers are also repacked for inference (`pack_linear_layers`):
their weights are kept in oneDNN's blocked layout and run through its matmul, which measured 2-2.5x
faster than torch's default (MKL) float32 path on this project's AMD CPU, for one decoder row and for
1,500 encoder frames alike, with the same memory and float32 results equal to rounding (the same
values, summed in another order).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

DTYPES = ("float32", "bfloat16", "int8")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    flags = cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # no /proc/cpuinfo: ask oneDNN


def check_dtype(dtype: str, device="cpu") -> None:
    """A clear error for a precision this build or this machine cannot run."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    on_cpu = torch.device(device).type == "cpu"
    if dtype == "int8" and not on_cpu:
        raise ValueError("dtype int8 (dynamic quantisation) runs on the CPU only; on a GPU use bfloat16")
    if dtype == "bfloat16" and on_cpu and not cpu_has_bf16():
        raise ValueError("dtype bfloat16 needs a CPU with AVX-512 BF16 or AMX, and this one has neither "
                         "(bf16 would be emulated, slower than float32); use float32 or int8")


def set_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """Convert a float32 model (in eval mode) in place to `dtype`; returns it."""
    if dtype == "bfloat16":
        return model.to(torch.bfloat16)  # the front end keeps float32 itself (LogMel._apply)
    if dtype == "int8":
        return quantize_int8(model)
    return model


def onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _onednn_linear_applies(weight: torch.Tensor) -> bool:
    """oneDNN's CPU matmul takes this weight (float32 or bf16, on the CPU, oneDNN present)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and onednn_packing_available())


def unpacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear; on a CPU without autograd, through oneDNN with the weight as it is (for a weight that
    has another use too, such as the output head tied to the token embedding): about 2.5x faster than
    the default float32 path for a few rows on this project's CPU, and no packed copy to hold."""
    if (_onednn_linear_applies(weight) and x.device.type == "cpu" and x.dtype == weight.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight.contiguous(), bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


_ONEDNN_ACTIVATION = {"none": "none", "silu": "swish"}  # oneDNN's swish with alpha 1 is SiLU


def linear_silu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(layer(x)), the activation fused into the matmul where `layer` is a PackedLinear."""
    return layer(x, activation="silu") if isinstance(layer, PackedLinear) else torch.nn.functional.silu(layer(x))


class PackedLinear(nn.Module):
    """An inference-time nn.Linear whose CPU weight lives in oneDNN's blocked layout (packed once
    instead of on every call). state_dict(), load_state_dict() and `.weight` see the ordinary dense
    weight, so saving and exporting are unchanged; moved to another device or dtype it repacks, or
    keeps a dense weight where oneDNN does not apply. Its weight is frozen: training refuses it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.training = linear.training
        self.bias = linear.bias
        self._set_weight(linear.weight.detach())

    def _set_weight(self, dense: torch.Tensor) -> None:
        packable = _onednn_linear_applies(dense)
        self._weight = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous()) if packable else dense
        self._packed = packable

    @property
    def weight(self) -> torch.Tensor:
        return self._weight.to_dense() if self._packed else self._weight

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """linear(x), then SiLU when `activation` is "silu": fused into oneDNN's matmul (no second pass
        over a [rows, out_features] activation) where the weight is packed."""
        if self.training:
            raise RuntimeError("this model was loaded for inference (its Linear weights are packed for the CPU "
                               "and frozen); to train it, load it with from_pretrained(..., for_training=True)")
        if self._packed and not (torch.is_grad_enabled() and x.requires_grad) and x.dtype == self._weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self._weight, self.bias, _ONEDNN_ACTIVATION[activation], [], "")
        y = torch.nn.functional.linear(x, self.weight, self.bias)  # e.g. gradients to the input
        return torch.nn.functional.silu(y) if activation == "silu" else y

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the bias
        probe = fn(torch.empty(0, dtype=self._weight.dtype, device=self._weight.device))
        if (probe.dtype, probe.device) != (self._weight.dtype, self._weight.device):  # else: nothing to redo
            self._set_weight(fn(self.weight))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            self._set_weight(state_dict[key].detach().to(self._weight.dtype))
        elif strict:
            missing_keys.append(key)
        own = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """Swap every float32/bf16 nn.Linear of a CPU model in eval mode for a PackedLinear (in place, one
    layer at a time: the dense weight is freed as its packed copy is made). A no-op where oneDNN is
    absent, on a GPU, or for int8 models (already quantised)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.training and _onednn_linear_applies(child.weight):
                setattr(parent, name, PackedLinear(child))
    return model


@contextlib.contextmanager
def _quiet_quantization():
    """torch 2.13 announces on every call that quantised tensors are deprecated (torchao replaces
    them); a user asking for int8 needs no notice per layer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        yield


# bound once: looking the op up through torch.ops costs ~1 us a call, and a decoder step makes 25
_linear_dynamic = torch.ops.quantized.linear_dynamic.default


def _activations_need_reduced_range() -> bool:
    """Whether int8 activations must keep to 7 bits (torch.ao's `reduce_range`): fbgemm's kernels without
    AVX-512 VNNI multiply with VPMADDUBSW, whose 16-bit sums of two 8-bit products overflow with full-range
    inputs; with VNNI (VPDPBUSD sums into 32 bits) all 8 bits are safe, and the activations' rounding
    error halves. Unknown CPU (no /proc/cpuinfo): the safe 7 bits."""
    return "avx512_vnni" not in cpu_flags()


_REDUCE_RANGE = _activations_need_reduced_range()


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights, one symmetric scale per output row (a row of small weights
    keeps its precision beside a row of large ones: a trained 30-minute model lost 3.8 points of WER
    with one scale per matrix), and its input quantised to 8 bits per call: what torch.ao's dynamic
    quantised Linear computes (the same kernels: fbgemm, VNNI/AMX where present), packed once per
    layer where torch.ao's module packs three times, two of them a matrix of zeros."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        if scale is None:  # torch's per-channel symmetric min/max observer for qint8: max|w| / 127.5 per row
            scale = (torch.maximum(-w.amin(dim=1), w.amax(dim=1)).clamp(min=0) / 127.5).clamp(
                min=torch.finfo(torch.float32).eps)
        zero = torch.zeros(len(scale), dtype=torch.int64)
        with _quiet_quantization():
            q = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(q, b)

    @classmethod
    def stacked(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing `layers` side by side (their outputs concatenated on the last axis):
        the same int8 rows and scales, so the same results, from one call."""
        weights, biases = zip(*(layer.weight_and_bias() for layer in layers))
        scales = torch.cat([w.q_per_channel_scales() for w in weights]).float()
        dense = torch.cat([w.dequantize() for w in weights])  # int8 x its row's scale: requantises exactly
        bias = None if any(b is None for b in biases) else torch.cat(biases)
        return cls(dense, bias, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_dynamic(x, self._packed, _REDUCE_RANGE).to(x.dtype)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The int8 weight (a quantised tensor) and the float32 bias, unpacked."""
        return torch.ops.quantized.linear_unpack(self._packed)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"], bias = self.weight_and_bias()
        if bias is not None:
            destination[prefix + "bias"] = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_layer(parent: nn.Module, name: str, child: nn.Module) -> Int8Linear | None:
    """The int8 layer that replaces `parent.<name>` (a Linear layer, or a conv module's pointwise,
    kernel-1 conv: the Linear layer over the channels it is), or None where it stays as it is. One
    rule for a model quantised whole (quantize_int8) and one loaded layer by layer (serinus.weights)."""
    from serinus.model.encoder import ConvModule

    if type(child) is nn.Linear:
        return Int8Linear(child.weight, child.bias)
    if isinstance(parent, ConvModule) and name.startswith("pointwise_conv") and isinstance(child, nn.Conv1d):
        return Int8Linear(child.weight.squeeze(-1), child.bias)  # canary-180m-flash: 52 MB float32 -> 13 MB
    return None


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation, in place, of the Linear layers of the encoder and decoder (the
    conv modules' pointwise convs among them) and of the tied output head (a quantised copy of the
    token embedding; the embedding itself stays float32)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            layer = int8_layer(module, name, child)
            if layer is not None:
                setattr(module, name, layer)
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "head_bias"):
        decoder.quantized_head = Int8Linear(decoder.token_embedding.weight, decoder.head_bias)
        for block in decoder.blocks:  # one call for the self-attention's three projections
            attn = block.self_attn
            if attn.qkv is None:
                attn.qkv = Int8Linear.stacked([attn.query, attn.key, attn.value])
                del attn.query, attn.key, attn.value
    return model


def int8_draft(decoder: nn.Module) -> nn.Module:
    """An int8 copy of a float32 or bfloat16 `TransformerDecoder`, made to propose tokens for
    speculative greedy decoding (serinus.decoding.speculative_greedy_decode): its Linear layers and
    output head int8 (as `quantize_int8` makes them), everything else shared with `decoder`, and no
    cross-attention key/value layers (it reads those of `decoder`). Built one layer at a time, so
    only one dense weight is ever copied at once."""
    from serinus.model.decoder import TransformerDecoder

    def int8(linear: nn.Module) -> Int8Linear:
        return Int8Linear(linear.weight.float(), None if linear.bias is None else linear.bias.float())

    with torch.device("meta"):
        draft = TransformerDecoder(decoder.cfg)
    draft.token_embedding, draft.positions = decoder.token_embedding, decoder.positions
    draft.embedding_norm, draft.final_norm = decoder.embedding_norm, decoder.final_norm
    draft.head_bias = decoder.head_bias
    head = decoder.token_embedding.weight
    draft.quantized_head = Int8Linear(head.float(), decoder.head_bias.float())
    for mine, theirs in zip(draft.blocks, decoder.blocks):
        for name in ("self_attn_norm", "cross_attn_norm", "mlp_norm"):
            setattr(mine, name, getattr(theirs, name))
        mine.mlp_in, mine.mlp_out = int8(theirs.mlp_in), int8(theirs.mlp_out)
        attn = theirs.self_attn
        weights = [layer.weight.float() for layer in (attn.query, attn.key, attn.value)]
        biases = [layer.bias for layer in (attn.query, attn.key, attn.value)]
        bias = None if any(b is None for b in biases) else torch.cat([b.float() for b in biases])
        mine.self_attn.qkv = Int8Linear(torch.cat(weights), bias)  # per-row scales: as three layers stacked
        del mine.self_attn.query, mine.self_attn.key, mine.self_attn.value
        mine.self_attn.out = int8(attn.out)
        mine.cross_attn.query, mine.cross_attn.out = int8(theirs.cross_attn.query), int8(theirs.cross_attn.out)
        del mine.cross_attn.key, mine.cross_attn.value
    return draft.eval()


def model_dtype(model: nn.Module) -> str:
    """The precision mode a model runs in."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    return "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"
