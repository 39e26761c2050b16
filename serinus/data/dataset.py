"""Training batches: lhotse cuts -> padded audio + prompted transcripts, as NeMo's lhotse dataloader.

`PromptedDataset` is a lhotse-style map dataset: its `__getitem__` takes a whole CutSet (one
mini-batch chosen by a sampler, see `serinus.data.bucketing`) and returns a `PromptedBatch`:

    audio [B,N] float32 (zero-padded), audio_lens [B] int32
    prompt [B,P] (decoder prompt / NeMo's context_ids), prompt_lens
    transcript [B,T] (answer ids without EOS), transcript_lens
    prompted_transcript [B,L] (prompt + answer + EOS), prompted_transcript_lens
    loss_mask [B,L-1]: True where a label is part of answer+EOS (`use_loss_mask_for_prompt`)

Token tensors are padded with the tokenizer's pad id. Use it with
`DataLoader(dataset, sampler=sampler, batch_size=None)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from serinus.prompt import PromptedExample, PromptFormat, encode_training_example, get_format, select_slots


class DataError(ValueError):
    """A cut that cannot become a training example; the message names its manifest line or cut id."""


@dataclass
class PromptedBatch:
    audio: torch.Tensor
    audio_lens: torch.Tensor
    prompt: torch.Tensor
    prompt_lens: torch.Tensor
    transcript: torch.Tensor
    transcript_lens: torch.Tensor
    prompted_transcript: torch.Tensor
    prompted_transcript_lens: torch.Tensor
    loss_mask: torch.Tensor
    cuts: list  # the lhotse cuts, in batch order
    # what is said, for a CTC head [B, S]: the transcript on a transcription row, the manifest's
    # `source_text` on a translation row; length 0 where a translation row has none (no CTC loss there)
    spoken: torch.Tensor | None = None
    spoken_lens: torch.Tensor | None = None

    def decoder_inputs_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: decoder input is prompted_transcript minus its last token, labels minus the first."""
        return self.prompted_transcript[:, :-1], self.prompted_transcript[:, 1:]


def cut_origin(cut) -> str:
    """Where a cut came from, for error messages: its manifest "file:line", else its id."""
    custom = getattr(cut, "custom", None) or {}
    return custom["origin"] if "origin" in custom else f"cut {cut.id}"


def cut_slots(cut) -> dict:
    """Every custom field of the cut and its supervisions (supervision fields win), unfiltered.

    Our manifest conversion puts slots on the supervision; NeMo's lhotse reader puts them on the cut.
    """
    out = dict(getattr(cut, "custom", None) or {})
    for s in cut.supervisions:
        out.update(s.custom or {})
    return out


def _unk_ids(tokenizer) -> frozenset[int]:
    # Every sub-tokenizer of the aggregate has its own <unk>; the unified one has a single one.
    return frozenset(i for i, p in enumerate(tokenizer.vocab) if p == "<unk>")


def encode_cut(
    cut,
    tokenizer,
    prompt_format: str | PromptFormat = "canary2",
    slot_defaults: Mapping[str, object] | None = None,
    unk_ids: frozenset[int] | None = None,
    allow_unk: bool = False,
) -> PromptedExample:
    """Prompt + answer ids for one cut; raises `DataError` naming the cut's manifest line.

    Slots come from the cut's custom fields over `slot_defaults`; the text is the supervisions'
    texts joined by spaces, tokenised in the supervision's language (else the target language).
    A text that needs `<unk>` (a character the tokenizer has never seen) is an error unless
    `allow_unk` (NeMo trains on <unk> silently).
    """
    fmt = get_format(prompt_format)
    if not cut.supervisions:
        raise DataError(f"{cut_origin(cut)}: no supervision (transcript) in cut {cut.id}")
    texts = [s.text for s in cut.supervisions]
    if any(t is None for t in texts):
        raise DataError(f"{cut_origin(cut)}: a supervision of cut {cut.id} has no text")
    text = " ".join(texts)
    slots = {**(slot_defaults or {}), **select_slots(fmt, cut_slots(cut))}
    lang = cut.supervisions[0].language
    try:
        ex = encode_training_example(tokenizer, fmt, text, slots, lang)
    except (ValueError, KeyError) as e:
        raise DataError(f"{cut_origin(cut)}: {e}") from None
    unk = _unk_ids(tokenizer) if unk_ids is None else unk_ids
    bad = [] if allow_unk else [i for i, t in enumerate(ex.answer_ids) if t in unk]
    if bad:
        pieces = tokenizer.text_to_tokens(text, lang) if lang else []
        shown = sorted({pieces[i] for i in bad if i < len(pieces)}) if len(pieces) == len(ex.answer_ids) else []
        raise DataError(
            f"{cut_origin(cut)}: the tokenizer cannot encode part of the text {text!r} (<unk>"
            + (f" for {', '.join(map(repr, shown))}" if shown else "")
            + f", language {lang or slots.get('target_lang')!r})"
        )
    return ex


def collate_ids(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into [B, max_len] int64 with `pad_id`; returns (ids, lengths)."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lens.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lens


def loss_mask(prompted_lens: torch.Tensor, prompt_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len-1] mask over labels: positions prompt_len-1 .. len-2, i.e. the answer and its EOS.

    Same as NeMo's `lens_to_mask(len-1) & ~lens_to_mask(prompt_len-1)` under `use_loss_mask_for_prompt`.
    """
    t = torch.arange(max_len - 1)
    return (t[None, :] < (prompted_lens - 1)[:, None]) & (t[None, :] >= (prompt_lens - 1)[:, None])


def _audio_key(cut):
    """What identifies a cut's samples: its file and span (a transcript line and its translations,
    which are different cuts of the same audio, share one cached copy)."""
    rec = getattr(cut, "recording", None)
    source = rec.sources[0].source if rec is not None and rec.sources else cut.id
    effects = repr(rec.transforms) if rec is not None and rec.transforms else ""  # e.g. a speed perturbation
    return (str(source), round(float(cut.start), 4), round(float(cut.duration), 4), effects)


def load_audio(cuts, sample_rate: int = 16000, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded [B, N] float32 mono audio at `sample_rate` and int32 lengths (lhotse decodes,
    resampling where needed); a file that fails to load names its manifest line. With `cache`
    (a dict), each cut's decoded samples are kept there by file and span, and reused."""
    arrays = []
    for cut in cuts:
        key = _audio_key(cut) if cache is not None else None
        if key is not None and key in cache:
            arrays.append(cache[key])
            continue
        if cut.sampling_rate != sample_rate:
            cut = cut.resample(sample_rate)
        try:
            a = cut.load_audio()
        except Exception as e:
            raise DataError(f"{cut_origin(cut)}: cannot load audio: {e}") from None
        if a.ndim == 2 and a.shape[0] != 1:
            raise DataError(f"{cut_origin(cut)}: expected mono audio, got {a.shape[0]} channels")
        arrays.append(torch.from_numpy(a.reshape(-1)))
        if key is not None:
            cache[key] = arrays[-1]
    lens = torch.tensor([len(a) for a in arrays], dtype=torch.int32)
    audio = torch.zeros(len(arrays), int(lens.max()), dtype=torch.float32)
    for i, a in enumerate(arrays):
        audio[i, : len(a)] = a
    return audio, lens


class PromptedDataset(torch.utils.data.Dataset):
    """Cuts -> `PromptedBatch` for Canary training (NeMo's PromptedAudioToTextLhotseDataset)."""

    def __init__(
        self,
        tokenizer,
        prompt_format: str | PromptFormat = "canary2",
        slot_defaults: Mapping[str, object] | None = None,
        with_audio: bool = True,
        sample_rate: int = 16000,
        allow_unk: bool = False,
        audio_cache: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.audio_cache = audio_cache  # a dict: decoded audio is kept there (small corpora; saves decoding)
        self.prompt_format = get_format(prompt_format)
        self.slot_defaults = dict(slot_defaults or {})
        self.with_audio = with_audio  # False: token tensors only (audio left empty), e.g. for statistics
        self.sample_rate = sample_rate
        self.allow_unk = allow_unk
        self.pad_id = tokenizer.pad_id
        self._unk_ids = _unk_ids(tokenizer)

    def encode(self, cut) -> PromptedExample:
        return encode_cut(cut, self.tokenizer, self.prompt_format, self.slot_defaults, self._unk_ids, self.allow_unk)

    def __getitem__(self, cuts) -> PromptedBatch:
        cuts = list(cuts)
        if not cuts:
            raise DataError("empty batch of cuts")
        examples = [self.encode(c) for c in cuts]  # text errors first: cheaper than audio
        if self.with_audio:
            audio, audio_lens = load_audio(cuts, self.sample_rate, self.audio_cache)
        else:
            audio, audio_lens = torch.zeros(len(cuts), 0), torch.zeros(len(cuts), dtype=torch.int32)
        prompt, prompt_lens = collate_ids([e.context_ids for e in examples], self.pad_id)
        transcript, transcript_lens = collate_ids([e.answer_ids for e in examples], self.pad_id)
        prompted, prompted_lens = collate_ids([e.input_ids for e in examples], self.pad_id)
        spoken, spoken_lens = collate_ids([self.spoken_ids(c, e) for c, e in zip(cuts, examples)], self.pad_id)
        return PromptedBatch(
            audio=audio,
            audio_lens=audio_lens,
            prompt=prompt,
            prompt_lens=prompt_lens,
            transcript=transcript,
            transcript_lens=transcript_lens,
            prompted_transcript=prompted,
            prompted_transcript_lens=prompted_lens,
            loss_mask=loss_mask(prompted_lens, prompt_lens, prompted.shape[1]),
            cuts=cuts,
            spoken=spoken,
            spoken_lens=spoken_lens,
        )

    def spoken_ids(self, cut, example: PromptedExample) -> list[int]:
        """The ids of what is said in the cut: its answer on a transcription row; on a translation
        row the `source_text` field (NeMo-style AST manifests often carry it), in the source language."""
        slots = cut_slots(cut)
        source = slots.get("source_lang") or cut.supervisions[0].language
        if (slots.get("target_lang") or source) == source:
            return example.answer_ids
        text = slots.get("source_text")
        if not isinstance(text, str) or not text.strip() or not _knows_lang(self.tokenizer, source):
            return []  # nothing to spell (a model that only writes the target languages may lack the source's)
        return self.tokenizer.text_to_ids(text, source)


def _knows_lang(tokenizer, lang: str) -> bool:
    try:
        tokenizer.resolve_lang(lang)
    except ValueError:
        return False
    return True


@dataclass
class TranscriptBatch:
    """A CTC training batch: padded audio and the transcripts' ids in one SentencePiece vocabulary."""

    audio: torch.Tensor
    audio_lens: torch.Tensor
    transcript: torch.Tensor  # [B, S], padded with 0 (ignored past transcript_lens)
    transcript_lens: torch.Tensor
    cuts: list


def transcript_ids(cut, tokenizer, allow_unk: bool = False) -> list[int]:
    """Ids of a cut's text (supervisions joined by spaces) in a plain SentencePiece tokenizer."""
    texts = [s.text for s in cut.supervisions]
    if not texts or any(t is None for t in texts):
        raise DataError(f"{cut_origin(cut)}: no transcript in cut {cut.id}")
    text = " ".join(texts)
    ids = tokenizer.text_to_ids(text)
    if not allow_unk and tokenizer.unk_id in ids:
        raise DataError(f"{cut_origin(cut)}: the tokenizer cannot encode part of the text {text!r} (<unk>)")
    return ids


class TranscriptDataset(torch.utils.data.Dataset):
    """Cuts -> `TranscriptBatch` (NeMo's AudioToBPEDataset, for EncDecCTCModelBPE)."""

    def __init__(self, tokenizer, sample_rate: int = 16000, allow_unk: bool = False,
                 audio_cache: dict | None = None):
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        self.allow_unk = allow_unk
        self.audio_cache = audio_cache

    def __getitem__(self, cuts) -> TranscriptBatch:
        cuts = list(cuts)
        if not cuts:
            raise DataError("empty batch of cuts")
        seqs = [transcript_ids(c, self.tokenizer, self.allow_unk) for c in cuts]
        audio, audio_lens = load_audio(cuts, self.sample_rate, self.audio_cache)
        ids, lens = collate_ids(seqs, 0)
        return TranscriptBatch(audio, audio_lens, ids, lens, cuts)
