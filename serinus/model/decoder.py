"""Transformer decoder of Canary (NeMo's pre-LN `TransformerDecoderNM`) and its output head.

tokens [B, L] -> token embedding + fixed sinusoidal positions (divided by sqrt(hidden), as
NeMo does) -> LayerNorm -> N x (self-attn, cross-attn, FFN; pre-LN) -> final LayerNorm
-> Linear tied to the token embedding -> log-probs [B, L, V].

Incremental decoding keeps a preallocated per-layer cache of self-attention keys/values
(`KVCache`, written in place, never concatenated) and computes the cross-attention
keys/values once per utterance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serinus.model.dropout import Dropout
from serinus.precision import unpacked_linear

NEG_INF = -10000.0  # NeMo's additive mask value


@dataclass
class DecoderConfig:
    vocab_size: int = 16384  # padded to a multiple of 8
    hidden_size: int = 1024
    inner_size: int = 4096
    num_layers: int = 4
    num_attention_heads: int = 8
    max_sequence_length: int = 1024
    hidden_act: str = "relu"
    dropout: float = 0.1  # embedding, attention-score, layer and FFN dropout (NeMo's 0.1 each)

    @classmethod
    def from_nemo(cls, cfg: dict, vocab_size: int) -> "DecoderConfig":
        """Read NeMo's `transf_decoder.config_dict` section."""
        if not cfg.get("pre_ln", True):
            raise ValueError("transf_decoder.config_dict.pre_ln=false (post-LN decoder) is not supported")
        if cfg.get("learn_positional_encodings"):
            raise ValueError("transf_decoder learn_positional_encodings=true is not supported")
        act = cfg.get("hidden_act", "relu")
        if act not in ("relu", "gelu"):
            raise ValueError(f"transf_decoder hidden_act={act!r} is not supported (relu, gelu)")
        return cls(
            vocab_size=vocab_size,
            hidden_size=cfg["hidden_size"],
            inner_size=cfg["inner_size"],
            num_layers=cfg["num_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            max_sequence_length=cfg.get("max_sequence_length", 512),
            hidden_act=act,
            dropout=cfg.get("ffn_dropout", 0.1),
        )


def sinusoidal_positions(max_len: int, hidden: int) -> Tensor:
    """NeMo's FixedPositionalEncoding table [max_len, hidden], already divided by sqrt(hidden). Made on
    the CPU even in a model built on the meta device (loading), where it is not loaded."""
    position = torch.arange(0.0, max_len, device="cpu").unsqueeze(1)
    coef = -math.log(10000.0) / hidden
    div_term = torch.exp(coef * torch.arange(0.0, hidden, 2, device="cpu"))
    pe = torch.zeros(max_len, hidden, device="cpu")
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe / math.sqrt(hidden)


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_head = n_heads, hidden // n_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = dropout
        # int8 inference: query, key and value stacked into one layer (serinus.precision.quantize_int8),
        # one call instead of three, whose input is quantised once
        self.qkv: nn.Module | None = None

    def split_heads(self, x: Tensor) -> Tensor:  # [B, L, D] -> [B, H, L, d]
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_head).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.key(x)), self.split_heads(self.value(x))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's queries, keys and values [B, H, L, d] of x [B, L, D]."""
        if self.qkv is None:
            return (self.split_heads(self.query(x)), *self.project_kv(x))
        batch, length, _ = x.shape
        return self.qkv(x).view(batch, length, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q: Tensor | None = None) -> Tensor:
        # x: [B, Lq, D]; k, v: [B, H, Lk, d]; mask: additive, broadcastable to [B, H, Lq, Lk];
        # q: the queries [B, H, Lq, d] where already projected (self-attention), else from x
        q = self.split_heads(self.query(x)) if q is None else q
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class KVCache:
    """One layer's self-attention keys/values [B, H, capacity, d], preallocated on the first step and
    written in place; `length` positions are filled. (torch.empty leaves unused capacity untouched, so it
    costs address space, not memory.)"""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k = self.v = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v [B, H, l, d]; return the keys/values of all positions so far."""
        end = self.length + k.shape[2]
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (a rejected speculative draft)."""
        self.length = min(self.length, length)

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (in that order): only the filled positions are copied."""
        if self.k is None:
            return
        k, v = self.k.new_empty((len(index),) + self.k.shape[1:]), self.v.new_empty((len(index),) + self.v.shape[1:])
        k[:, :, : self.length] = self.k[index, :, : self.length]
        v[:, :, : self.length] = self.v[index, :, : self.length]
        self.k, self.v = k, v


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn_norm = nn.LayerNorm(h)
        self.self_attn = Attention(h, cfg.num_attention_heads, cfg.dropout)
        self.cross_attn_norm = nn.LayerNorm(h)
        self.cross_attn = Attention(h, cfg.num_attention_heads, cfg.dropout)
        self.mlp_norm = nn.LayerNorm(h)
        self.mlp_in = nn.Linear(h, cfg.inner_size)
        self.mlp_out = nn.Linear(cfg.inner_size, h)
        self.act = F.relu if cfg.hidden_act == "relu" else F.gelu
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x, self_mask, cross_kv, cross_mask, cache: KVCache | None = None) -> Tensor:
        y = self.self_attn_norm(x)
        q, k, v = self.self_attn.project_qkv(y)
        if cache is not None:  # attend to the keys/values of earlier positions too
            k, v = cache.append(k, v)
        x = x + self.dropout(self.self_attn(y, k, v, self_mask, q=q))
        x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), *cross_kv, cross_mask))
        x = x + self.dropout(self.mlp_out(self.act(self.mlp_in(self.mlp_norm(x)))))
        return x


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        # Built on the meta device to be loaded, it skips random init (torch's normal_ on meta is slow:
        # it imports torch._dynamo); built for real, it draws the same random numbers as nn.Embedding.
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        loading = self.token_embedding.weight.is_meta
        if not loading:
            nn.init.normal_(self.token_embedding.weight)
        self.register_buffer(
            "positions", sinusoidal_positions(cfg.max_sequence_length, cfg.hidden_size), persistent=False
        )
        self.embedding_norm = nn.LayerNorm(cfg.hidden_size)
        self.blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = nn.LayerNorm(cfg.hidden_size)
        # output head: weight tied to the token embedding, bias of its own
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.quantized_head = None  # int8 mode: a quantised copy of the head (serinus.precision)
        self.dropout = Dropout(cfg.dropout)
        if not loading:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """NeMo's transformer init: N(0, 0.02) weights, zero biases. (torch's default N(0, 1)
        embedding, tied to the head, would start training from logits of std ~sqrt(hidden).)"""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head_bias)

    def embed(self, tokens: Tensor, start: int = 0) -> Tensor:
        length = tokens.shape[1]
        if start + length > self.cfg.max_sequence_length:
            raise ValueError(
                f"decoder input of {start + length} tokens exceeds max_sequence_length "
                f"{self.cfg.max_sequence_length}"
            )
        x = self.token_embedding(tokens) + self.positions[start : start + length]
        return self.dropout(self.embedding_norm(x))

    def cross_kv(self, encoder_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer cross-attention keys/values of the encoder states [B, T, D]; computed once."""
        return [block.cross_attn.project_kv(encoder_states) for block in self.blocks]

    def logits(self, x: Tensor) -> Tensor:
        if self.quantized_head is not None:
            return self.quantized_head(self.final_norm(x))
        return unpacked_linear(self.final_norm(x), self.token_embedding.weight, self.head_bias)

    def forward(
        self,
        tokens: Tensor,
        encoder_states: Tensor,
        encoder_mask: Tensor,
        token_mask: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced pass. tokens [B, L], encoder_states [B, T, D], encoder_mask [B, T] bool
        (True = valid), token_mask [B, L] bool -> log-probs [B, L, V]."""
        length = tokens.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()[None, None]
        if token_mask is not None:
            allowed = allowed & token_mask[:, None, None, :]
        self_mask = additive_mask(allowed, encoder_states.dtype)
        cross_mask = additive_mask(encoder_mask[:, None, None, :], encoder_states.dtype)
        x = self.embed(tokens)
        for block, kv in zip(self.blocks, self.cross_kv(encoder_states)):
            x = block(x, self_mask, kv, cross_mask)
        return F.log_softmax(self.logits(x).float(), dim=-1)

    def new_caches(self, capacity: int | None = None) -> list[KVCache]:
        """Empty self-attention caches, one per layer, for up to `capacity` positions (default: all)."""
        capacity = min(capacity or self.cfg.max_sequence_length, self.cfg.max_sequence_length)
        return [KVCache(capacity) for _ in self.blocks]

    def step(self, tokens: Tensor, start: int, cross_kv, cross_mask: Tensor | None, caches: list[KVCache],
             every_position: bool = False) -> Tensor:
        """Incremental pass over new tokens [B, l] at positions start..start+l-1, using and
        extending `caches` (`new_caches()`, holding positions 0..start-1); `cross_mask` from
        `cross_attention_mask` (None: no padded frame). Returns log-probs of the last position [B, V],
        or of every new position [B, l, V] with `every_position`."""
        length = tokens.shape[1]
        x = self.embed(tokens, start)
        self_mask = None
        if length > 1:  # several new tokens (a prompt, a speculative draft): each sees the cache and its left
            causal = torch.ones(length, start + length, dtype=torch.bool, device=tokens.device).tril(start)
            self_mask = additive_mask(causal[None, None], x.dtype)
        for block, kv, cache in zip(self.blocks, cross_kv, caches):
            x = block(x, self_mask, kv, cross_mask, cache)
        return F.log_softmax(self.logits(x if every_position else x[:, -1]).float(), dim=-1)


def cross_attention_mask(encoder_mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """encoder_mask [B, T] bool (True = valid) -> the additive mask [B, 1, 1, T] of the cross-attention,
    or None where no frame is padded (one utterance, or a batch of equal lengths): attention then adds
    no zeros, the same result (~0.13 ms of a 4.5 ms int8 decoder step)."""
    if bool(encoder_mask.all()):
        return None
    return additive_mask(encoder_mask[:, None, None, :], dtype)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool mask (True = may attend) -> additive mask with NeMo's -10000 for masked positions."""
    return (~allowed).to(dtype) * NEG_INF
