"""Autoregressive decoding of the Canary decoder: batched greedy and beam search, with a KV cache.

Both follow NeMo's generators (`GreedySequenceGenerator`, `BeamSearchSequenceGenerator`):
the prompt is fed once, then one token per step; after EOS only padding follows; beam
scores use the length penalty ((5 + len) / 6) ** alpha where len counts the prompt too.
Unlike NeMo, each item's length limit comes from its own encoder length, so an item's
result never depends on which other items share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from serinus.model.decoder import KVCache, TransformerDecoder, cross_attention_mask


@dataclass
class DecodingConfig:
    beam_size: int = 1  # 1 = greedy
    # NeMo's decoding.strategy. "beam" (even of size 1, NeMo's default) may write one token past the
    # length limit, as NeMo's beam search does: its first token comes from the prompt's pass, then it
    # takes `limit` more steps; greedy stops at `limit` tokens
    strategy: str = "greedy"
    length_penalty: float = 0.0
    max_generation_delta: int = -1  # < 0: no limit but the decoder's max_sequence_length
    return_nbest: bool = False
    ctc_weight: float = 0.0  # > 0 with a model's CTC head: joint CTC/attention beam search (serinus.joint_decoding)
    # greedy: an int8 draft proposes tokens and the model checks several at once, where that pays
    # (CanaryModel.speculative_draft); the same tokens either way
    speculative: bool = True

    @property
    def searches_beam(self) -> bool:
        """A beam search in NeMo's sense (`strategy` beam, of any size, or a beam wider than 1)."""
        return self.strategy == "beam" or self.beam_size > 1

    @classmethod
    def from_nemo(cls, cfg: dict | None) -> "DecodingConfig":
        """NeMo's `decoding:` section. `strategy: beam` with beam_size 1 decodes greedily (keeping the beam
        strategy's length limit, see `strategy`). NeMo reads
        `beam.length_penalty` and ignores `len_pen`, so `len_pen` does not count here either."""
        cfg = cfg or {}
        strategy = cfg.get("strategy", "beam")
        if strategy == "beam":
            beam = cfg.get("beam") or {}
            return cls(
                beam_size=int(beam.get("beam_size", 1)),
                strategy="beam",
                length_penalty=float(beam.get("length_penalty", 0.0) or 0.0),
                max_generation_delta=int(beam.get("max_generation_delta", 50)),
            )
        greedy = cfg.get("greedy") or {}
        return cls(beam_size=1, max_generation_delta=int(greedy.get("max_generation_delta", -1)))


@dataclass
class Hypothesis:
    """One decoded item. `y_sequence`: token ids without prompt and EOS (as NeMo's)."""

    text: str = ""
    y_sequence: list[int] = field(default_factory=list)
    score: float = 0.0
    timestamp: dict = field(default_factory=dict)
    nbest: list["Hypothesis"] = field(default_factory=list)
    error: str | None = None  # set when this item could not be processed
    warnings: list[str] = field(default_factory=list)  # e.g. words left without timestamps, and why

    def __repr__(self) -> str:
        return f"Hypothesis(text={self.text!r}, score={self.score:.4f}, tokens={len(self.y_sequence)})"


def max_new_tokens(encoder_lengths: Tensor, prompt_len: int, cfg: DecodingConfig, max_seq_len: int) -> list[int]:
    """NeMo's limit: min(max_seq_len, enc_len + delta) when delta >= 0, else max_seq_len; minus the prompt;
    plus one for a beam search (`DecodingConfig.strategy`; the last token needs no decoder position)."""
    extra = 1 if cfg.searches_beam else 0
    limits = []
    for enc_len in encoder_lengths.tolist():
        total = min(max_seq_len, enc_len + cfg.max_generation_delta) if cfg.max_generation_delta >= 0 else max_seq_len
        limits.append(max(total - prompt_len, 0) + extra)
    return limits


def _select(state: list, index: Tensor) -> list:
    """Keep rows `index` of every tensor and cache in a nested list/dict structure of per-layer states."""
    if state is None:  # e.g. no cross-attention mask
        return None
    if isinstance(state, Tensor):
        return state.index_select(0, index)
    if isinstance(state, KVCache):
        state.select(index)
        return state
    if isinstance(state, dict):
        return {k: _select(v, index) for k, v in state.items()}
    return type(state)(_select(s, index) for s in state)


@torch.inference_mode()
def greedy_decode(
    decoder: TransformerDecoder,
    encoder_states: Tensor,
    encoder_mask: Tensor,
    prompts: Tensor,
    limits: list[int],
    eos_id: int,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """encoder_states [B, T, D], encoder_mask [B, T] bool, prompts [B, P] (same length) ->
    generated ids per item (EOS excluded). `vocab_size`: ids at or above it (the padding of the
    output layer to a multiple of 8) are never chosen."""
    batch, prompt_len = prompts.shape
    cross_kv = decoder.cross_kv(encoder_states)
    cross_mask = cross_attention_mask(encoder_mask, encoder_states.dtype)
    caches = decoder.new_caches(prompt_len + max(limits, default=0))
    results: list[list[int]] = [[] for _ in range(batch)]
    active = torch.arange(batch, device=prompts.device)  # original index of each row still decoding
    limits_t = torch.tensor(limits, device=prompts.device)
    tokens, start = prompts, 0
    for step in range(max(limits, default=0)):
        log_probs = _mask_padding(decoder.step(tokens, start, cross_kv, cross_mask, caches), vocab_size)
        next_tokens = log_probs.argmax(dim=-1)  # [b]
        start += tokens.shape[1]
        finished = next_tokens == eos_id
        for item, tok, done in zip(active.tolist(), next_tokens.tolist(), finished.tolist()):  # one sync a step
            if not done:
                results[item].append(tok)
        finished |= limits_t[active] <= step + 1
        if finished.all():
            break
        if finished.any():  # drop finished rows from the batch and from every cache
            keep = (~finished).nonzero().squeeze(1)
            active, next_tokens = active[keep], next_tokens[keep]
            cross_kv, cross_mask, caches = _select(cross_kv, keep), _select(cross_mask, keep), _select(caches, keep)
        tokens = next_tokens[:, None]
    return results


@torch.inference_mode()
def speculative_greedy_decode(
    decoder: TransformerDecoder,
    draft: TransformerDecoder,
    encoder_states: Tensor,
    encoder_mask: Tensor,
    prompts: Tensor,
    limits: list[int],
    eos_id: int,
    vocab_size: int | None = None,
    draft_len: int = 8,
    max_draft_len: int = 32,
) -> list[list[int]]:
    """`greedy_decode`'s result from fewer passes of `decoder`: `draft`, a cheaper copy of it (its
    int8 copy, serinus.precision.int8_draft), proposes a run of tokens one at a time, and `decoder`
    checks them all in one pass (at batch 1 a pass costs reading its weights once, however many
    positions it holds). Every token kept is `decoder`'s own argmax; the proposals only decide how far
    one pass gets. The run starts at `draft_len` tokens and doubles, up to `max_draft_len`, while
    passes accept all of it (a pass costs several draft steps: measured on the 180m-flash architecture,
    a 77 s clip took 10.9 s with runs of 8, 9.2 s with runs of 32, its int8 draft agreeing nearly
    always); after a rejection it is what that pass accepted, plus one. The batch moves on by its
    shortest run of agreement; finished rows leave it. Both decoders read `decoder`'s cross-attention
    keys/values."""
    batch, prompt_len = prompts.shape
    results: list[list[int]] = [[] for _ in range(batch)]
    if max(limits, default=0) == 0:
        return results
    cross_kv = decoder.cross_kv(encoder_states)
    cross_mask = cross_attention_mask(encoder_mask, encoder_states.dtype)
    capacity = prompt_len + max(limits)
    caches, draft_caches = decoder.new_caches(capacity), draft.new_caches(capacity)
    token = _mask_padding(decoder.step(prompts, 0, cross_kv, cross_mask, caches), vocab_size).argmax(-1)  # [b]
    draft.step(prompts, 0, cross_kv, cross_mask, draft_caches)
    active = torch.arange(batch, device=prompts.device)  # original index of each row still decoding
    pos = prompt_len  # `caches` hold positions 0..pos-1; `token` (decided) goes at `pos`
    run = max(1, draft_len)  # tokens the draft proposes in the next pass (before the limits)
    unseen = token[:, None]  # decided tokens the draft has not read: its positions draft_length..pos
    while True:
        rows = active.tolist()
        for item, tok in zip(rows, token.tolist()):
            if tok != eos_id:
                results[item].append(tok)
        finished = torch.tensor([tok == eos_id or len(results[item]) >= limits[item]
                                 for item, tok in zip(rows, token.tolist())], device=prompts.device)
        if bool(finished.all()):
            return results
        if bool(finished.any()):  # drop finished rows from the batch and from every cache
            keep = (~finished).nonzero().squeeze(1)
            active, token, unseen = active[keep], token[keep], unseen[keep]
            cross_kv, cross_mask = _select(cross_kv, keep), _select(cross_mask, keep)
            caches, draft_caches = _select(caches, keep), _select(draft_caches, keep)
            rows = active.tolist()
        # this pass decides k + 1 tokens at most; no row may take more than its limit allows
        k = min(run, min(limits[item] - len(results[item]) for item in rows) - 1)
        proposals, x = [], unseen
        for _ in range(k):
            start = draft_caches[0].length
            x = _mask_padding(draft.step(x, start, cross_kv, cross_mask, draft_caches), vocab_size).argmax(-1)[:, None]
            proposals.append(x)
        block = torch.cat([token[:, None], *proposals], dim=1)  # [b, 1 + k]: positions pos .. pos + k
        checked = _mask_padding(decoder.step(block, pos, cross_kv, cross_mask, caches, every_position=True),
                                vocab_size).argmax(-1)  # [b, 1 + k]: the decoder's token after each position
        agreed = int((checked[:, :k] == block[:, 1:]).int().cumprod(dim=1).sum(dim=1).min()) if k else 0
        run = min(2 * run, max_draft_len) if agreed == k else agreed + 1
        # decided now: block[:, 1 : agreed + 1] (the same as checked[:, :agreed]), and checked[:, agreed] next
        nxt = checked[:, agreed].clone()
        for r, (item, row) in enumerate(zip(rows, block[:, 1 : agreed + 1].tolist())):
            if eos_id in row:  # the row ends inside the agreed tokens
                row, nxt[r] = row[: row.index(eos_id)], eos_id
            results[item].extend(row)
        decided = torch.cat([block[:, : agreed + 1], nxt[:, None]], dim=1)  # positions pos .. pos + agreed + 1
        for cache in caches:
            cache.truncate(pos + agreed + 1)
        for cache in draft_caches:
            cache.truncate(pos + agreed + 1)
        draft_length = draft_caches[0].length
        unseen = torch.cat([unseen, nxt[:, None]], dim=1) if k == 0 else decided[:, draft_length - pos :]
        pos, token = pos + agreed + 1, nxt


@torch.inference_mode()
def beam_search(
    decoder: TransformerDecoder,
    encoder_states: Tensor,
    encoder_mask: Tensor,
    prompts: Tensor,
    limits: list[int],
    eos_id: int,
    pad_id: int,
    beam_size: int,
    length_penalty: float = 0.0,
    vocab_size: int | None = None,
) -> list[list[tuple[list[int], float]]]:
    """NeMo's beam search. Returns, per item, the beams as (ids without EOS/pad, score) sorted
    best first; the score is the sum of token log-probs (NeMo's returned beam score)."""
    batch, prompt_len = prompts.shape
    device = prompts.device
    k = beam_size

    def penalty(lengths: Tensor) -> Tensor:
        return ((5.0 + lengths) / 6.0).pow(length_penalty)

    cross_kv = decoder.cross_kv(encoder_states)
    cross_mask = cross_attention_mask(encoder_mask, encoder_states.dtype)
    caches = decoder.new_caches(prompt_len + max(limits, default=0))
    log_probs = _mask_padding(decoder.step(prompts, 0, cross_kv, cross_mask, caches), vocab_size)  # [B, V]
    scores, first = log_probs.topk(k, dim=-1)  # [B, k]
    scores, generated = scores.reshape(-1, 1), first.reshape(-1, 1)  # [B*k, 1]
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    cross_kv, cross_mask, caches = _select(cross_kv, rows), _select(cross_mask, rows), _select(caches, rows)
    limits_t = torch.tensor(limits, device=device).repeat_interleave(k)[:, None]  # [B*k, 1]

    def finished_mask(generated: Tensor) -> Tensor:
        last = generated[:, -1:]
        return ((last == eos_id) | (last == pad_id) | (limits_t <= generated.shape[1])).long()

    pad_profile = finished_mask(generated)
    prefix_len = torch.full_like(scores, prompt_len + 2.0)
    for step in range(1, max(limits, default=1)):
        if pad_profile.sum() == batch * k:
            break
        log_probs = _mask_padding(
            decoder.step(generated[:, -1:], prompt_len + step - 1, cross_kv, cross_mask, caches), vocab_size)
        scores_i, tokens_i = log_probs.topk(k, dim=-1)  # [B*k, k]
        pad_mask = pad_profile.repeat(1, k)
        tokens_i = pad_id * pad_mask + tokens_i * (1 - pad_mask)
        # a finished beam continues with a single <pad> of score 0; its other candidates are dropped
        pad_mask[:, 1:] = pad_mask[:, 1:] * -10000.0
        scores = scores + scores_i * (1 - pad_mask).to(scores.dtype)
        pen = penalty(prefix_len)
        scores = scores / pen
        scores, chosen = scores.view(batch, k * k).topk(k, dim=1)  # [B, k]
        scores = scores.reshape(-1, 1) * pen
        parent = (chosen // k + torch.arange(batch, device=device)[:, None] * k).reshape(-1)
        generated = torch.cat([generated[parent], tokens_i.view(batch, k * k).gather(1, chosen).reshape(-1, 1)], 1)
        caches = _select(caches, parent)
        not_done = (generated != eos_id) & (generated != pad_id)
        prefix_len = prompt_len + 1 + not_done.sum(dim=1, keepdim=True).to(scores.dtype)
        pad_profile = finished_mask(generated)

    final = (scores / penalty(prefix_len)).view(batch, k)
    order = final.argsort(dim=1, descending=True, stable=True)
    out = []
    for b in range(batch):
        beams = []
        for j in order[b].tolist():
            beams.append((_strip_after_eos(generated[b * k + j].tolist(), eos_id, pad_id), float(scores[b * k + j])))
        out.append(beams)
    return out


def _mask_padding(log_probs: Tensor, vocab_size: int | None) -> Tensor:
    """Rule out the output rows that pad the vocabulary to a multiple of 8 (no token has them)."""
    if vocab_size is not None and vocab_size < log_probs.shape[-1]:
        log_probs[..., vocab_size:] = float("-inf")
    return log_probs


def _strip_after_eos(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS or padding."""
    for i, t in enumerate(ids):
        if t in (eos_id, pad_id):
            return ids[:i]
    return ids
