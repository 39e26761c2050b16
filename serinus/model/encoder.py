"""FastConformer encoder, as NeMo's `ConformerEncoder` with `dw_striding` subsampling.

log-mel [B, n_mels, T] -> 8x conv subsampling -> N x Conformer block (macaron FFN,
relative-position self-attention, depthwise conv module) -> [B, d_model, T/8].

Module and parameter names follow NeMo's so a NeMo state dict loads without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serinus.model.dropout import Dropout
from serinus.precision import linear_silu, unpacked_linear


@dataclass
class EncoderConfig:
    feat_in: int = 128
    n_layers: int = 17
    d_model: int = 512
    n_heads: int = 8
    ff_expansion_factor: int = 4
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"
    self_attention_model: str = "rel_pos"
    xscaling: bool = False
    untie_biases: bool = True
    use_bias: bool = True
    pos_emb_max_len: int = 5000
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1

    @classmethod
    def from_nemo(cls, cfg: dict) -> "EncoderConfig":
        """Read NeMo's `encoder:` section, refusing settings this implementation does not cover."""
        supported = {
            "subsampling": ("dw_striding", "striding"),
            "self_attention_model": ("rel_pos",),
            "conv_norm_type": ("batch_norm", "layer_norm"),
        }
        for key, allowed in supported.items():
            if key in cfg and cfg[key] not in allowed:
                raise ValueError(f"encoder.{key}={cfg[key]!r} is not supported (supported: {', '.join(allowed)})")
        if cfg.get("causal_downsampling"):
            raise ValueError("encoder.causal_downsampling=true (streaming models) is not supported")
        context = cfg.get("att_context_size") or [-1, -1]
        if list(context) != [-1, -1]:
            raise ValueError(f"encoder.att_context_size={list(context)} is not supported (only full context [-1, -1])")
        if cfg.get("reduction"):
            raise ValueError(f"encoder.reduction={cfg['reduction']!r} is not supported")
        feat_out = cfg.get("feat_out", -1)
        if feat_out not in (-1, None, cfg.get("d_model")):
            raise ValueError(f"encoder.feat_out={feat_out} (an output projection) is not supported")
        conv_channels = cfg.get("subsampling_conv_channels", -1)
        fields = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in cfg.items() if k in fields and v is not None}
        if conv_channels in (-1, None):
            kwargs["subsampling_conv_channels"] = cfg["d_model"]
        return cls(**kwargs)


def calc_subsampled_length(lengths: Tensor, num_stages: int) -> Tensor:
    """Length after `num_stages` convs with kernel 3, stride 2, padding 1: L -> floor((L-1)/2) + 1."""
    for _ in range(num_stages):
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return lengths


def time_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B] lengths -> [B, max_len] bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class ConvSubsampling(nn.Module):
    """Stride-2 conv stages that shrink time and frequency by `factor`, then a Linear to d_model.

    `dw_striding`: one full 3x3 conv, then (depthwise 3x3 + pointwise 1x1) stages.
    `striding`: full 3x3 convs only. Padded time steps are zeroed before every conv that mixes time
    steps and at the end, which gives the valid frames of NeMo's MaskedConvSequential (zeroing before
    every layer), so an item's output does not depend on its batch.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_stages = int(math.log2(cfg.subsampling_factor))
        channels = cfg.subsampling_conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(self.num_stages - 1):
            if cfg.subsampling == "dw_striding":
                layers += [
                    nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                    nn.Conv2d(channels, channels, 1),
                    nn.ReLU(),
                ]
            else:
                layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        freq = cfg.feat_in
        for _ in range(self.num_stages):
            freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(channels * freq, cfg.d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, F] features, lengths [B] -> [B, T', d_model], lengths [B]."""
        if torch.is_grad_enabled():
            x, lengths = self._convs(x.unsqueeze(1), lengths)
        else:
            # Inference: one item at a time, each cut to its own length, so the widest activation
            # ([C, T/2, F/2]: 390 MB for 4 x 30 s at 256 channels) is held for one item, not the whole
            # batch, and no layer has padding to zero (a whole pass over that activation each). The
            # result is the same: padding is zeroed before every conv that mixes time steps, as the
            # convs' own padding is.
            # The output is as long as the longest item needs (the features carry one frame past the
            # valid length), so an unpadded batch needs no masks in the layers either.
            t_out = int(calc_subsampled_length(lengths.max().clamp(min=1), self.num_stages))
            parts, lens = [], []
            for i in range(x.shape[0]):
                n = max(int(lengths[i]), 1)
                y, out_len = self._convs_in_chunks(x[i : i + 1, :n], lengths[i : i + 1])
                parts.append(F.pad(y, (0, 0, 0, t_out - y.shape[2])) if y.shape[2] < t_out else y)
                lens.append(out_len)
            x, lengths = (torch.cat(parts), torch.cat(lens)) if len(parts) > 1 else (parts[0], lens[0])
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths  # [B, T', d_model]

    CHUNK_FRAMES = 1024  # inference: longer inputs go through the convs in pieces of this many frames

    def _convs_in_chunks(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """One item [1, T, F] through the convs, in time pieces when T is long (a 77 s clip's first conv
        output alone is 250 MB at 256 channels). Each piece starts on the output grid (a multiple of
        the subsampling factor) and carries a halo of `halo` output frames on both sides, which are
        dropped: only the outermost output frame of a piece sees the piece's edge, so the kept frames
        are those of the whole-input computation."""
        t = x.shape[1]
        if t <= self.CHUNK_FRAMES:
            return self._convs(x.unsqueeze(1), lengths)
        factor, halo = 2 ** self.num_stages, 4
        t_out = int(calc_subsampled_length(torch.tensor(t), self.num_stages))
        step = self.CHUNK_FRAMES // factor  # output frames kept per piece
        pieces = []
        for j0 in range(0, t_out, step):
            j1 = min(j0 + step, t_out)
            start = max(0, (j0 - halo) * factor)
            stop = min(t, (j1 + halo) * factor)
            y, _ = self._convs(x[:, start:stop].unsqueeze(1), lengths - start)
            pieces.append(y[:, :, j0 - start // factor : j1 - start // factor])
        return torch.cat(pieces, dim=2), calc_subsampled_length(lengths, self.num_stages)

    def _convs(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, 1, T, F] -> [B, C, T', F']; without autograd, masks and ReLUs work in place (after
        # the first layer, whose input is the caller's tensor) so no activation is held twice
        in_place = not torch.is_grad_enabled()

        def masked(x: Tensor, lengths: Tensor, own: bool) -> Tensor:
            if in_place and int(lengths.min()) >= x.shape[2]:  # no padding (inference, one item): nothing to zero
                return x
            mask = time_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
            return x.mul_(mask) if in_place and own else x * mask

        # channels-last (NHWC) activations and weights: oneDNN's convs run 2-3x faster that way on a
        # CPU, forward and backward alike (the weights are tiny; converting them per call costs nothing)
        x = x.contiguous(memory_format=torch.channels_last)
        # Padding is zeroed where it matters, which gives the valid frames of zeroing before every layer
        # (NeMo's) exactly: before a conv that mixes time steps, and at the end. A ReLU keeps zeros zero and
        # a 1x1 conv mixes no time steps, so masks there would change only padded frames, which the final
        # mask zeroes (in training each [B, C, T, F] mask was ~5 ms forward and backward of a ~110 ms pass).
        for i, layer in enumerate(self.conv):
            if isinstance(layer, nn.Conv2d):
                if layer.kernel_size[0] > 1:
                    x = masked(x, lengths, own=i > 0)
                weight = layer.weight.contiguous(memory_format=torch.channels_last)
                x = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
                if layer.stride[0] > 1:
                    lengths = calc_subsampled_length(lengths, 1)
            else:  # ReLU
                x = x.relu_() if in_place else layer(x)
        return masked(x, lengths, own=True), lengths


def relative_positions(length: int, d_model: int, device, dtype) -> Tensor:
    """Sinusoidal embeddings of relative positions L-1 ... -(L-1): [1, 2L-1, d_model]."""
    positions = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.shape[0], d_model, device=device)
    pe[:, 0::2] = torch.sin(positions * div_term)
    pe[:, 1::2] = torch.cos(positions * div_term)
    return pe.unsqueeze(0).to(dtype)


def rel_shift(x: Tensor) -> Tensor:
    """Turn scores against relative positions [..., T, 2T-1] (positions T-1 ... -(T-1)) into per-key
    scores [..., T, T]: query i, key j reads relative position i - j, at index T-1-i+j. That is
    Transformer-XL's pad-and-reshape shift (NeMo's rel_shift followed by [..., :T]), taken here as a
    strided view of `x` (query row i starts at column T-1-i of its row of `x`): no copy. Leading
    dimensions may have any strides; each query's row must be contiguous."""
    *lead, t, p = x.shape
    if x.stride(-1) != 1 or x.stride(-2) != p:
        x = x.contiguous()
    return x.as_strided((*lead, t, t), (*x.stride()[:-2], p - 1, 1), x.storage_offset() + t - 1)


class RelPositionMultiHeadAttention(nn.Module):
    BIAS_BYTES = 8 << 20  # inference: position biases held at once (heads are grouped to fit)

    def __init__(self, d_model: int, n_heads: int, use_bias: bool, dropout: float):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        # position biases; with untie_biases=False the encoder makes all layers share one pair
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_head))
        self.dropout = dropout

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor | None) -> Tensor:
        # x: [B, T, D]; pos_emb: [1, 2T-1, D]; mask: [B, 1, T, T] bool, True = may attend (None: no
        # padding, every query may attend to every key)
        b, t, _ = x.shape
        h, d = self.n_heads, self.d_head
        u, v = self.pos_bias_u, self.pos_bias_v
        q = self.linear_q(x).view(b, t, h, d)
        k = self.linear_k(x).view(b, t, h, d).transpose(1, 2)
        val = self.linear_v(x).view(b, t, h, d).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(-1, h, d).transpose(0, 1).contiguous()  # [H, 2T-1, d]
        q_u = (q + u).transpose(1, 2)  # [B, H, T, d]
        scale = 1.0 / math.sqrt(d)
        # Position term, added to the content term inside SDPA as an additive bias (masked scores get
        # NeMo's additive -10000). The positions are the same for every utterance, so per head the
        # queries of the whole batch take one [B*T, d] x [d, 2T-1] product, whose shift (a view) and
        # mask make one pass over that head's [B, T, T]: 3x faster than one batched matmul over [B, H]
        # and one pass over [B, H, T, T].
        q_v = ((q + v) * scale).permute(2, 0, 1, 3).reshape(h, b * t, d)
        masked = q_u.new_tensor(-10000.0)

        if torch.is_grad_enabled():
            shifted = [rel_shift(F.linear(q_v[i], p[i]).view(b, t, -1)) for i in range(h)]
            bias = torch.stack(shifted if mask is None else [torch.where(mask[:, 0], s, masked) for s in shifted],
                               dim=1)  # [B, H, T, T]
            out = F.scaled_dot_product_attention(
                q_u, k, val, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=scale
            )
        else:
            # Inference: a group of heads at a time, its bias written in place, so a long input's
            # [B, H, T, T] bias is never held whole (30 MB a layer for 77 s at 8 heads, and as much
            # again to stack it); each head's attention is its own, so the result is the same. A
            # group's products are one batched matmul [g, B*T, 2T-1] and one masked, shifted write:
            # at a short input the operator count, not the work, is the cost (a 2.6 s clip's
            # attention 1.2 -> 0.7 ms a layer in int8).
            group = max(1, min(h, self.BIAS_BYTES // (3 * b * t * t * q_u.element_size())))
            outs = []
            for h0 in range(0, h, group):
                h1 = min(h, h0 + group)
                bias = q_u.new_empty(b, h1 - h0, t, t)
                scores = torch.matmul(q_v[h0:h1], p[h0:h1].transpose(1, 2)).view(h1 - h0, b, t, -1)
                if mask is None:
                    bias.transpose(0, 1).copy_(rel_shift(scores))
                else:  # (under autocast, e.g. a bf16-mixed run's validation, the product is bf16: cast)
                    torch.where(mask[:, 0], rel_shift(scores).to(bias.dtype), masked, out=bias.transpose(0, 1))
                outs.append(F.scaled_dot_product_attention(q_u[:, h0:h1], k[:, h0:h1], val[:, h0:h1], attn_mask=bias,
                                                           scale=scale))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [B, H, T, d]
        if mask is not None:  # rows of padded queries attend to nothing in NeMo: zero them
            out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return self.linear_out(out.transpose(1, 2).reshape(b, t, h * d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, use_bias: bool, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(linear_silu(self.linear1, x)))


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv, norm, Swish, pointwise conv."""

    def __init__(self, d_model: int, kernel_size: int, norm_type: str, use_bias: bool):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=use_bias)
        self.depthwise_conv = nn.Conv1d(
            d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2, groups=d_model, bias=use_bias
        )
        if norm_type == "batch_norm":
            self.batch_norm = nn.BatchNorm1d(d_model)
        else:
            self.batch_norm = nn.LayerNorm(d_model)  # NeMo keeps the attribute name for either norm
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=use_bias)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        # x: [B, T, D]; valid: [B, T] bool (None: no padding). The activations stay time-major ([B, T, D]
        # in memory): the pointwise convs are matmuls over channels (through oneDNN at inference, as the
        # Linear layers) and the depthwise conv runs on a channels-last view, so no transposed copy is made
        x = F.glu(_pointwise(x, self.pointwise_conv1), dim=-1)
        if valid is not None:
            x = x.masked_fill(~valid[..., None], 0.0)  # padding must not leak into the depthwise conv
        conv = self.depthwise_conv
        weight = conv.weight.unsqueeze(-1).contiguous(memory_format=torch.channels_last)  # [D, 1, K, 1]
        x = F.conv2d(x.transpose(1, 2).unsqueeze(-1), weight, conv.bias, 1, (conv.padding[0], 0), 1, conv.groups)
        x = x.squeeze(-1)  # [B, D, T], a view of [B, T, D] memory
        if isinstance(self.batch_norm, nn.LayerNorm):
            x = self.batch_norm(x.transpose(1, 2))
        else:
            x = self.batch_norm(x).transpose(1, 2)
        return _pointwise(F.silu(x), self.pointwise_conv2)


def _pointwise(x: Tensor, conv: nn.Module) -> Tensor:
    """A kernel-1 Conv1d over the channels of time-major x [B, T, C_in] -> [B, T, C_out]; in int8
    mode the conv has become the Linear layer it is (serinus.precision.quantize_int8)."""
    if isinstance(conv, nn.Conv1d):
        return unpacked_linear(x, conv.weight.squeeze(-1), conv.bias)
    return conv(x)


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, ff = cfg.d_model, cfg.d_model * cfg.ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, ff, cfg.use_bias, cfg.dropout)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(d, cfg.conv_kernel_size, cfg.conv_norm_type, cfg.use_bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(d, cfg.n_heads, cfg.use_bias, cfg.dropout_att)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, ff, cfg.use_bias, cfg.dropout)
        self.norm_out = nn.LayerNorm(d)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x, pos_emb, att_mask, valid) -> Tensor:
        # x + 0.5 * y as one pass (add's alpha): the same rounding, halving is exact
        x = torch.add(x, self.dropout(self.feed_forward1(self.norm_feed_forward1(x))), alpha=0.5)
        x = x + self.dropout(self.self_attn(self.norm_self_att(x), pos_emb, att_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), valid))
        x = torch.add(x, self.dropout(self.feed_forward2(self.norm_feed_forward2(x))), alpha=0.5)
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        self.layers = nn.ModuleList([ConformerLayer(cfg) for _ in range(cfg.n_layers)])
        if not cfg.untie_biases:  # one pair of position biases, shared (NeMo lists it under every layer)
            for layer in self.layers[1:]:
                layer.self_attn.pos_bias_u = self.layers[0].self_attn.pos_bias_u
                layer.self_attn.pos_bias_v = self.layers[0].self_attn.pos_bias_v
        self.dropout_pre_encoder = Dropout(cfg.dropout_pre_encoder)
        self.dropout_emb = Dropout(cfg.dropout_emb)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, n_mels, T], lengths [B] -> encoded [B, d_model, T'], lengths [B]."""
        features = features.to(self.pre_encode.conv[0].weight.dtype)  # the front end computes in float32
        x, lengths = self.pre_encode(features.transpose(1, 2), lengths.long())
        t = x.shape[1]
        if self.cfg.xscaling:
            x = x * math.sqrt(self.cfg.d_model)
        x = self.dropout_pre_encoder(x)
        pos_emb = self.dropout_emb(relative_positions(t, self.cfg.d_model, x.device, x.dtype))
        valid = time_mask(lengths, t)  # [B, T']
        if not torch.is_grad_enabled() and bool(valid.all()):
            valid = att_mask = None  # no item padded (inference runs most batches so): no masking passes
        else:
            att_mask = (valid[:, :, None] & valid[:, None, :]).unsqueeze(1)  # [B, 1, T', T']
        for layer in self.layers:
            x = layer(x, pos_emb, att_mask, valid)
        return x.transpose(1, 2), lengths
