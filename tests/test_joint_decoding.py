"""Joint CTC/attention beam search: the CTC prefix scores against brute-force sums over frame
paths, the search's scores against teacher forcing and torch's CTC loss, and its use in transcribe()."""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from conftest import AUDIO, FIXTURES
from serinus import CanaryModel
from serinus.joint_decoding import CTCPrefixScorer, joint_beam_search
from serinus.prompt import encode_prompt


def _model_with_ctc_head():
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    cfg = dataclasses.replace(model.cfg, ctc_weight=0.3)
    out = CanaryModel(cfg, model.tokenizer)
    missing = out.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("ctc_head") for k in missing)
    return out.eval()


def test_transcribe_with_joint_decoding_runs_and_weight_zero_changes_nothing():
    model = _model_with_ctc_head()
    files = [str(AUDIO / "en_01.wav"), str(AUDIO / "de_01.wav")]
    plain = [h.text for h in model.transcribe(files)]
    base = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    assert plain == [h.text for h in base.transcribe(files)]  # ctc_weight of the decoding config is 0
    model.cfg.decoding.ctc_weight = 0.5
    joint = model.transcribe(files)
    assert all(h.error is None for h in joint)


def _brute_force_prefix_probs(lp: torch.Tensor, blank: int):
    """Every frame path of a tiny CTC output, collapsed: {labels: prob} summed over paths."""
    import itertools

    T, C = lp.shape
    probs: dict[tuple, float] = {}
    for path in itertools.product(range(C), repeat=T):
        labels = tuple(t for i, t in enumerate(path) if t != blank and (i == 0 or path[i - 1] != t))
        p = float(sum(lp[i, t] for i, t in enumerate(path)))
        probs[labels] = probs.get(labels, 0.0) + np.exp(p)
    return probs


def test_ctc_prefix_scores_equal_brute_force_sums_over_paths():
    torch.manual_seed(1)
    blank, T = 2, 6
    lp = torch.randn(T, 3, dtype=torch.float64).log_softmax(-1)
    probs = _brute_force_prefix_probs(lp, blank)
    scorer = CTCPrefixScorer(lp, blank)
    # grow the prefix (1, 1, 0) token by token, checking each prefix and full-sequence score
    r, last, empty, prefix = scorer.initial()[None], torch.tensor([-1]), torch.tensor([True]), ()
    for token in (1, 1, 0):
        psi, r_new = scorer.extend(r, last, torch.tensor([[0, 1]]), empty)
        for j, c in enumerate((0, 1)):
            grown = prefix + (c,)
            want_prefix = sum(p for labels, p in probs.items() if labels[: len(grown)] == grown)
            torch.testing.assert_close(psi[0, j].exp().item(), want_prefix, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(CTCPrefixScorer.full_score(r_new[0, j]).exp().item(),
                                       probs.get(grown, 0.0), rtol=1e-9, atol=1e-12)
        j = (0, 1).index(token)
        r, last, empty, prefix = r_new[:, j], torch.tensor([token]), torch.tensor([False]), prefix + (token,)


def test_joint_beam_search_weights_and_limit():
    model = _model_with_ctc_head()
    audio = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
    states, mask, lens, ctc_lp = model.encode_with_ctc(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    tok = model.tokenizer
    p = encode_prompt(tok, model.cfg.prompt_format, {"source_lang": "en", "target_lang": "en", "pnc": "yes"})
    lp = ctc_lp[0, : int(lens[0])]
    args = (model.decoder, states, mask, p, lp)
    kw = dict(blank=model.ctc_blank_id, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
    # weight 0, beam 1: the decoder's greedy answer
    greedy = model.transcribe([audio])[0].y_sequence
    got = joint_beam_search(*args, limit=len(greedy) + 5, beam_size=1, ctc_weight=0.0, **kw)[0][0]
    assert got == greedy
    # the limit cuts hypotheses; a finished one's score is the joint score of its ids
    hyps = joint_beam_search(*args, limit=3, beam_size=3, ctc_weight=0.5, **kw)
    assert hyps and all(len(ids) <= 3 for ids, _ in hyps)
    scores = [s for _, s in hyps]
    assert scores == sorted(scores, reverse=True)
    finished = [h for h in joint_beam_search(*args, limit=60, beam_size=3, ctc_weight=0.5, **kw) if len(h[0]) < 60]
    assert finished
    for ids, score in finished:  # ended by EOS: the sum of both full-sequence scores
        seq = torch.tensor([p + ids + [tok.eos_id]])
        x, n = torch.from_numpy(audio)[None], torch.tensor([len(audio)])
        with torch.no_grad():
            lp_att = model(x, n, seq[:, :-1], torch.tensor([seq.shape[1] - 1]))[0]
        att = lp_att[torch.arange(len(p) - 1, seq.shape[1] - 1), seq[0, len(p):]].sum()
        ctc = -F.ctc_loss(lp[:, None].float(), torch.tensor([ids]), torch.tensor([len(lp)]), torch.tensor([len(ids)]),
                          blank=model.ctc_blank_id, reduction="sum")
        torch.testing.assert_close(score, float((0.5 * att + 0.5 * ctc).detach()), rtol=1e-4, atol=1e-3)


def test_translation_rows_are_decoded_without_the_ctc_head():
    """The CTC head spells what is said, so only transcription rows (source = target) use it; a
    translation in the same call is the decoder's own beam search, whatever the CTC weight."""
    model = _model_with_ctc_head()
    files = [str(AUDIO / "en_01.wav"), str(AUDIO / "en_02.wav")]
    model.cfg.decoding = dataclasses.replace(model.cfg.decoding, beam_size=2, ctc_weight=0.0)
    alone = [h.y_sequence for h in model.transcribe(files, source_lang="en", target_lang="de")]
    model.cfg.decoding = dataclasses.replace(model.cfg.decoding, ctc_weight=0.9)
    with_weight = [h.y_sequence for h in model.transcribe(files, source_lang="en", target_lang="de")]
    assert with_weight == alone
    # a transcription is scored by the CTC head: with a random head and weight 0.9 its answer changes
    asr_alone = [h.y_sequence for h in model.transcribe(files, source_lang="en", target_lang="en")]
    model.cfg.decoding = dataclasses.replace(model.cfg.decoding, ctc_weight=0.0)
    assert asr_alone != [h.y_sequence for h in model.transcribe(files, source_lang="en", target_lang="en")]


def test_tokens_the_ctc_head_hears_are_proposed_even_when_the_decoder_ranks_them_low():
    """With the CTC weight at 1 and a CTC output that spells three tokens plainly, the search finds
    them, though the decoder (here: on random audio) would never propose them itself."""
    model = _model_with_ctc_head()
    audio = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
    states, mask, lens, _ = model.encode_with_ctc(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    tok = model.tokenizer
    p = encode_prompt(tok, model.cfg.prompt_format, {"source_lang": "en", "target_lang": "en", "pnc": "yes"})
    blank = model.ctc_blank_id
    first = model.decoder.step(torch.tensor([p]), 0, model.decoder.cross_kv(states),
                               torch.zeros(1, 1, 1, states.shape[1]), model.decoder.new_caches(len(p) + 2))
    said = first[0, : tok.vocab_size].argsort()[:3].tolist()  # the decoder's three least likely tokens
    frames = [blank, said[0], said[0], blank, said[1], blank, said[2], blank]
    lp = torch.full((len(frames), blank + 1), -20.0)
    lp[torch.arange(len(frames)), frames] = 0.0
    lp = lp.log_softmax(-1)
    hyps = joint_beam_search(model.decoder, states, mask, p, lp, limit=10, beam_size=2, ctc_weight=1.0,
                             blank=blank, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
    assert hyps[0][0] == said
