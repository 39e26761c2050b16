"""Joint CTC/attention rescoring: its pieces against plain torch, and its effect in transcribe()."""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from conftest import AUDIO, FIXTURES
from serinus import CanaryModel
from serinus.joint_decoding import attention_scores, ctc_greedy, ctc_scores, rescore


def test_ctc_greedy_merges_repeats_and_drops_blanks_and_specials():
    blank = 5
    path = torch.tensor([[1, 1, 5, 1, 2, 2, 5, 5, 3, 4, 0]])
    lp = F.one_hot(path, 6).float().log_softmax(-1)
    assert ctc_greedy(lp, torch.tensor([11]), blank) == [[1, 1, 2, 3, 4, 0]]
    assert ctc_greedy(lp, torch.tensor([11]), blank, excluded={0}, vocab_size=4) == [[1, 1, 2, 3]]
    assert ctc_greedy(lp, torch.tensor([4]), blank) == [[1, 1]]  # only the valid frames


def test_ctc_scores_are_torch_ctc_log_likelihoods():
    torch.manual_seed(0)
    lp = torch.randn(12, 7).log_softmax(-1)
    cands = [[1, 2, 3], [4], [2, 2, 2, 2, 2, 2, 2]]  # the last cannot fit 12 frames with blanks between repeats
    got = ctc_scores(lp, 12, cands, blank=6)
    for c, g in zip(cands[:2], got[:2]):
        want = -F.ctc_loss(lp[:, None], torch.tensor([c]), torch.tensor([12]), torch.tensor([len(c)]), blank=6,
                           reduction="sum")
        torch.testing.assert_close(g, want)
    assert got[2] == float("-inf")


def _model_with_ctc_head():
    model = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    cfg = dataclasses.replace(model.cfg, ctc_weight=0.3)
    out = CanaryModel(cfg, model.tokenizer)
    missing = out.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("ctc_head") for k in missing)
    return out.eval()


def test_attention_scores_equal_teacher_forcing():
    import soundfile as sf

    model = _model_with_ctc_head()
    audio, _ = sf.read(AUDIO / "en_01.wav", dtype="float32")
    x, n = torch.from_numpy(audio)[None], torch.tensor([len(audio)])
    states, mask, _ = model.encode(x, n)
    tok = model.tokenizer
    prompt = model.transcribe([audio], return_nbest=False)  # warm path, and a real hypothesis
    ids = prompt[0].y_sequence
    from serinus.prompt import encode_prompt

    p = encode_prompt(tok, model.cfg.prompt_format, {"source_lang": "en", "target_lang": "en", "pnc": "yes"})
    got = attention_scores(model.decoder, states, mask, p, [ids, ids[:3]], tok.eos_id, tok.pad_id)
    for k, cand in enumerate([ids, ids[:3]]):
        seq = torch.tensor([p + cand + [tok.eos_id]])
        lp = model(x, n, seq[:, :-1], torch.tensor([seq.shape[1] - 1]))[0]
        want = lp[torch.arange(len(p) - 1, seq.shape[1] - 1), seq[0, len(p):]].sum()
        torch.testing.assert_close(got[k], want, atol=1e-4, rtol=1e-5)


def test_rescore_follows_the_weight():
    torch.manual_seed(0)
    model = _model_with_ctc_head()
    audio = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
    states, mask, lens, ctc_lp = model.encode_with_ctc(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    tok = model.tokenizer
    specials = frozenset(tok.special_tokens.values())
    greedy = ctc_greedy(ctc_lp, lens, model.ctc_blank_id, specials, tok.vocab_size)[0]
    decoder_best = [tok.text_to_ids("hello", "en")]
    prompt = [[tok.token_to_id("<|startofcontext|>")]]
    only_att = rescore(model.decoder, states, mask, ctc_lp, lens, prompt, [decoder_best], 0.0, model.ctc_blank_id,
                       tok.eos_id, tok.pad_id, specials, tok.vocab_size)
    only_ctc = rescore(model.decoder, states, mask, ctc_lp, lens, prompt, [decoder_best], 1.0, model.ctc_blank_id,
                       tok.eos_id, tok.pad_id, specials, tok.vocab_size)
    # CTC alone: its own best path beats any other candidate (a greedy path is not always the most
    # likely label sequence, but it is never beaten here by an unrelated word)
    assert only_ctc[0][0] == greedy
    assert only_att[0][0] in (decoder_best[0], greedy)


def test_transcribe_with_joint_decoding_runs_and_weight_zero_changes_nothing():
    model = _model_with_ctc_head()
    files = [str(AUDIO / "en_01.wav"), str(AUDIO / "de_01.wav")]
    plain = [h.text for h in model.transcribe(files)]
    base = CanaryModel.from_pretrained(FIXTURES / "tiny_canary2.nemo")
    assert plain == [h.text for h in base.transcribe(files)]  # ctc_weight of the decoding config is 0
    model.cfg.decoding.ctc_weight = 0.5
    joint = model.transcribe(files)
    assert all(h.error is None for h in joint)
