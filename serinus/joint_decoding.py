"""Joint CTC/attention decoding for models trained with an auxiliary CTC head (`ctc_weight > 0`).

An attention decoder trained on little data tends to write fluent sentences it has seen rather
than what was said; the CTC head, which must account for every frame, does not. Here both vote:

    candidates = the decoder's n-best (greedy: its one hypothesis) + the CTC head's greedy path
    score(y)   = (1 - w) * log P_att(y, EOS | prompt, audio) + w * log P_ctc(y | audio)

and the best-scoring candidate wins (attention rescoring, as in ESPnet and WeNet). Both scores
are exact sequence log-likelihoods: the decoder's by teacher forcing, CTC's by its forward sum.
NeMo checkpoints have no CTC head, so their decoding is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from serinus.model.decoder import TransformerDecoder
from serinus.model.encoder import time_mask


def ctc_greedy(log_probs: Tensor, lengths: Tensor, blank: int, excluded=frozenset(),
               vocab_size: int | None = None) -> list[list[int]]:
    """Best path per row, repeats merged; blanks, `excluded` ids (special tokens) and ids at or past
    `vocab_size` (the padding of the output layer) dropped."""
    best = log_probs.argmax(-1)  # [B, T]
    limit = vocab_size if vocab_size is not None else log_probs.shape[-1]
    out = []
    for row, n in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[: int(n)]).tolist()
        out.append([t for t in ids if t != blank and t < limit and t not in excluded])
    return out


@torch.inference_mode()
def attention_scores(decoder: TransformerDecoder, states: Tensor, mask: Tensor, prompt: list[int],
                     candidates: list[list[int]], eos_id: int, pad_id: int) -> Tensor:
    """log P(candidate + EOS | prompt) under the decoder for one utterance (states [1, T, D])."""
    seqs = [prompt + c + [eos_id] for c in candidates]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=states.device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=states.device)
    lengths = torch.tensor([len(s) - 1 for s in seqs], device=states.device)
    n = len(seqs)
    log_probs = decoder(ids[:, :-1], states.expand(n, -1, -1), mask.expand(n, -1), time_mask(lengths, width - 1))
    picked = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [n, width-1]
    positions = torch.arange(width - 1, device=states.device)[None, :]
    scored = (positions >= len(prompt) - 1) & (positions < lengths[:, None])  # answer + EOS
    return (picked * scored).sum(-1)


def ctc_scores(log_probs: Tensor, length: int, candidates: list[list[int]], blank: int) -> Tensor:
    """log P_ctc(candidate | audio) for one utterance (log_probs [T, C])."""
    n = len(candidates)
    lp = log_probs[:length, None, :].expand(length, n, -1)
    targets = torch.tensor([t for c in candidates for t in c], dtype=torch.long)
    target_lens = torch.tensor([len(c) for c in candidates], dtype=torch.long)
    nll = F.ctc_loss(lp.float().cpu(), targets, torch.full((n,), length, dtype=torch.long), target_lens,
                     blank=blank, reduction="none", zero_infinity=False)
    return -nll  # -inf where a candidate cannot fit the frames


@torch.inference_mode()
def rescore(decoder: TransformerDecoder, states: Tensor, mask: Tensor, ctc_log_probs: Tensor, enc_lens: Tensor,
            prompts: list[list[int]], nbest: list[list[list[int]]], ctc_weight: float, blank: int,
            eos_id: int, pad_id: int, excluded=frozenset(), vocab_size: int | None = None
            ) -> list[tuple[list[int], float]]:
    """Pick, per row, the best of the decoder's candidates `nbest[row]` and the CTC greedy path."""
    greedy = ctc_greedy(ctc_log_probs, enc_lens, blank, excluded, vocab_size)
    out = []
    for row in range(states.shape[0]):
        candidates = []
        for c in nbest[row] + [greedy[row]]:
            if c not in candidates:
                candidates.append(c)
        att = attention_scores(decoder, states[row : row + 1], mask[row : row + 1], prompts[row], candidates,
                               eos_id, pad_id)
        ctc = ctc_scores(ctc_log_probs[row], int(enc_lens[row]), candidates, blank).to(att.device)
        total = (1.0 - ctc_weight) * att + ctc_weight * ctc
        best = int(total.argmax())
        out.append((candidates[best], float(total[best])))
    return out
