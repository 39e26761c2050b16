"""The Canary model: log-mel front end, FastConformer encoder, Transformer decoder, tokenizer, prompt.

    audio [B, N] -> LogMel -> [B, 128, T] -> [SpecAugment, training only] -> ConformerEncoder -> [B, d_enc, T/8]
      -> encoder_decoder_proj (when d_enc != d_dec) -> TransformerDecoder(prompt + text) -> log-probs
      (and, with ctc_weight > 0, a CTC head on the raw encoder output for a joint CTC + attention loss)

`CanaryModel.from_pretrained` loads a NeMo `.nemo` archive, a folder saved by
`save_pretrained`, or a Hugging Face Hub id; `transcribe` is the NeMo-style entry point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from serinus.audio import FeatureConfig, LogMel, feature_lengths
from serinus.decoding import DecodingConfig
from serinus.model.ctc import CTCConfig, CTCModel
from serinus.model.decoder import DecoderConfig, TransformerDecoder
from serinus.model.encoder import ConformerEncoder, EncoderConfig, calc_subsampled_length, time_mask
from serinus.model.specaugment import SpecAugment, SpecAugmentConfig


@dataclass
class CanaryConfig:
    features: FeatureConfig
    encoder: EncoderConfig
    decoder: DecoderConfig
    prompt_format: str = "canary2"
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    use_loss_mask_for_prompt: bool = False
    label_smoothing: float = 0.0
    aligner: CTCConfig | None = None  # the CTC model canary-1b-v2 packs for timestamps
    spec_augment: SpecAugmentConfig | None = None  # training-time masks on the features
    ctc_weight: float = 0.0  # > 0: a CTC head on the encoder; loss = w * ctc + (1 - w) * attention

    @classmethod
    def from_nemo(cls, cfg: dict, vocab_size: int) -> "CanaryConfig":
        """Build from a NeMo `model_config.yaml` (as a dict) and the tokenizer's vocabulary size."""
        transf_encoder = cfg.get("transf_encoder") or {}
        if int(transf_encoder.get("num_layers", 0) or 0) > 0:
            raise ValueError("transf_encoder.num_layers > 0 (an extra Transformer encoder) is not supported")
        fmt = cfg.get("prompt_format", "canary")
        return cls(
            features=FeatureConfig.from_nemo(cfg["preprocessor"]),
            encoder=EncoderConfig.from_nemo(cfg["encoder"]),
            decoder=DecoderConfig.from_nemo(cfg["transf_decoder"]["config_dict"], padded_vocab(vocab_size)),
            prompt_format=fmt,
            decoding=DecodingConfig.from_nemo(cfg.get("decoding")),
            use_loss_mask_for_prompt=bool(cfg.get("use_loss_mask_for_prompt", False)),
            label_smoothing=float(cfg.get("label_smoothing", 0.0) or 0.0),
            spec_augment=SpecAugmentConfig.from_nemo(cfg.get("spec_augment")),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CanaryConfig":
        aligner, spec = d.get("aligner"), d.get("spec_augment")
        return cls(
            features=FeatureConfig(**d["features"]),
            encoder=EncoderConfig(**d["encoder"]),
            decoder=DecoderConfig(**d["decoder"]),
            prompt_format=d["prompt_format"],
            decoding=DecodingConfig(**d["decoding"]),
            use_loss_mask_for_prompt=d.get("use_loss_mask_for_prompt", False),
            label_smoothing=d.get("label_smoothing", 0.0),
            aligner=CTCConfig.from_dict(aligner) if aligner is not None else None,
            spec_augment=SpecAugmentConfig(**spec) if spec is not None else None,
            ctc_weight=float(d.get("ctc_weight", 0.0)),
        )


def padded_vocab(vocab_size: int) -> int:
    """NeMo pads the decoder vocabulary to a multiple of 8."""
    return 8 * math.ceil(vocab_size / 8)


# Released Canary architectures (NeMo's fast-conformer_aed.yaml, the model cards). All use 128 mels,
# 8x dw_striding subsampling with 256 channels, rel_pos attention with 8 heads, conv kernel 9,
# FFN expansion 4, and a pre-LN decoder with 8 heads and inner size 4x hidden.
PRESETS = {
    "canary-1b": dict(enc_layers=24, d_model=1024, dec_layers=24, hidden=1024, max_len=512, prompt_format="canary"),
    "canary-1b-flash": dict(enc_layers=32, d_model=1024, dec_layers=4, hidden=1024, max_len=1024, prompt_format="canary2"),
    "canary-180m-flash": dict(enc_layers=17, d_model=512, dec_layers=4, hidden=1024, max_len=1024, prompt_format="canary2"),
    "canary-1b-v2": dict(enc_layers=32, d_model=1024, dec_layers=8, hidden=1024, max_len=1024, prompt_format="canary2"),
}


def preset_config(name: str, vocab_size: int) -> CanaryConfig:
    """The architecture of a released Canary model, for a tokenizer of `vocab_size` entries."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return CanaryConfig(
        features=FeatureConfig(),
        encoder=EncoderConfig(n_layers=p["enc_layers"], d_model=p["d_model"], n_heads=8, subsampling_conv_channels=256),
        decoder=DecoderConfig(vocab_size=padded_vocab(vocab_size), hidden_size=p["hidden"], inner_size=4 * p["hidden"],
                              num_layers=p["dec_layers"], num_attention_heads=8, max_sequence_length=p["max_len"]),
        prompt_format=p["prompt_format"],
        decoding=DecodingConfig(beam_size=1, strategy="beam", max_generation_delta=50),
    )


class CanaryModel(nn.Module):
    def __init__(self, cfg: CanaryConfig, tokenizer=None, aligner_tokenizer=None):
        super().__init__()
        if not 0.0 <= cfg.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1], got {cfg.ctc_weight}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.aligner_tokenizer = aligner_tokenizer  # the CTC aligner's own vocabulary (v2 checkpoints)
        self.preprocessor = LogMel(cfg.features)
        self.encoder = ConformerEncoder(cfg.encoder)
        d_enc, d_dec = cfg.encoder.d_model, cfg.decoder.hidden_size
        self.encoder_decoder_proj = nn.Linear(d_enc, d_dec) if d_enc != d_dec else nn.Identity()
        self.decoder = TransformerDecoder(cfg.decoder)
        self.spec_augment = SpecAugment(cfg.spec_augment) if cfg.spec_augment is not None else None
        # CTC head for the joint loss: padded decoder vocabulary + blank (id = decoder.vocab_size)
        self.ctc_head = nn.Linear(d_enc, cfg.decoder.vocab_size + 1) if cfg.ctc_weight > 0 else None
        self.aligner = CTCModel(cfg.aligner, aligner_tokenizer) if cfg.aligner is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def frame_seconds(self) -> float:
        """Duration of one encoder frame (window stride x subsampling), 0.08 s for Canary."""
        return self.cfg.features.window_stride * self.cfg.encoder.subsampling_factor

    @property
    def ctc_blank_id(self) -> int:
        """Blank id of the CTC head (`ctc_weight > 0`): the padded decoder vocabulary size."""
        return self.cfg.decoder.vocab_size

    def limit_lengths(self, audio_lengths: Tensor) -> Tensor:
        """The encoder length NeMo's generation limit counts, for each item decoded alone: the length
        of NeMo's encoder output tensor, not of its valid part. The centred STFT gives one frame more
        than the valid frames, so this is at times one more than `encode`'s lengths (963 vs 962 for a
        77 s clip: Serinus's own output stops at the valid frames), and NeMo allows one more token there.
        The preprocessor's `pad_to` does not count: NeMo's transcribe() sets it to 0 (as it does dither)."""
        cfg = self.cfg.features
        frames = feature_lengths(audio_lengths, cfg.n_fft, cfg.hop_length) + 1
        return calc_subsampled_length(frames, self.encoder.pre_encode.num_stages)

    def encode_raw(self, audio: Tensor, audio_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """audio [B, N], lengths [B] -> raw encoder output [B, D_enc, T] (SpecAugment applied in
        training) and encoder lengths [B]."""
        features, feature_lengths = self.preprocessor(audio, audio_lengths)
        if self.spec_augment is not None:
            features = self.spec_augment(features, feature_lengths)  # the identity in eval
        return self.encoder(features, feature_lengths)

    def encode(self, audio: Tensor, audio_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """audio [B, N], lengths [B] -> decoder-side encoder states [B, T, H], valid mask [B, T],
        encoder lengths [B]."""
        encoded, lengths = self.encode_raw(audio, audio_lengths)  # [B, D, T]
        states = self.encoder_decoder_proj(encoded.transpose(1, 2))
        return states, time_mask(lengths, states.shape[1]), lengths

    def encode_with_ctc(self, audio: Tensor, audio_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`encode` plus the CTC head's log-probs [B, T, V+1] (float32) from the same encoder pass."""
        encoded, lengths = self.encode_raw(audio, audio_lengths)
        hidden = encoded.transpose(1, 2)
        states = self.encoder_decoder_proj(hidden)
        return (states, time_mask(lengths, states.shape[1]), lengths,
                torch.log_softmax(self.ctc_head(hidden).float(), dim=-1))

    def forward(self, audio: Tensor, audio_lengths: Tensor, tokens: Tensor, token_lengths: Tensor,
                with_ctc: bool = False):
        """Teacher-forced log-probs [B, L, V] for decoder inputs `tokens` [B, L] (prompt + text).
        with_ctc: `forward_train`'s (log-probs, CTC log-probs, encoder lengths) instead; training calls it
        this way so that DistributedDataParallel, which synchronises what runs through forward(), sees it."""
        if with_ctc:
            return self.forward_train(audio, audio_lengths, tokens, token_lengths)
        states, mask, _ = self.encode(audio, audio_lengths)
        return self.decoder(tokens, states, mask, time_mask(token_lengths, tokens.shape[1]))

    def forward_train(self, audio: Tensor, audio_lengths: Tensor, tokens: Tensor,
                      token_lengths: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """One encoder pass for both losses: teacher-forced decoder log-probs [B, L, V], CTC log-probs
        [B, T, V+1] in float32 (None without a CTC head; blank = `ctc_blank_id`), encoder lengths [B]."""
        encoded, lengths = self.encode_raw(audio, audio_lengths)  # [B, D, T]
        hidden = encoded.transpose(1, 2)
        states = self.encoder_decoder_proj(hidden)
        log_probs = self.decoder(tokens, states, time_mask(lengths, states.shape[1]),
                                 time_mask(token_lengths, tokens.shape[1]))
        ctc_log_probs = None
        if self.ctc_head is not None:
            ctc_log_probs = torch.log_softmax(self.ctc_head(hidden).float(), dim=-1)
        return log_probs, ctc_log_probs, lengths

    DRAFT_MIN_BYTES = 32 << 20  # speculative decoding pays where a decoder step streams this much weight

    def speculative_draft(self) -> nn.Module | None:
        """The int8 draft that speeds up greedy decoding (serinus.decoding.speculative_greedy_decode),
        made on first use and kept; None where it does not pay or cannot be made: off the CPU (where
        a step is not bound by reading the weights), for a model not in float32, for one loaded to be
        trained (its weights change), or for a decoder small enough to sit in the CPU's caches."""
        from serinus.allocator import returning_freed_memory
        from serinus.precision import PackedLinear, int8_draft

        decoder = self.decoder
        weights = [m for m in decoder.modules() if isinstance(m, (nn.Linear, PackedLinear))]
        step_bytes = sum(m.in_features * m.out_features * 4 for m in weights) + decoder.token_embedding.weight.nbytes
        usable = (self.device.type == "cpu" and decoder.token_embedding.weight.dtype == torch.float32
                  and bool(weights) and all(isinstance(m, PackedLinear) for m in weights) and step_bytes >= self.DRAFT_MIN_BYTES)
        if not usable:
            return None
        if self.__dict__.get("_draft") is None:  # kept outside _modules: not among the model's weights
            with returning_freed_memory():  # its dense copies, one layer at a time, are not kept for reuse
                self.__dict__["_draft"] = int8_draft(decoder)
        return self.__dict__["_draft"]

    # -- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: str | torch.device = "cpu", **kwargs) -> "CanaryModel":
        """Load a `.nemo` file, a folder written by `save_pretrained`, or a Hub id such as
        `nvidia/canary-1b-v2` (downloaded once into the Hugging Face cache). Keywords: `dtype`
        ("float32", "bfloat16", "int8"); `for_training=True` to train the loaded model (otherwise its
        Linear layers are packed for CPU inference and frozen)."""
        from serinus.checkpoint import load_model

        return load_model(path_or_id, device=device, **kwargs)

    def save_pretrained(self, out_dir) -> None:
        """Write our own format: config.json + model.safetensors + tokenizer files."""
        from serinus.checkpoint import save_model

        save_model(self, out_dir)

    def save_nemo(self, path) -> None:
        """Write a NeMo `.nemo` archive that NeMo's `EncDecMultiTaskModel.restore_from` loads."""
        from serinus.nemo_export import save_nemo

        save_nemo(self, path)

    def save_tokenizers(self, out_dir) -> dict:
        """Export the tokenizer files (SentencePiece models) to `out_dir`; returns their config."""
        return self.tokenizer.save(out_dir)

    # -- inference ----------------------------------------------------------------------------

    def transcribe(self, audio, batch_size: int = 4, **kwargs):
        """Transcribe or translate audio: file paths, 1-D float arrays (16 kHz) or a JSONL manifest.
        See `serinus.transcribe.transcribe` for the options."""
        from serinus.transcribe import transcribe

        return transcribe(self, audio, batch_size=batch_size, **kwargs)


def joint_loss(attention_loss: Tensor, ctc_loss: Tensor | None, ctc_weight: float) -> Tensor:
    """The hybrid objective: ctc_weight * ctc_loss + (1 - ctc_weight) * attention_loss (the attention
    loss alone when ctc_weight is 0)."""
    if not ctc_weight:
        return attention_loss
    if ctc_loss is None:
        raise ValueError(f"ctc_weight={ctc_weight} but no CTC loss was given (the model has no ctc_head?)")
    return ctc_weight * ctc_loss + (1.0 - ctc_weight) * attention_loss


def sequence_loss(
    log_probs: Tensor,
    labels: Tensor,
    pad_id: int,
    prompt_lens: Tensor | None = None,
    lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean NLL of `labels` [B, L] under `log_probs` [B, L, V], as NeMo's SmoothedCrossEntropyLoss.

    Positions whose label is `pad_id` never count. With `prompt_lens` (use_loss_mask_for_prompt)
    only the answer and its EOS count: label positions prompt_len-1 .. lengths-1.
    """
    mask = labels != pad_id
    if prompt_lens is not None:
        positions = torch.arange(labels.shape[1], device=labels.device)[None, :]
        mask = mask & (positions >= prompt_lens[:, None] - 1)
        if lengths is not None:
            mask = mask & (positions < lengths[:, None])
    target = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing * log_probs.mean(dim=-1)
    return -(target * mask).sum() / mask.sum().clamp(min=1)
