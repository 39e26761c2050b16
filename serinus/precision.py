"""Precision modes of a loaded model: float32, bfloat16 (weights and compute), int8 (dynamic).

int8 quantises every Linear layer of the encoder and decoder, and the decoder's output head, to
int8 weights with per-step int8 activations (torch's dynamic quantisation; its x86 kernels use
AVX-512 VNNI / AMX where present); the front end, convolutions, norms and attention stay float32.
bfloat16 runs everything after the front end in bf16; on a CPU this only pays with native bf16
instructions (AVX-512 BF16 or AMX), so it is refused on CPUs without them.
"""

from __future__ import annotations

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


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of the Linear layers of the encoder and decoder, and of the tied
    output head (a quantised copy of the token embedding; the embedding itself stays float32)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "head_bias"):
        head = nn.Linear(decoder.cfg.hidden_size, decoder.cfg.vocab_size)
        head.weight, head.bias = decoder.token_embedding.weight, decoder.head_bias
        head.qconfig = torch.ao.quantization.default_dynamic_qconfig
        decoder.quantized_head = DynamicLinear.from_float(head)
    return model


def model_dtype(model: nn.Module) -> str:
    """The precision mode a model runs in."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if any(isinstance(m, DynamicLinear) for m in model.modules()):
        return "int8"
    return "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"
