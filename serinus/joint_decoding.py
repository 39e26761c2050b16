"""Joint CTC/attention decoding for models trained with an auxiliary CTC head (`ctc_weight > 0`).

An attention decoder trained on little data tends to write fluent sentences it has seen rather
than what was said; the CTC head, which must account for every frame, does not. Here both vote on
every token as the beam grows (label-synchronous joint decoding: Watanabe et al., 2017; ESPnet's
`CTCPrefixScore`):

    score(prefix) = (1 - w) * log P_att(prefix | prompt, audio) + w * log P_ctc(prefix... | audio)

where the CTC term is the probability that the audio begins with the prefix (any continuation),
and a finished hypothesis takes the CTC probability of exactly its tokens. Rescoring only the
decoder's finished candidates, which this replaced, was measured worse (docs/training.md).
NeMo checkpoints have no CTC head, so their decoding is untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from serinus.decoding import _mask_padding, _select
from serinus.model.decoder import TransformerDecoder, cross_attention_mask


class CTCPrefixScorer:
    """CTC prefix log-probabilities of one utterance (log_probs [T, C]), extended one token at a time.

    A prefix's state is r [T, 2]: log-probs of having emitted the prefix by frame t, ending in its last
    token (r[:, 0]) or in a blank (r[:, 1]). The per-frame recursions are linear, so each extension runs
    as two log-cumulative sums over all frames at once instead of a Python loop over frames."""

    def __init__(self, log_probs: Tensor, blank: int):
        self.x = log_probs.double().clamp(min=-1e4)  # float64: the cumulative sums reach -1e4 and beyond
        self.blank = blank
        self.blank_cum = self.x[:, blank].cumsum(0)  # [T]

    def initial(self) -> Tensor:
        """State of the empty prefix [T, 2]: nothing emitted, only blanks so far."""
        r = torch.full((self.x.shape[0], 2), float("-inf"), dtype=torch.float64)
        r[:, 1] = self.blank_cum
        return r

    @staticmethod
    def full_score(r: Tensor) -> Tensor:
        """log P_ctc(prefix | audio) as a complete sequence, for states [..., T, 2]."""
        return torch.logaddexp(r[..., -1, 0], r[..., -1, 1])

    def extend(self, r: Tensor, last: Tensor, tokens: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
        """States r [n, T, 2] of n prefixes, their last tokens [n] and whether each is empty [n];
        candidate tokens [n, m] -> prefix scores [n, m] and the extended states [n, m, T, 2]."""
        n, m = tokens.shape
        a = self.x.T[tokens]  # [n, m, T]: log-prob of each candidate at every frame
        r_sum = torch.logaddexp(r[:, :, 0], r[:, :, 1])  # [n, T]
        # phi(t): the prefix is complete by frame t and the next frame may start the new token; a
        # repeated token needs a blank in between
        phi = torch.where((tokens == last[:, None])[..., None], r[:, None, :, 1], r_sum[:, None, :])  # [n, m, T]
        cum_a = a.cumsum(-1)
        # r_n(t) = logaddexp(r_n(t-1), phi(t-1)) + a(t), r_n(0) = a(0) for the empty prefix, else -inf
        start = torch.where(empty, 0.0, float("-inf")).to(torch.float64)[:, None, None].expand(n, m, 1)
        terms = torch.cat([start, phi[..., :-1] - cum_a[..., :-1]], -1)
        r_n = terms.logcumsumexp(-1) + cum_a
        # r_b(t) = logaddexp(r_b(t-1), r_n(t-1)) + blank(t), r_b(0) = -inf
        cum_b = self.blank_cum
        no_start = torch.full((n, m, 1), float("-inf"), dtype=torch.float64)
        r_b = torch.cat([no_start, r_n[..., :-1] - cum_b[:-1]], -1).logcumsumexp(-1) + cum_b
        # psi: the new token's first frame is any t (at 0 only for the empty prefix)
        first = torch.where(empty[:, None], a[..., 0], torch.tensor(float("-inf"), dtype=torch.float64))
        psi = torch.logaddexp(first, (phi[..., :-1] + a[..., 1:]).logsumexp(-1))
        return psi, torch.stack([r_n, r_b], -1)


@torch.inference_mode()
def joint_beam_search(decoder: TransformerDecoder, states: Tensor, mask: Tensor, prompt: list[int],
                      ctc_log_probs: Tensor, limit: int, beam_size: int, ctc_weight: float, blank: int,
                      eos_id: int, vocab_size: int | None = None) -> list[tuple[list[int], float]]:
    """Label-synchronous beam search of one utterance (states [1, T, D], mask [1, T], ctc_log_probs
    [T, C] cut to its length), every step scored by the decoder and the CTC head together.
    Returns the finished hypotheses (ids without EOS, joint score), best first.

    Each step proposes, per hypothesis, the decoder's best max(4, 1.5 * beam) tokens, every token on
    the CTC head's best path (what it hears in this utterance: a decoder that has learnt a language
    model better than the audio may rank the right token far down) and EOS, and keeps the beam best
    by joint score. Both scores only fall as a prefix grows, so the search stops once a finished
    hypothesis beats every running one."""
    device = states.device
    ctc_log_probs = ctc_log_probs.cpu()
    scorer = CTCPrefixScorer(ctc_log_probs, blank)
    w = ctc_weight
    proposals = max(4, int(1.5 * beam_size))
    heard = _heard_tokens(ctc_log_probs, blank, eos_id, vocab_size) if w > 0 else torch.zeros(0, dtype=torch.long)
    cross_kv1 = decoder.cross_kv(states)
    cross_mask1 = cross_attention_mask(mask, states.dtype)
    caches = decoder.new_caches(len(prompt) + limit + 1)
    prompt_t = torch.tensor([prompt], device=device)
    att_lp = _mask_padding(decoder.step(prompt_t, 0, cross_kv1, cross_mask1, caches), vocab_size).double().cpu()
    # running hypotheses
    seqs: list[list[int]] = [[]]
    att_sum = torch.zeros(1, dtype=torch.float64)
    r = scorer.initial()[None]
    last = torch.tensor([-1])
    ended: list[tuple[list[int], float]] = []
    for step in range(limit):
        cand_lp, cand, valid = _candidates(att_lp, proposals, heard)  # [n, m]
        empty = torch.tensor([not s for s in seqs])
        psi, r_new = scorer.extend(r, last, cand, empty)
        psi = torch.where(cand == eos_id, scorer.full_score(r)[:, None], psi)
        total = ((1 - w) * (att_sum[:, None] + cand_lp) + w * psi).masked_fill(~valid, float("-inf"))  # [n, m]
        best, flat = total.flatten().topk(min(beam_size, total.numel()))
        keep = []
        for score, f in zip(best.tolist(), flat.tolist()):
            i, j = divmod(f, cand.shape[1])
            if int(cand[i, j]) == eos_id:
                ended.append((seqs[i], score))
            else:
                keep.append((i, j, score))
        if not keep or step == limit - 1:
            ended += [(seqs[i] + [int(cand[i, j])], score) for i, j, score in keep]  # cut at the limit
            break
        if ended and max(s for _, s in ended) >= keep[0][2]:
            break
        parent = torch.tensor([i for i, _, _ in keep])
        picked = torch.tensor([int(cand[i, j]) for i, j, _ in keep])
        seqs = [seqs[i] + [int(cand[i, j])] for i, j, _ in keep]
        att_sum = att_sum[parent] + cand_lp[parent, [j for _, j, _ in keep]]
        r = r_new[parent, [j for _, j, _ in keep]]
        last = picked
        caches = _select(caches, parent.to(device))
        rows = torch.zeros(len(keep), dtype=torch.long, device=device)
        att_lp = _mask_padding(decoder.step(picked[:, None].to(device), len(prompt) + step,
                                            _select(cross_kv1, rows), _select(cross_mask1, rows), caches),
                               vocab_size).double().cpu()
    return sorted(ended, key=lambda e: -e[1])


def _heard_tokens(ctc_log_probs: Tensor, blank: int, eos_id: int, vocab_size: int | None) -> Tensor:
    """The distinct tokens on the CTC head's best path (blank and output-layer padding dropped), and
    EOS: the head also knows when everything it heard has been written."""
    path = ctc_log_probs.argmax(-1)
    path = path[(path != blank) & (path < (vocab_size or blank))]
    return torch.unique(torch.cat([path, torch.tensor([eos_id])]))


def _candidates(att_lp: Tensor, proposals: int, heard: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per hypothesis (att_lp [n, V]): the decoder's best `proposals` tokens and the `heard` tokens it
    did not already propose -> (log-probs, ids, valid) [n, m]; a row with fewer than m candidates is
    padded with repeats of its best token, marked not valid."""
    top_lp, top = att_lp.topk(min(proposals, att_lp.shape[1]), dim=-1)
    valid = torch.ones_like(top, dtype=torch.bool)
    if heard.numel() == 0:
        return top_lp, top, valid
    extra = heard[None, :].expand(top.shape[0], -1)
    new = (extra[:, :, None] != top[:, None, :]).all(-1)  # [n, h]: not already proposed
    ids = torch.cat([top, torch.where(new, extra, top[:, :1])], 1)
    return torch.cat([top_lp, att_lp.gather(1, extra)], 1), ids, torch.cat([valid, new], 1)
