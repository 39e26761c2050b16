"""CTC forced alignment and the timestamps it gives (canary-1b-v2 style).

canary-1b-v2 does not predict timestamps with its AED decoder. NeMo 3.0.0 instead force-aligns the decoded
text against the log-probs of a small auxiliary CTC model (`timestamps_asr_model` inside the .nemo) with a
Viterbi pass, then reads segment / word / token times off the best path
(`get_forced_aligned_timestamps_with_external_model`). This module reproduces that pipeline exactly:

    text --build_utterance--> y = [blank, t1, blank, t2, ..., blank]   (plus the segment/word/token tree)
    log_probs, y --viterbi_align--> path: the state index (into y) of every frame
    path --utterance_times--> t_start/t_end of every segment, word and token (seconds, -1 = never visited)
    tree --timestamp_records--> segment / word / token records (NeMo's dicts: Timestamps.to_nemo)

The tokenizer is duck-typed: anything with `text_to_ids`, `text_to_tokens`, `ids_to_tokens`, `ids_to_text`
(NeMo's / our tokenizer classes), or a bare `sentencepiece.SentencePieceProcessor`. It must be the CTC model's
own tokenizer (a plain SentencePiece model whose vocab size is the blank id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from serinus.timestamps import Timestamps, TimedSegment, TimedToken, TimedWord

PAD_LOGPROB = -3.4e38  # NeMo's padding value (about the float32 minimum); two of them add up to -inf
SEGMENT_SEPARATORS = (".", "?", "!", "...")  # a single char is tested, so "..." acts like "."
PUNCTUATION = frozenset({",", ".", "!", "?"})  # pieces pinned to the end of the previous token
TIMESTAMP_TYPES = ("segment", "word", "char", "all")


# ---------------------------------------------------------------------------------------------------------------
# Viterbi
# ---------------------------------------------------------------------------------------------------------------


def viterbi_align(
    log_probs: torch.Tensor,
    T_lens: Sequence[int] | torch.Tensor,
    y: torch.Tensor | Sequence[Sequence[int]],
    U_lens: Sequence[int] | torch.Tensor,
    time_block: int = 256,
) -> list[list[int]]:
    """Best CTC path of every utterance: a list (one per batch item) of T_lens[b] state indices into y[b].

    log_probs: [B, T, V] log-probs (only frames t < T_lens[b] are read)
    y:         [B, U] blank-interleaved target ids (only u < U_lens[b] are read)

    Same recursion, float32 arithmetic and tie-breaking as NeMo's `viterbi_decoding`: a state may stay,
    come from u-1, or from u-2 unless y[u] == y[u-2] (no skipping a token between two blanks, and no
    skipping the blank between repeated tokens); the first maximum of [stay, u-1, u-2] wins. Like NeMo the
    loop runs to the batch's T_max: past its own length an utterance gets emission 0 in its final blank and
    -3.4e38 elsewhere, so a shorter utterance ends on its final blank when it ties with its last token,
    while a full-length one prefers the last token.

    The loop is over time only (6 small float ops per frame); the backpointers are derived afterwards from
    the stored candidate scores, vectorised over blocks of `time_block` frames.
    """
    log_probs = torch.as_tensor(log_probs)
    device = log_probs.device
    B, T_max, _ = log_probs.shape
    T_lens = torch.as_tensor(T_lens, dtype=torch.long).cpu()
    U_lens = torch.as_tensor(U_lens, dtype=torch.long).cpu()
    y = torch.as_tensor(y, dtype=torch.long).cpu()
    U = y.shape[1]
    if len(T_lens) != B or len(U_lens) != B or y.shape[0] != B:
        raise ValueError(f"batch mismatch: log_probs {B}, T_lens {len(T_lens)}, y {y.shape[0]}, U_lens {len(U_lens)}")
    if B and (int(T_lens.max()) > T_max or int(U_lens.max()) > U or int(U_lens.min()) < 1):
        raise ValueError("need T_lens <= log_probs.shape[1] and 1 <= U_lens <= y.shape[1]")
    if T_max == 0:
        return [[] for _ in range(B)]
    time_block = max(1, min(time_block, T_max))

    u_idx = torch.arange(U)
    in_target = u_idx[None, :] < U_lens[:, None]  # [B, U]
    index = torch.where(in_target, y, 0).to(device)[:, None, :]
    # letter-repetition rule: y[u] == y[u-2] forbids the u-2 jump (the padded tail is never on a path)
    skip_banned = torch.zeros(B, U, dtype=torch.bool)
    skip_banned[:, 2:] = y[:, 2:] == y[:, :-2]
    # past T_b NeMo zeroes the emissions of states U_b-1 and U_b (the latter is padding)
    final_states = ((u_idx[None, :] == U_lens[:, None] - 1) | (u_idx[None, :] == U_lens[:, None])).to(device)
    in_target, t_lens = in_target.to(device), T_lens.to(device)
    neg = torch.tensor(PAD_LOGPROB, dtype=torch.float32, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)

    padded_targets = bool((U_lens < U).any())
    shortest = int(T_lens.min())

    def emissions(t0: int, t1: int) -> torch.Tensor:
        """[t1-t0, B, U] float32 emission log-probs, with NeMo's padding and end-of-utterance masking."""
        lp = log_probs[:, t0:t1].to(torch.float32)
        e = torch.gather(lp, 2, index.expand(B, t1 - t0, U))
        if padded_targets:  # NeMo's pad id reads a -3.4e38 column
            e = torch.where(in_target[:, None, :], e, neg)
        if t1 > shortest:  # some utterance has ended within this block
            past_end = torch.arange(t0, t1, device=device)[None, :] >= t_lens[:, None]  # [B, t]
            e = torch.where(past_end[:, :, None], torch.where(final_states[:, None, :], zero, neg), e)
        return e.transpose(0, 1).contiguous()

    # The u-2 candidate of a banned state is exactly -3.4e38 (NeMo's masked_fill): clamp it to
    # [lo, hi] = [-3.4e38, -3.4e38] there and to [-inf, inf] (a no-op) elsewhere. Float-only ops are several
    # times faster than boolean masking on tensors this small.
    banned = skip_banned.to(device)
    lo = torch.where(banned, neg, torch.tensor(-float("inf"), device=device))
    hi = torch.where(banned, neg, torch.tensor(float("inf"), device=device))

    # hist[k] = scores after frame t0+k-1, with two leading padding states so u-2, u-1 and u are slices
    hist = torch.full((time_block + 1, B, U + 2), PAD_LOGPROB, dtype=torch.float32, device=device)
    h_two = [h[:, :-2] for h in hist]
    h_one = [h[:, 1:-1] for h in hist]
    h_stay = [h[:, 2:] for h in hist]
    # cand[k] = the three candidate scores of frame t0+k (emission included), kept for the backpointers
    cand = torch.empty((time_block, 3, B, U), dtype=torch.float32, device=device)
    c_stay, c_one, c_two = ([c[r] for c in cand] for r in range(3))
    best = torch.empty((B, U), dtype=torch.float32, device=device)
    backpointers = torch.zeros((T_max, B, U), dtype=torch.int8, device=device)
    with torch.inference_mode():
        for t0 in range(0, T_max, time_block):
            t1 = min(T_max, t0 + time_block)
            e_block = emissions(t0, t1)
            e_t = e_block.unbind(0)
            first = 0
            if t0 == 0:  # frame 0: only the leading blank and the first token can start a path
                hist[1, :, 2:4] = e_block[0, :, :2]
                first = 1
            for k in range(first, t1 - t0):
                # add the emission *before* taking the max, as NeMo: the rounding must be the same
                e = e_t[k]
                torch.add(h_stay[k], e, out=c_stay[k])
                torch.add(h_one[k], e, out=c_one[k])
                torch.clamp(h_two[k], lo, hi, out=c_two[k])
                c_two[k].add_(e)
                torch.maximum(c_stay[k], c_one[k], out=best)
                torch.maximum(best, c_two[k], out=h_stay[k + 1])
            # backpointers of the block, as codes: +1 if u-1 beats stay, +2 if u-2 beats both (strictly,
            # so the first maximum of [stay, u-1, u-2] wins as in NeMo); codes 2 and 3 both mean "from u-2"
            n = t1 - t0
            stay, one, two = cand[first:n].unbind(1)
            from_one = torch.gt(one, stay)
            from_two = torch.gt(two, torch.maximum(stay, one))
            torch.add(from_one.view(torch.int8), from_two.view(torch.int8), alpha=2,
                      out=backpointers[t0 + first : t1])
            hist[0] = hist[n]

    final = hist[0, :, 2:].cpu()  # scores after the last frame
    backpointers = backpointers.cpu().numpy()
    paths = []
    for b in range(B):
        U_b, T_b = int(U_lens[b]), int(T_lens[b])
        if U_b == 1:  # empty text (or too many tokens): the blank-only target
            u = 0
        else:  # last token or final blank; the first (the token) wins a tie
            u = U_b - 2 + int(torch.argmax(final[b, U_b - 2 : U_b]))
        path = np.empty(T_max, dtype=np.int64)
        path[T_max - 1] = u
        for t in range(T_max - 1, 0, -1):
            code = backpointers[t, b, u]
            u -= 2 if code >= 2 else int(code)
            path[t - 1] = u
        paths.append(path[:T_b].tolist())
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Text -> target ids and the segment / word / token tree
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Token:
    text: str  # the SentencePiece piece, e.g. "▁The"
    token_id: int
    s: int  # state index of this token in y
    t_start: float = -1
    t_end: float = -1


@dataclass
class Word:
    text: str
    s_start: int
    s_end: int
    tokens: list[Token] = field(default_factory=list)  # non-blank tokens only
    t_start: float = -1
    t_end: float = -1


@dataclass
class Segment:
    text: str
    s_start: int
    s_end: int
    words: list[Word] = field(default_factory=list)
    t_start: float = -1
    t_end: float = -1


@dataclass
class Utterance:
    text: str
    y: list[int]  # [blank, t1, blank, t2, ..., blank]; just [blank] for empty text or too many tokens
    segments: list[Segment] = field(default_factory=list)


class _Tok:
    """Adapter over NeMo-style tokenizers and bare SentencePieceProcessors."""

    def __init__(self, tok):
        self.tok = tok
        self.sp = not hasattr(tok, "text_to_ids") and hasattr(tok, "encode_as_ids")
        unk = getattr(tok, "unk_id", 0)
        self.unk_id = int(unk() if callable(unk) else unk)

    def text_to_ids(self, text: str) -> list[int]:
        return list(self.tok.encode_as_ids(text) if self.sp else self.tok.text_to_ids(text))

    def text_to_tokens(self, text: str) -> list[str]:
        return list(self.tok.encode_as_pieces(text) if self.sp else self.tok.text_to_tokens(text))

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_piece(i) for i in ids] if self.sp else list(self.tok.ids_to_tokens(ids))

    def ids_to_text(self, ids: list[int]) -> str:
        return self.tok.decode_ids(ids) if self.sp else self.tok.ids_to_text(ids)


def split_segments(text: str, separators: Sequence[str] | None = SEGMENT_SEPARATORS) -> list[str]:
    """NeMo's segment split: after a separator char that is followed by a space ("a.m. x" splits, "a.m.x" not)."""
    if not separators:
        pieces = [text.strip()]
    else:
        pieces, last = [], -1
        for i, ch in enumerate(text):
            if ch in separators and text[i + 1 : i + 2] == " ":
                pieces.append(text[last + 1 : i + 1].strip())
                last = i + 1  # the space
        if last < len(text):
            pieces.append(text[last + 1 :].strip())
    return [p for p in pieces if p]


def build_utterance(
    text: str,
    tokenizer,
    T: int,
    blank_id: int,
    segment_separators: Sequence[str] | None = SEGMENT_SEPARATORS,
    word_separator: str | None = " ",
) -> Utterance:
    """NeMo's `get_utt_obj` for subword tokenizers (the text is used as given; normalise it first).

    Each word is tokenised on its own. If the whole text has more tokens than T frames, the utterance is
    just [blank] and gets no timestamps.
    """
    tok = tokenizer if isinstance(tokenizer, _Tok) else _Tok(tokenizer)
    utt = Utterance(text=text, y=[blank_id])
    if len(text) == 0 or len(tok.text_to_ids(text)) > T:
        return utt

    unk_id = tok.unk_id
    unk_word = tok.ids_to_text([unk_id]).strip()
    unk_token = tok.ids_to_tokens([unk_id])[0]
    seg_s = word_s = 1  # state 0 is the leading blank
    for seg_text in split_segments(text, segment_separators):
        # the segment's extent comes from tokenising the whole segment (NeMo does this separately from the
        # per-word tokenisation below; with SentencePiece both normally agree)
        n_seg_tokens = 0
        subs = seg_text.split(unk_word) if unk_word else [seg_text]
        for i, sub in enumerate(subs):
            n_seg_tokens += len(tok.text_to_tokens(sub.strip())) + (i < len(subs) - 1)
        seg = Segment(text=seg_text, s_start=seg_s, s_end=seg_s + 2 * n_seg_tokens - 2)
        seg_s = seg.s_end + 2
        utt.segments.append(seg)

        words = seg_text.split(word_separator) if word_separator not in (None, "") else [seg_text]
        for word_text in words:
            if word_text == unk_word:
                pieces, ids = [unk_token], [unk_id]
            elif unk_word and unk_word in word_text:  # tokenise around a literal unk word, keep it as unk
                pieces, ids = [], []
                for sub in word_text.split(unk_word):
                    pieces += tok.text_to_tokens(sub) + [unk_token]
                    ids += tok.text_to_ids(sub) + [unk_id]
                pieces, ids = pieces[:-1], ids[:-1]
            else:
                pieces, ids = tok.text_to_tokens(word_text), tok.text_to_ids(word_text)
            word = Word(text=word_text, s_start=word_s, s_end=word_s + 2 * len(pieces) - 2)
            word_s = word.s_end + 2
            for piece, token_id in zip(pieces, ids):
                utt.y += [token_id, blank_id]
                word.tokens.append(Token(text=piece, token_id=token_id, s=len(utt.y) - 2))
            seg.words.append(word)
    return utt


# ---------------------------------------------------------------------------------------------------------------
# Path -> times -> NeMo's timestamp dicts
# ---------------------------------------------------------------------------------------------------------------


def utterance_times(utt: Utterance, path: Sequence[int], frame_seconds: float) -> Utterance:
    """Fill t_start/t_end in place (NeMo's `add_t_start_end_to_utt_obj`).

    t_start = (first frame of s_start) * frame_seconds, t_end = (last frame of s_end + 1) * frame_seconds,
    -1 for a state the path never visits.
    """
    first, last = {}, {}
    prev = -1
    for t, s in enumerate(path):
        if s > prev:
            first[s] = t
            if prev >= 0:
                last[prev] = t - 1
        prev = s
    last[prev] = len(path) - 1

    def start(s):
        return first[s] * frame_seconds if s in first else -1

    def end(s):
        return (last[s] + 1) * frame_seconds if s in last else -1

    for seg in utt.segments:
        seg.t_start, seg.t_end = start(seg.s_start), end(seg.s_end)
        for word in seg.words:
            word.t_start, word.t_end = start(word.s_start), end(word.s_end)
            for token in word.tokens:
                token.t_start, token.t_end = start(token.s), end(token.s)
    return utt


def _normalise_types(timestamp_type) -> list[str]:
    if isinstance(timestamp_type, str):
        if timestamp_type not in TIMESTAMP_TYPES:
            raise ValueError(f"timestamp_type must be one of {TIMESTAMP_TYPES}, got {timestamp_type!r}")
        return ["segment", "word", "char"] if timestamp_type == "all" else [timestamp_type]
    types = list(timestamp_type)
    if not all(t in TIMESTAMP_TYPES for t in types):
        raise ValueError(f"timestamp_type entries must be in {TIMESTAMP_TYPES}, got {types!r}")
    return types


def timestamp_records(
    utt: Utterance,
    tokenizer,
    frame_seconds: float,
    timestamp_type="all",
    punctuation=PUNCTUATION,
) -> Timestamps:
    """NeMo's `process_timestamps`: the records of one aligned utterance (mutates the punctuation tokens' times).

    start/end = round(t, 2) and offsets = int(t / frame_seconds) (truncating, so e.g. 29 frames -> 28). A
    punctuation piece gets start = end = the (rounded) end of the previous token of its word; when it ends
    the word (the segment) it also pulls the word's (segment's) end back to that time.
    """
    tok = tokenizer if isinstance(tokenizer, _Tok) else _Tok(tokenizer)
    types = _normalise_types(timestamp_type)
    out = Timestamps(*([] if kind in types else None for kind in ("word", "segment", "char")))

    def offset(t):
        return int(t / frame_seconds) if t != -1 else -1

    def times(node):  # a segment's or word's; -1 (never visited) stays -1
        return offset(node.t_start), offset(node.t_end), round(node.t_start, 2), round(node.t_end, 2)

    for seg in utt.segments:
        if out.segments is not None:
            out.segments.append(TimedSegment(seg.text, *times(seg)))
        for word in seg.words:
            if out.words is not None:
                out.words.append(TimedWord(word.text, *times(word)))
            for i, token in enumerate(word.tokens):
                if token.text in punctuation:
                    pinned = round(word.tokens[i - 1].t_end, 2) if i > 0 else round(token.t_start, 2)
                    if out.segments is not None and seg.t_end == word.t_end:
                        out.segments[-1].end, out.segments[-1].end_offset = pinned, offset(pinned)
                    if out.words is not None and word.t_end == token.t_end:
                        out.words[-1].end, out.words[-1].end_offset = pinned, offset(pinned)
                    token.t_start = token.t_end = pinned
                if out.tokens is not None:
                    out.tokens.append(TimedToken(tok.ids_to_text([token.token_id]), token.token_id, token.text,
                                                 offset(token.t_start), offset(token.t_end),
                                                 round(token.t_start, 2), round(token.t_end, 2)))
    return out


def _separators(timestamp_type):
    """NeMo drops segment splitting for 'char'/'word' and word splitting for 'char' (exact strings only)."""
    if isinstance(timestamp_type, str) and timestamp_type == "char":
        return None, None
    if isinstance(timestamp_type, str) and timestamp_type == "word":
        return None, " "
    return SEGMENT_SEPARATORS, " "


@dataclass
class Alignment:
    utterance: Utterance
    path: list[int]  # state index per frame
    timestamps: Timestamps
    types: list[str]  # the kinds asked for, in the order asked

    @property
    def timestamp(self) -> dict[str, list[dict]]:
        """NeMo's dict, keyed by the requested types in their order."""
        return self.timestamps.to_nemo(self.types)


def forced_align_batch(
    texts: Sequence[str],
    log_probs: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    tokenizer,
    blank_id: int,
    frame_seconds: float,
    timestamp_type="all",
) -> list[Alignment]:
    """Align B texts against a padded CTC batch at once (NeMo aligns each AED batch like this).

    log_probs: [B, T_max, V] CTC log-probs (log_softmax output, V = vocab + 1 with blank = vocab size)
    lengths:   [B] valid frames per item (the CTC encoder lengths)
    frame_seconds: preprocessor window_stride * encoder subsampling_factor (0.01 * 8 = 0.08 s)
    """
    tok = _Tok(tokenizer)
    lengths = [int(n) for n in torch.as_tensor(lengths).tolist()]
    if len(texts) != len(lengths) or len(texts) != log_probs.shape[0]:
        raise ValueError(f"{len(texts)} texts for a batch of {log_probs.shape[0]} and {len(lengths)} lengths")
    seg_sep, word_sep = _separators(timestamp_type)
    utts = [
        build_utterance(" ".join(text.split()), tok, T, blank_id, seg_sep, word_sep)
        for text, T in zip(texts, lengths)
    ]
    U_lens = [len(u.y) for u in utts]
    pad_id = log_probs.shape[-1]  # like NeMo's V; never read, padded states are masked anyway
    y = torch.full((len(utts), max(U_lens)), pad_id, dtype=torch.long)
    for b, u in enumerate(utts):
        y[b, : len(u.y)] = torch.tensor(u.y)
    paths = viterbi_align(log_probs, lengths, y, U_lens)
    out = []
    for utt, path in zip(utts, paths):
        utterance_times(utt, path, frame_seconds)
        out.append(Alignment(utt, path, timestamp_records(utt, tok, frame_seconds, timestamp_type),
                             _normalise_types(timestamp_type)))
    return out


def forced_align_timestamps(
    text: str,
    log_probs: torch.Tensor,
    tokenizer,
    blank_id: int,
    frame_seconds: float = 0.08,
    timestamp_type="all",
) -> dict[str, list[dict]]:
    """Timestamps of one utterance: `text` force-aligned against its CTC log-probs [T, V].

    Returns NeMo's dict keyed by the requested types: 'segment'/'word' items
    {segment|word, start_offset, end_offset, start, end} and 'char' items
    {char, token_id, token, start_offset, end_offset, start, end}.
    """
    log_probs = torch.as_tensor(log_probs)
    (result,) = forced_align_batch(
        [text], log_probs[None], [log_probs.shape[0]], tokenizer, blank_id, frame_seconds, timestamp_type
    )
    return result.timestamp


# ---------------------------------------------------------------------------------------------------------------
# With the packed CTC model
# ---------------------------------------------------------------------------------------------------------------


def ctc_log_probs(aligner, samples: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The aligner's log-probs [B, T, V+1] and lengths [B] for a list of 16 kHz clips.

    As NeMo's CTC `transcribe` on a list of arrays: each clip is padded to >= 1 s (zeros on both sides)
    and the batch is zero-padded to its longest clip.
    """
    from serinus.audio import collate_audio, pad_min_duration

    audio, lengths = collate_audio([pad_min_duration(np.asarray(s, dtype=np.float32)) for s in samples],
                                   next(aligner.parameters()).device)
    with torch.inference_mode():
        log_probs, T = aligner(audio, lengths)
    return log_probs, T


def align_texts(model, samples: Sequence[np.ndarray], texts: Sequence[str], timestamp_type="all") -> list[Timestamps]:
    """The timestamps of each text, aligned to its clip with `model.aligner`.

    NeMo's `get_forced_aligned_timestamps_with_external_model` for one AED batch: all clips go through the
    CTC model together, then one batched Viterbi. transcribe() uses ['word', 'segment'] for whole files and
    'char' for the chunks of a long file (before merging them).
    """
    aligner = model.aligner
    tokenizer = getattr(model, "aligner_tokenizer", None) or model.tokenizer
    log_probs, T = ctc_log_probs(aligner, samples)
    results = forced_align_batch(texts, log_probs, T, tokenizer, aligner.blank_id, aligner.frame_seconds, timestamp_type)
    return [result.timestamps for result in results]


# -- standalone forced alignment: `serinus align AUDIO TEXT --model M` --------------------------

def unknown_characters(text: str, tokenizer) -> list[str]:
    """Characters of `text` that the CTC vocabulary cannot spell (they align as <unk>)."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None:
        return []
    missing = []
    for char in sorted(set(text) - {" "}):
        if unk in tokenizer.text_to_ids(char):
            missing.append(char)
    return missing


def align_audio(model, samples: np.ndarray, text: str) -> dict:
    """Word and segment times of a given transcript in a 16 kHz clip, with the model's CTC aligner, or
    with `model` itself where it is a CTC model (e.g. one trained with `serinus train`, model.type ctc).

    Characters the aligner's vocabulary lacks are aligned as <unk> (as NeMo does) and listed
    under "unknown_characters"; "aligned" is False when the text has more tokens than the
    audio has frames (no times can be given then)."""
    from serinus.model.ctc import CTCModel

    if isinstance(model, CTCModel):
        aligner, tokenizer = model, model.tokenizer
    elif model.aligner is None:
        raise ValueError("this checkpoint packs no CTC aligner (only canary-1b-v2-style checkpoints do); "
                         "for flash models use `serinus transcribe --timestamps`")
    else:
        aligner, tokenizer = model.aligner, model.aligner_tokenizer or model.tokenizer
    text = " ".join(text.split())
    log_probs, lengths = ctc_log_probs(aligner, [samples])
    result = forced_align_batch([text], log_probs, lengths, tokenizer, aligner.blank_id,
                                aligner.frame_seconds, ["word", "segment"])[0]
    words = result.timestamp.get("word", [])
    return {
        "text": text,
        "word": words,
        "segment": result.timestamp.get("segment", []),
        "aligned": bool(words) or not text,
        "unknown_characters": unknown_characters(text, tokenizer),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="serinus align",
        description="Forced alignment: word and segment times of a known transcript, from the CTC model "
        "packed in a canary-1b-v2-style checkpoint, or from a CTC model itself.",
    )
    parser.add_argument("audio", help="audio file (wav, flac, ogg; mp3/m4a/opus need ffmpeg)")
    parser.add_argument("text", help="the transcript, or a path to a UTF-8 text file holding it")
    parser.add_argument("--model", default="nvidia/canary-1b-v2",
                        help="checkpoint: .nemo, Serinus folder or Hub id; a Canary model with a packed aligner, "
                             "or a CTC model (NeMo EncDecCTCModelBPE, or `serinus train` with model.type ctc)")
    parser.add_argument("--format", choices=["json", "srt", "vtt"], default="json")
    parser.add_argument("--output", help="write here instead of stdout")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from serinus.audio import AudioError, load_audio
    from serinus.checkpoint import CheckpointError, load_any
    from serinus.decoding import Hypothesis
    from serinus.output import subtitles

    text = Path(args.text).read_text(encoding="utf-8") if Path(args.text).is_file() else args.text
    try:
        model = load_any(args.model, device=args.device, for_training=False)
        samples = load_audio(args.audio)
        result = align_audio(model, samples, text)
    except (AudioError, CheckpointError, ValueError) as e:
        print(f"serinus align: {e}", file=sys.stderr)
        return 2
    if result["unknown_characters"]:
        print(f"serinus align: characters not in the aligner's vocabulary (aligned as <unk>): "
              f"{' '.join(result['unknown_characters'])}", file=sys.stderr)
    if not result["aligned"]:
        print("serinus align: the transcript has more tokens than the audio has frames; no times", file=sys.stderr)
    if args.format == "json":
        out = json.dumps({"audio": args.audio, **result}, ensure_ascii=False, indent=2) + "\n"
    else:
        out = subtitles(Hypothesis(text=result["text"], timestamp=result), args.format)
    if args.output:
        Path(args.output).write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
    return 0 if result["aligned"] else 1
