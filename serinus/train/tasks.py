"""What the training loop needs to know about a model type, behind one small interface.

    task = make_task(cfg)              # AEDTask (Canary) or CTCTask (FastConformer CTC)
    model = task.build_model(tokenizer, init_cfg)
    loss, parts = task.loss(model, batch, device, autocast_dtype)    # parts: {"attention": .., "ctc": ..}
    metrics = task.validate(model, cuts, dataset, device, autocast_dtype)

The loop, the OOMptimizer and the tests all go through these, so a loss is defined once.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

import torch

from serinus.decoding import DecodingConfig
from serinus.model.canary import CanaryConfig, CanaryModel, padded_vocab, preset_config, sequence_loss
from serinus.model.ctc import CTCConfig, CTCModel, ctc_loss
from serinus.model.decoder import DecoderConfig
from serinus.model.encoder import EncoderConfig
from serinus.model.specaugment import SpecAugmentConfig
from serinus.tokenizer import CanaryTokenizer
from serinus.train.config import MODEL_DATACLASSES, ConfigError
from serinus.audio import FeatureConfig


_FRAME_TOKEN = re.compile(r"<\|\d+\|>")


def normalize_text(text: str) -> str:
    """Lower-case, punctuation removed, spaces collapsed: the usual WER normalisation."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") and ch != "'" else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def _spec_augment(m: dict) -> SpecAugmentConfig | None:
    return SpecAugmentConfig(**m["spec_augment"]) if m["spec_augment"] else None


def _amp(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _wer_metrics(refs: dict, hyps: dict, unseen: dict) -> dict:
    """WER (normalised) overall, per language, and on lines whose text is not in the training data."""
    import jiwer

    out = {}
    all_r, all_h, un_r, un_h = [], [], [], []
    for lang in sorted(refs):
        r = [normalize_text(t) or "<empty>" for t in refs[lang]]
        h = [normalize_text(t) for t in hyps[lang]]
        out[f"wer_{lang}"] = float(jiwer.wer(r, h))
        all_r += r
        all_h += h
        un_r += [x for x, u in zip(r, unseen[lang]) if u]
        un_h += [x for x, u in zip(h, unseen[lang]) if u]
    if all_r:
        out["wer"] = float(jiwer.wer(all_r, all_h))
    if un_r:
        out["wer_unseen"] = float(jiwer.wer(un_r, un_h))
        out["unseen_lines"] = len(un_r)
    return out


def fits_decoder(cut, positions: int | None) -> bool:
    """Whether a cut's decoder input (prompt + transcript: its `num_tokens` less the EOS) fits in the decoder's
    `positions`; any cut does where there is no decoder (None: a CTC model)."""
    return positions is None or cut.custom["num_tokens"] - 1 <= positions


class AEDTask:
    """Canary: FastConformer encoder + Transformer decoder over prompt + answer, plus an optional
    CTC head on the encoder (joint CTC/attention training, `model.ctc_weight`)."""

    name = "aed"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.train_texts: set[str] = set()  # filled by the loop: validation reports WER on unseen lines
        self.step = 0  # set by the loop: the CTC weight schedule reads it

    def ctc_weight(self, final: float) -> float:
        """model.ctc_weight, or its schedule: linear from ctc_weight_start to ctc_weight over ctc_weight_steps."""
        m = self.cfg["model"]
        start, steps = m["ctc_weight_start"], int(m["ctc_weight_steps"] or 0)
        if start is None or steps <= 0 or self.step >= steps:
            return final
        return float(start) + (final - float(start)) * self.step / steps

    def model_config(self, tokenizer, init_cfg: CanaryConfig | None = None) -> CanaryConfig:
        m = self.cfg["model"]
        vocab = padded_vocab(tokenizer.vocab_size)
        if m["preset"] == "init_from":
            if init_cfg is None:
                raise ConfigError("model.preset=init_from needs init_from.path")
            base = dataclasses.replace(init_cfg, aligner=None)
        elif m["preset"]:
            base = preset_config(m["preset"], tokenizer.vocab_size)
        else:
            base = CanaryConfig(FeatureConfig(), EncoderConfig(), DecoderConfig(vocab_size=vocab),
                                decoding=DecodingConfig(beam_size=1, strategy="beam", max_generation_delta=50))
        if "vocab_size" in m["decoder"]:
            raise ConfigError("model.decoder.vocab_size comes from the tokenizer; do not set it")
        parts = {k: dataclasses.replace(getattr(base, k), **m[k]) for k in MODEL_DATACLASSES}
        parts["decoder"] = dataclasses.replace(parts["decoder"], vocab_size=vocab)
        return dataclasses.replace(
            base, **parts, prompt_format=m["prompt_format"],
            use_loss_mask_for_prompt=bool(m["use_loss_mask_for_prompt"]), label_smoothing=float(m["label_smoothing"]),
            ctc_weight=float(m["ctc_weight"]), spec_augment=_spec_augment(m),
        )

    def build_model(self, tokenizer, init_cfg=None) -> CanaryModel:
        return CanaryModel(self.model_config(tokenizer, init_cfg), tokenizer)

    def dataset(self, model, allow_unk: bool = False, audio_cache: dict | None = None):
        from serinus.data.dataset import PromptedDataset

        return PromptedDataset(model.tokenizer, model.cfg.prompt_format, allow_unk=allow_unk, audio_cache=audio_cache)

    def attach_num_tokens(self, cuts, model, allow_unk: bool = False):
        """Each cut's prompted-transcript length, for bucketing."""
        from lhotse import CutSet

        from serinus.data.bucketing import attach_num_tokens

        return CutSet.from_cuts(list(attach_num_tokens(cuts, model.tokenizer, model.cfg.prompt_format,
                                                       allow_unk=allow_unk)))

    def loss(self, model, batch, device, autocast_dtype=None) -> tuple[torch.Tensor, dict]:
        core = getattr(model, "module", model)  # DDP wraps the model
        mcfg = core.cfg
        inputs, labels = batch.decoder_inputs_outputs()
        lengths = (batch.prompted_transcript_lens - 1).to(device)
        with _amp(device, autocast_dtype):
            log_probs, ctc_log_probs, enc_lens = model(  # through forward(), so that DDP syncs it
                batch.audio.to(device), batch.audio_lens.to(device), inputs.to(device), lengths, with_ctc=True)
        prompt_lens = batch.prompt_lens.to(device) if mcfg.use_loss_mask_for_prompt else None
        attention = sequence_loss(log_probs.float(), labels.to(device), core.tokenizer.pad_id, prompt_lens, lengths,
                                  mcfg.label_smoothing)
        parts = {"attention": attention}
        if ctc_log_probs is None or mcfg.ctc_weight <= 0:
            return attention, parts
        # CTC spells what is said: the transcript, or on a translation row its source text where the
        # manifest has one (a translation itself is not monotonic in the audio)
        spoken, spoken_lens = batch.spoken.to(device), batch.spoken_lens.to(device)
        rows = spoken_lens > 0
        if not bool(rows.any()):
            return (1.0 - mcfg.ctc_weight) * attention, parts
        per_utt = ctc_loss(ctc_log_probs, enc_lens, spoken, spoken_lens, blank=mcfg.decoder.vocab_size,
                           reduction="none")
        ctc = (per_utt / spoken_lens.clamp(min=1))[rows].mean()
        parts["ctc"] = ctc
        w = self.ctc_weight(mcfg.ctc_weight) if core.training else mcfg.ctc_weight
        return w * ctc + (1.0 - w) * attention, parts

    @torch.no_grad()
    def validate(self, model, cuts, dataset, device, autocast_dtype=None) -> dict:
        """Val loss (teacher forcing), then greedy decoding through `transcribe`: WER per language on
        ASR lines (source == target), BLEU per language pair on translation lines."""
        import sacrebleu

        from serinus.data.dataset import cut_slots
        from serinus.transcribe import transcribe

        model.eval()
        bs = int(self.cfg["validation_ds"]["batch_size"])
        total, parts_total, n = 0.0, {}, 0
        # teacher forcing needs the whole prompt + transcript in the decoder's positions (the loop warned
        # about the others, which are still decoded below)
        positions = getattr(model, "module", model).cfg.decoder.max_sequence_length  # DDP wraps the model
        scored = [c for c in cuts if fits_decoder(c, positions)]
        for i in range(0, len(scored), bs):
            batch = dataset[scored[i : i + bs]]
            loss, parts = self.loss(model, batch, device, autocast_dtype)
            total, n = total + float(loss) * len(batch.cuts), n + len(batch.cuts)
            for k, v in parts.items():
                parts_total[k] = parts_total.get(k, 0.0) + float(v) * len(batch.cuts)
        out = {"val_loss": total / max(n, 1), **{f"val_{k}_loss": v / max(n, 1) for k, v in parts_total.items()}}

        groups: dict = {}
        for c in cuts:  # one transcribe() call per prompt (source, target, pnc)
            slots = cut_slots(c)
            src = slots.get("source_lang") or c.supervisions[0].language
            key = (src, slots.get("target_lang") or src, slots.get("pnc"))
            groups.setdefault(key, []).append(c)
        refs, hyps, unseen, pairs, examples = {}, {}, {}, {}, []
        for (src, tgt, pnc), group in groups.items():
            audio = [c.load_audio().reshape(-1) for c in group]
            results = transcribe(model, audio, batch_size=bs, source_lang=src, target_lang=tgt, pnc=pnc)
            for c, hyp in zip(group, results):
                # a timestamp-target line (<|n|> frame tokens between words) is scored on its words
                ref = re.sub(r"\s+", " ", _FRAME_TOKEN.sub(" ", " ".join(s.text for s in c.supervisions))).strip()
                if src == tgt:
                    refs.setdefault(src, []).append(ref)
                    hyps.setdefault(src, []).append(hyp.text)
                    unseen.setdefault(src, []).append(ref not in self.train_texts)
                else:
                    r, h = pairs.setdefault(f"{src}-{tgt}", ([], []))
                    r.append(ref)
                    h.append(hyp.text)
                if len(examples) < 3:
                    examples.append({"ref": ref, "hyp": hyp.text, "lang": f"{src}-{tgt}"})
        out.update(_wer_metrics(refs, hyps, unseen))
        for pair, (r, h) in sorted(pairs.items()):
            out[f"bleu_{pair}"] = float(sacrebleu.corpus_bleu(h, [r]).score)
        if pairs:
            out["bleu"] = sum(out[f"bleu_{p}"] for p in pairs) / len(pairs)
        out["examples"] = examples
        model.train()
        return out


class CTCTask:
    """FastConformer CTC over one SentencePiece vocabulary + blank (NeMo's EncDecCTCModelBPE):
    an encoder to initialise an AED from, or a timestamp aligner to pack (`serinus pack-aligner`)."""

    name = "ctc"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.train_texts: set[str] = set()

    def build_model(self, tokenizer, init_cfg=None) -> CTCModel:
        m = self.cfg["model"]
        if m["preset"] not in (None, "init_from"):
            raise ConfigError("model.preset: released presets are AED architectures; set model.encoder.* for a CTC model")
        if isinstance(tokenizer, CanaryTokenizer):
            raise ConfigError("model.type=ctc needs one SentencePiece tokenizer (a folder with tokenizer.model), "
                              "not an aggregate spl_tokens + languages tokenizer")
        base_enc = init_cfg.encoder if (m["preset"] == "init_from" and init_cfg is not None) else EncoderConfig()
        mcfg = CTCConfig(
            features=dataclasses.replace(FeatureConfig(), **m["features"]),
            encoder=dataclasses.replace(base_enc, **m["encoder"]),
            num_classes=tokenizer.vocab_size,
            spec_augment=_spec_augment(m),
        )
        return CTCModel(mcfg, tokenizer)

    def dataset(self, model, allow_unk: bool = False, audio_cache: dict | None = None):
        from serinus.data.dataset import TranscriptDataset

        return TranscriptDataset(model.tokenizer, allow_unk=allow_unk, audio_cache=audio_cache)

    def attach_num_tokens(self, cuts, model, allow_unk: bool = False):
        from lhotse import CutSet

        from serinus.data.dataset import transcript_ids

        def attach(cut):
            cut.num_tokens = len(transcript_ids(cut, model.tokenizer, allow_unk))
            return cut

        return CutSet.from_cuts([attach(c) for c in cuts])

    def loss(self, model, batch, device, autocast_dtype=None) -> tuple[torch.Tensor, dict]:
        core = getattr(model, "module", model)
        with _amp(device, autocast_dtype):
            log_probs, lens = model(batch.audio.to(device), batch.audio_lens.to(device))
        loss = ctc_loss(log_probs.float(), lens, batch.transcript.to(device), batch.transcript_lens.to(device),
                        blank=core.blank_id)
        return loss, {"ctc": loss}

    @torch.no_grad()
    def validate(self, model, cuts, dataset, device, autocast_dtype=None) -> dict:
        from serinus.audio import collate_audio

        model.eval()
        bs = int(self.cfg["validation_ds"]["batch_size"])
        total, n = 0.0, 0
        refs, hyps, unseen, examples = {}, {}, {}, []
        tok = model.tokenizer
        for i in range(0, len(cuts), bs):
            group = cuts[i : i + bs]
            batch = dataset[group]
            loss, _ = self.loss(model, batch, device, autocast_dtype)
            total, n = total + float(loss) * len(group), n + len(group)
            audio, lens = collate_audio([c.load_audio().reshape(-1) for c in group], device)
            with _amp(device, autocast_dtype):
                log_probs, out_lens = model(audio, lens)
            for c, lp, length in zip(group, log_probs, out_lens):
                best = torch.unique_consecutive(lp[: int(length)].argmax(-1)).tolist()
                text = tok.ids_to_text([t for t in best if t != model.blank_id])
                ref = " ".join(s.text for s in c.supervisions)
                lang = c.supervisions[0].language or "xx"
                refs.setdefault(lang, []).append(ref)
                hyps.setdefault(lang, []).append(text)
                unseen.setdefault(lang, []).append(ref not in self.train_texts)
                if len(examples) < 3:
                    examples.append({"ref": ref, "hyp": text, "lang": lang})
        out = {"val_loss": total / max(n, 1), **_wer_metrics(refs, hyps, unseen), "examples": examples}
        model.train()
        return out


def make_task(cfg: dict):
    return {"aed": AEDTask, "ctc": CTCTask}[cfg["model"]["type"]](cfg)
