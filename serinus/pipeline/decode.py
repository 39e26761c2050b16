"""Decode: one batch of rows through the encoder and decoder, then each row's timestamps.

All rows of a batch are encoded together (`batch_size` rows at a time) and decoded together,
each with its own prompt. Timestamps come from frame tokens in the text (flash models), or from
the packed CTC aligner (canary-1b-v2 style): the rows of a chunked piece aligned token by token
together, the whole pieces of the batch word by word together, as NeMo aligns its batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from serinus.audio import collate_audio
from serinus.decoding import DecodingConfig, beam_search, greedy_decode, max_new_tokens, speculative_greedy_decode
from serinus.joint_decoding import joint_beam_search
from serinus.pipeline.plan import Piece, Row
from serinus.timestamps import Timestamps, frame_token_timestamps


@dataclass
class Transcript:
    """A decoded text with its tokens and, when made, its timestamps: one row's, or a merged piece's."""

    text: str
    tokens: list[int]  # without prompt and EOS (NeMo's y_sequence)
    score: float = 0.0
    timestamps: Timestamps | None = None
    nbest: list["Transcript"] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class DecodedRow:
    row: Row
    transcript: Transcript
    encoded_len: int  # encoder frames of the row (the aligned-chunk merge shifts by them)


def decode_batch(model, loaded: list[tuple[Piece, list[Row]]], decoding: DecodingConfig, use_aligner: bool,
                 encode_rows: int) -> list[list[DecodedRow]]:
    """Decode the rows of a batch of pieces together; per piece, its decoded rows."""
    rows = [r for _, piece_rows in loaded for r in piece_rows]
    transcripts, encoded_lens = run_decoder(model, rows, decoding, encode_rows=encode_rows)
    decoded = [DecodedRow(r, t, n) for r, t, n in zip(rows, transcripts, encoded_lens)]
    out, at = [], 0
    for piece, piece_rows in loaded:
        out.append(decoded[at : at + len(piece_rows)])
        at += len(piece_rows)
    frame_seconds, window_stride = model.frame_seconds, model.cfg.features.window_stride
    for (piece, _), piece_decoded in zip(loaded, out):
        if piece.item.frame_tokens:
            for t in (t for d in piece_decoded for t in (d.transcript, *d.transcript.nbest)):
                t.text, t.timestamps = frame_token_timestamps(t.text, frame_seconds, window_stride)
        elif use_aligner and len(piece_decoded) > 1:  # NeMo aligns chunks by token ('char'), then merges
            _align(model, piece_decoded, "char")
    if use_aligner:
        _align(model, [d[0] for d in out if len(d) == 1], ["word", "segment"])
    return out


def _align(model, decoded: list[DecodedRow], timestamp_type) -> None:
    if not decoded:
        return
    from serinus.align import align_texts

    found = align_texts(model, [d.row.samples for d in decoded], [d.transcript.text for d in decoded], timestamp_type)
    for d, timestamps in zip(decoded, found):
        d.transcript.timestamps = timestamps


@torch.inference_mode()
def run_decoder(model, rows: list[Row], decoding: DecodingConfig,
                encode_rows: int | None = None) -> tuple[list[Transcript], list[int]]:
    """Encode one batch and decode every row with its own prompt: each row's transcript and its
    encoder length. Rows whose prompts differ in length are decoded in separate groups (positions
    must line up within a group).

    The encoder runs over `encode_rows` rows at a time (all at once when None), every slice
    padded to the batch's longest row, so a long file's many chunks do not need all their
    features in memory at once; the decoder then sees all rows as one batch."""
    n_rows = encode_rows or len(rows)
    longest = max(len(r.samples) for r in rows)
    # joint CTC/attention search for transcription rows; the CTC head spells the audio, so a translation
    # row is decoded by the decoder alone
    joint = (decoding.ctc_weight > 0 and getattr(model, "ctc_head", None) is not None
             and any(r.transcribes for r in rows))
    parts = []
    for start in range(0, len(rows), n_rows):
        audio, lengths = collate_audio([r.samples for r in rows[start : start + n_rows]], model.device, longest)
        parts.append(model.encode_with_ctc(audio, lengths) if joint else model.encode(audio, lengths) + (None,))
        del audio
    if len(parts) > 1:  # each slice's states are as long as its own longest row needs: pad to the longest
        frames = max(p[0].shape[1] for p in parts)
        states = torch.cat([F.pad(p[0], (0, 0, 0, frames - p[0].shape[1])) for p in parts])
        mask = torch.cat([F.pad(p[1], (0, frames - p[1].shape[1]), value=False) for p in parts])
        enc_lengths = torch.cat([p[2] for p in parts])
        ctc_log_probs = torch.cat([F.pad(p[3], (0, 0, 0, frames - p[3].shape[1])) for p in parts]) if joint else None
    else:
        states, mask, enc_lengths, ctc_log_probs = parts[0]
    del parts
    tok = model.tokenizer
    out: list[Transcript | None] = [None] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((len(row.prompt), joint and row.transcribes), []).append(i)
    for (prompt_len, joint_rows), group in groups.items():
        # NeMo's limit counts the encoder's output frames of each row's own (unpadded) audio
        limit_lengths = model.limit_lengths(torch.tensor([len(rows[i].samples) for i in group]))
        limits = max_new_tokens(limit_lengths, prompt_len, decoding, model.cfg.decoder.max_sequence_length)
        if joint_rows:  # the CTC head scores every step of the search, one row at a time
            for k, i in enumerate(group):
                beams = joint_beam_search(model.decoder, states[i : i + 1], mask[i : i + 1], rows[i].prompt,
                                          ctc_log_probs[i, : int(enc_lengths[i])], limits[k], decoding.beam_size,
                                          decoding.ctc_weight, model.ctc_blank_id, tok.eos_id, tok.vocab_size)
                best_ids, best_score = beams[0] if beams else ([], float("-inf"))
                nbest = [Transcript("", ids, score) for ids, score in beams] if decoding.return_nbest else []
                out[i] = Transcript("", _strip_pad(best_ids, tok.pad_id), best_score, nbest=nbest)
            continue
        index = torch.tensor(group, device=states.device)
        prompts = torch.tensor([rows[i].prompt for i in group], device=states.device)
        draft = model.speculative_draft() if decoding.beam_size == 1 and decoding.speculative else None
        if draft is not None:
            outputs = speculative_greedy_decode(model.decoder, draft, states[index], mask[index], prompts, limits,
                                                tok.eos_id, tok.vocab_size)
            for i, ids in zip(group, outputs):
                out[i] = Transcript("", _strip_pad(ids, tok.pad_id))
        elif decoding.beam_size == 1:
            outputs = greedy_decode(model.decoder, states[index], mask[index], prompts, limits, tok.eos_id,
                                    tok.vocab_size)
            for i, ids in zip(group, outputs):
                out[i] = Transcript("", _strip_pad(ids, tok.pad_id))
        else:
            outputs = beam_search(model.decoder, states[index], mask[index], prompts, limits, tok.eos_id,
                                  tok.pad_id, decoding.beam_size, decoding.length_penalty, tok.vocab_size)
            for i, beams in zip(group, outputs):
                best_ids, best_score = beams[0]
                nbest = [Transcript("", ids, score) for ids, score in beams] if decoding.return_nbest else []
                out[i] = Transcript("", best_ids, best_score, nbest=nbest)
    for t in out:
        for one in (t, *t.nbest):
            one.text = tok.ids_to_text(one.tokens)
    return out, [int(n) for n in enc_lengths.tolist()]


def _strip_pad(ids: list[int], pad_id: int) -> list[int]:
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids
