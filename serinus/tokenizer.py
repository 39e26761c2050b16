"""Canary tokenizers: NeMo's aggregate `CanaryTokenizer` and the unified SentencePiece of canary-1b-v2.

Two layouts exist, with one interface here:

* `CanaryTokenizer` (canary-1b, canary-1b-flash, canary-180m-flash): a SentencePiece model of special
  tokens (`spl_tokens`) plus one SentencePiece model per language, concatenated. Ids of each
  sub-tokenizer are shifted by the total size of those before it, in the config's `langs` order.
* `UnifiedTokenizer` (canary-1b-v2, and the CTC aligner packed with it): one SentencePiece model
  whose first pieces are the special tokens, stored as user-defined symbols.

Both reproduce NeMo 3.0.0 exactly, quirks included (see `ids_to_text` and `text_to_ids`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import sentencepiece as spm

BOS = "<|startoftranscript|>"
EOS = "<|endoftext|>"
PAD = "<pad>"
NOSPEECH = "<|nospeech|>"
SPECIAL_LANG = "spl_tokens"  # the aggregate's sub-tokenizer of special tokens

_SPECIAL_RE = re.compile(r"^<\|.+\|>$")
_TIMESTAMP_RE = re.compile(r"<\|(\d+)\|>")
_FRAME_PIECE_RE = re.compile(r"^<\|(\d+)\|>$")
# Language tokens are <|xx|>, <|xxx|> or <|xx-YY|>; "pnc" and "itn" have that shape but are flags.
_LANG_TOKEN_RE = re.compile(r"^<\|([a-z]{2,3}(?:-[A-Za-z0-9]+)?)\|>$")
_NOT_LANGS = {"pnc", "itn"}
# NeMo maps plain 2-letter codes to region codes when a model's langs use those (canary2 helper).
_REGION_CODES = {"en": "en-US", "es": "es-ES", "fr": "fr-FR", "de": "de-DE"}


def _as_int_list(ids) -> list[int]:
    """Accept lists, tuples, numpy arrays and torch tensors of token ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _load_spm(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(path.read_bytes())
    return sp


class _Vocab:
    """What both layouts share: the id->piece table, the special tokens and the timestamp tokens."""

    def __init__(self, pieces: list[str], special_ids: dict[str, int]):
        self._pieces = tuple(pieces)
        # Special tokens are `<|...|>` and `<pad>`, as NeMo's CanaryTokenizer collects them.
        self._special_ids = dict(special_ids)
        self._special_id_set = frozenset(special_ids.values())
        frames = {}
        for piece, i in special_ids.items():
            if m := _FRAME_PIECE_RE.match(piece):
                frames[int(m.group(1))] = i
        self._frame_to_id = frames
        self._id_to_frame = {i: n for n, i in frames.items()}
        self._prompt_langs = tuple(
            m.group(1)
            for piece in special_ids
            if (m := _LANG_TOKEN_RE.match(piece)) and m.group(1) not in _NOT_LANGS
        )
        # A plain SentencePiece model (a CTC model's) may lack BOS/EOS/...: their properties raise
        # only when asked for.

    # --- vocabulary -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def vocab(self) -> tuple[str, ...]:
        """The full id -> piece table."""
        return self._pieces

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self._pieces):
            raise ValueError(f"token id {i} is out of range for a vocabulary of {len(self._pieces)}")
        return self._pieces[i]

    def ids_to_tokens(self, ids) -> list[str]:
        """Pieces of `ids`; an unknown id shows as `<unk>` (its vocabulary entry)."""
        return [self.id_to_piece(i) for i in _as_int_list(ids)]

    def _check_ids(self, ids: list[int]) -> None:
        n = len(self._pieces)
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {n}")

    # --- special tokens ---------------------------------------------------------------------------
    @property
    def special_tokens(self) -> dict[str, int]:
        """Every `<|...|>` token (and `<pad>`) with its id."""
        return dict(self._special_ids)

    def is_special_id(self, i: int) -> bool:
        return int(i) in self._special_id_set

    def _special(self, token: str) -> int:
        try:
            return self._special_ids[token]
        except KeyError:
            raise ValueError(
                f"special token {token!r} is not in this tokenizer's vocabulary "
                f"({len(self._special_ids)} special tokens, e.g. {', '.join(list(self._special_ids)[:8])}, ...)"
            ) from None

    @property
    def bos_id(self) -> int:
        return self._special(BOS)

    @property
    def eos_id(self) -> int:
        return self._special(EOS)

    @property
    def pad_id(self) -> int:
        return self._special(PAD)

    @property
    def nospeech_id(self) -> int:
        return self._special(NOSPEECH)

    @property
    def prompt_langs(self) -> tuple[str, ...]:
        """Language codes that have a `<|xx|>` token, i.e. what the prompt's language slots accept."""
        return self._prompt_langs

    # --- timestamps: frame n <-> <|n|> ---------------------------------------------------------------
    @property
    def timestamp_token_ids(self) -> tuple[int, ...]:
        """Ids of `<|0|>`, `<|1|>`, ... in frame order."""
        return tuple(self._frame_to_id[n] for n in sorted(self._frame_to_id))

    @property
    def max_timestamp_frame(self) -> int:
        """Largest n with a `<|n|>` token (-1 when the vocabulary has none)."""
        return max(self._frame_to_id, default=-1)

    def timestamp_token_id(self, frame: int) -> int:
        try:
            return self._frame_to_id[int(frame)]
        except KeyError:
            raise ValueError(
                f"no timestamp token <|{frame}|>: this tokenizer has <|0|> .. <|{self.max_timestamp_frame}|>"
            ) from None

    def timestamp_frame(self, i: int) -> int | None:
        """The frame n of a `<|n|>` token id, or None for any other id."""
        return self._id_to_frame.get(int(i))

    def is_timestamp_id(self, i: int) -> bool:
        return int(i) in self._id_to_frame


class CanaryTokenizer(_Vocab):
    """NeMo's aggregate tokenizer: `spl_tokens` plus one SentencePiece model per language.

    `models` maps sub-tokenizer name -> SentencePiece model file, in id order (the config's
    `langs` order, `spl_tokens` first in every released model).
    """

    def __init__(self, models: Mapping[str, str | Path]):
        if SPECIAL_LANG not in models:
            raise ValueError(f"an aggregate Canary tokenizer needs a {SPECIAL_LANG!r} entry; got {list(models)}")
        self._spm: dict[str, spm.SentencePieceProcessor] = {k: _load_spm(p) for k, p in models.items()}
        self.token_id_offset: dict[str, int] = {}
        pieces: list[str] = []
        for lang, sp in self._spm.items():
            self.token_id_offset[lang] = len(pieces)
            pieces.extend(sp.id_to_piece(i) for i in range(sp.get_piece_size()))
        spl_offset, spl = self.token_id_offset[SPECIAL_LANG], self._spm[SPECIAL_LANG]
        special = {}
        for i in range(spl.get_piece_size()):
            piece = spl.id_to_piece(i)
            if _SPECIAL_RE.match(piece) or piece == PAD:
                special[piece] = spl_offset + i
        super().__init__(pieces, special)
        self._langs = tuple(k for k in self._spm if k != SPECIAL_LANG)

    @property
    def langs(self) -> tuple[str, ...]:
        """Languages with their own text tokenizer (without `spl_tokens`)."""
        return self._langs

    @property
    def sub_vocab_sizes(self) -> dict[str, int]:
        return {k: sp.get_piece_size() for k, sp in self._spm.items()}

    @property
    def spl_id_range(self) -> range:
        """Ids of the `spl_tokens` sub-tokenizer."""
        start = self.token_id_offset[SPECIAL_LANG]
        return range(start, start + self._spm[SPECIAL_LANG].get_piece_size())

    def resolve_lang(self, lang: str) -> str:
        """`lang` as a key of `langs`; NeMo's 'en' -> 'en-US' fallback applies when the model uses those."""
        if lang in self._langs:
            return lang
        mapped = _REGION_CODES.get(lang)
        if mapped in self._langs:
            return mapped
        raise ValueError(f"unknown language {lang!r} for this tokenizer; known languages: {', '.join(self._langs)}")

    def token_to_id(self, piece: str, lang: str | None = None) -> int:
        """Id of a special token (`<|en|>`, `<|5|>`, `<pad>`) or, with `lang`, of that language's piece."""
        if lang is None or lang == SPECIAL_LANG:
            return self._special(piece)
        lang = self.resolve_lang(lang)
        sp = self._spm[lang]
        i = sp.piece_to_id(piece)
        if i == sp.unk_id() and piece != sp.id_to_piece(i):
            raise ValueError(f"piece {piece!r} is not in the {lang!r} vocabulary")
        return i + self.token_id_offset[lang]

    # --- encoding ---------------------------------------------------------------------------------
    def text_to_ids(self, text: str, lang: str) -> list[int]:
        """Token ids of `text` in language `lang`, exactly as NeMo's CanaryTokenizer.text_to_ids.

        * a trailing `<|endoftext|>` becomes `eos_id`;
        * `<|n|>` timestamp tokens are encoded positionally, as NeMo does: they are removed, the
          remaining words are encoded one by one, and the timestamps are put back as
          `<|t0|> w1 <|t1|> <|t2|> w2 <|t3|> ...` (first one before the first word, two after each
          word, and a leftover last one at the end), wherever they stood in the text;
        * `lang="spl_tokens"` reads `text` as a run of special tokens.
        """
        return self._encode(text, lang, pieces=False)

    def text_to_tokens(self, text: str, lang: str) -> list[str]:
        """The pieces matching `text_to_ids`; like SentencePiece (and NeMo), an unknown piece shows as
        its surface text rather than `<unk>`."""
        return self._encode(text, lang, pieces=True)

    def _encode(self, text: str, lang: str, pieces: bool) -> list:
        if lang == SPECIAL_LANG:
            ids = self._special_prompt_to_ids(text)
            return self.ids_to_tokens(ids) if pieces else ids
        lang = self.resolve_lang(lang)
        if text.endswith(EOS):
            eos = EOS if pieces else self.eos_id
            return self._encode_maybe_timestamps(text[: -len(EOS)], lang, pieces) + [eos]
        return self._encode_maybe_timestamps(text, lang, pieces)

    def _encode_plain(self, text: str, lang: str, pieces: bool) -> list:
        sp = self._spm[lang]
        if pieces:
            return sp.encode(text, out_type=str)
        offset = self.token_id_offset[lang]
        return [i + offset for i in sp.encode(text)]

    def _encode_maybe_timestamps(self, text: str, lang: str, pieces: bool) -> list:
        times = _TIMESTAMP_RE.findall(text)
        if not times:
            return self._encode_plain(text, lang, pieces)
        time_tokens = [f"<|{n}|>" for n in times]
        for tok in time_tokens:
            self._special(tok)  # a frame past the vocabulary is an error, not a silent <unk>
        if not pieces:
            time_tokens = [self._special_ids[t] for t in time_tokens]
        words = _TIMESTAMP_RE.sub("", text).strip().split()
        # NeMo's CanaryTokenizer._text_with_timestamps_to_ids, step by step.
        out, t = [], 0
        for w, word in enumerate(words):
            if w == 0 and t < len(time_tokens):
                out.append(time_tokens[t])
                t += 1
            out += self._encode_plain(word, lang, pieces)
            if t < len(time_tokens):
                out.append(time_tokens[t])
                t += 1
                if t < len(time_tokens):
                    out.append(time_tokens[t])
                    t += 1
            else:
                t += 2
        if t < len(time_tokens):
            out.append(time_tokens[-1])
        return out

    def _special_prompt_to_ids(self, text: str) -> list[int]:
        tokens = re.findall(r"<\|.*?\|>|<pad>", text)
        if "".join(tokens) != text:
            raise ValueError(f"expected only special tokens for {SPECIAL_LANG!r}, got {text!r}")
        return [self._special(t) for t in tokens]

    # --- decoding ---------------------------------------------------------------------------------
    def ids_to_text(self, ids) -> str:
        """NeMo's AggregateTokenizer.ids_to_text: the pieces joined with `▁` -> space.

        So the text keeps its leading space (" hello world"), special tokens print literally and
        glued to their neighbours ("<|3|> it's<|7|><|8|> almost<|9|>"), and an unknown id prints
        as `<unk>`.
        """
        ids = _as_int_list(ids)
        self._check_ids(ids)
        pieces = self._pieces
        return "".join([pieces[i] for i in ids]).replace("▁", " ")

    # --- files ------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> dict:
        """Write one `<lang>_tokenizer.model` per sub-tokenizer; return a config `load_tokenizer` reads
        with `resolve=lambda p: out_dir / p`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        langs = {}
        for lang, sp in self._spm.items():
            name = f"{lang}_tokenizer.model"
            (out_dir / name).write_bytes(sp.serialized_model_proto())
            langs[lang] = {"type": "bpe", "model_path": name}
        return {"type": "agg", "langs": langs}


class UnifiedTokenizer(_Vocab):
    """One SentencePiece model holding the special tokens as user-defined symbols (canary-1b-v2).

    NeMo's `CanaryBPETokenizer`, and its plain `SentencePieceTokenizer` for the same file (the CTC
    aligner): text goes through SentencePiece unchanged, special tokens included.
    """

    def __init__(self, model: str | Path):
        self._sp = _load_spm(model)
        sp = self._sp
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        special = {p: i for i, p in enumerate(pieces) if _SPECIAL_RE.match(p) or p == PAD}
        super().__init__(pieces, special)

    @property
    def langs(self) -> tuple[str, ...]:
        """Every language with a `<|xx|>` token; the text itself is language-independent."""
        return self.prompt_langs

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def resolve_lang(self, lang: str) -> str:
        if lang in self.prompt_langs:
            return lang
        raise ValueError(f"unknown language {lang!r} for this tokenizer; known languages: {', '.join(self.langs)}")

    def token_to_id(self, piece: str, lang: str | None = None) -> int:
        """Id of any piece, special (`<|en|>`, `<|5|>`) or not; `lang` is accepted for interface parity."""
        if piece in self._special_ids:
            return self._special_ids[piece]
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._pieces[i]:
            raise ValueError(f"piece {piece!r} is not in this tokenizer's vocabulary")
        return i

    def text_to_ids(self, text: str, lang: str | None = None) -> list[int]:
        """SentencePiece ids of `text`. `lang` is only checked; special tokens in the text (timestamps,
        `<|endoftext|>`) are their own pieces, each preceded by a `▁` piece where a space or the
        start of text stands before it."""
        if lang is not None:
            self.resolve_lang(lang)
        return self._sp.encode(text)

    def text_to_tokens(self, text: str, lang: str | None = None) -> list[str]:
        """Pieces of `text`; an unknown piece shows as its surface text (NeMo's `text_to_tokens`)."""
        if lang is not None:
            self.resolve_lang(lang)
        return self._sp.encode(text, out_type=str)

    def ids_to_text(self, ids) -> str:
        """SentencePiece decoding (NeMo's): no leading space, unknown ids print as ` ⁇ `."""
        ids = _as_int_list(ids)
        self._check_ids(ids)
        return self._sp.decode(ids)

    def save(self, out_dir: str | Path) -> dict:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        return {"type": "bpe", "model_path": "tokenizer.model"}


Tokenizer = CanaryTokenizer | UnifiedTokenizer

TOKENIZER_TYPES = ("agg", "bpe")


def _default_resolve(path: str) -> Path:
    if path.startswith("nemo:"):
        raise ValueError(f"{path!r} names a file inside a .nemo archive; pass resolve= to find it")
    return Path(path)


def _model_file(cfg: Mapping, resolve: Callable[[str], Path], where: str) -> Path:
    if cfg.get("model_path"):
        return Path(resolve(str(cfg["model_path"])))
    if cfg.get("dir"):  # NeMo's fallback: <dir>/tokenizer.model
        return Path(resolve(str(Path(cfg["dir"]) / "tokenizer.model")))
    raise ValueError(f"tokenizer config {where} has neither 'model_path' nor 'dir'")


def load_tokenizer(cfg: Mapping, resolve: Callable[[str], Path] | None = None) -> Tokenizer:
    """Build the tokenizer described by a NeMo `tokenizer:` config section.

    `type: agg` with `langs: {spl_tokens: {model_path: ...}, en: ...}` gives a `CanaryTokenizer`;
    `type: bpe` with `model_path` gives a `UnifiedTokenizer`. `resolve` maps each path in the config
    (`nemo:<member>` or a plain path) to a file; the default handles plain paths only.
    """
    resolve = resolve or _default_resolve
    kind = cfg.get("type")
    if kind == "agg":
        langs = cfg.get("langs")
        if not isinstance(langs, Mapping) or not langs:
            raise ValueError("tokenizer config of type 'agg' needs a non-empty 'langs' mapping")
        models = {}
        for lang, sub in langs.items():
            if sub.get("type", "bpe") != "bpe":
                raise ValueError(
                    f"tokenizer config langs.{lang}: type {sub.get('type')!r} is not supported; allowed: 'bpe'"
                )
            models[str(lang)] = _model_file(sub, resolve, f"langs.{lang}")
        return CanaryTokenizer(models)
    if kind == "bpe":
        return UnifiedTokenizer(_model_file(cfg, resolve, "(type bpe)"))
    raise ValueError(f"unknown tokenizer type {kind!r}; allowed: {', '.join(TOKENIZER_TYPES)}")


def nemo_resolver(extracted_dir: str | Path) -> Callable[[str], Path]:
    """A `resolve` for `load_tokenizer`: `nemo:<name>` -> `<extracted_dir>/<name>`, other paths as they are."""
    root = Path(extracted_dir)

    def resolve(path: str) -> Path:
        if path.startswith("nemo:"):
            return root / path[len("nemo:") :]
        return Path(path)

    return resolve


def tokenizer_model_in(folder: str | Path) -> Path | None:
    """<folder>/tokenizer.model (NeMo's layout), or the one in its only sub-folder that has one (what
    `serinus tokenizer train` writes: <folder>/tokenizer_spe_bpe_v<N>/)."""
    p = Path(folder)
    if (p / "tokenizer.model").is_file():
        return p / "tokenizer.model"
    found = sorted(p.glob("*/tokenizer.model"))
    return found[0] if len(found) == 1 else None


def langs_tokenizer(langs: Mapping) -> CanaryTokenizer:
    """NeMo's aggregate tokenizer from a training config's `tokenizer.langs` ({name: folder}), ids in the
    given order."""
    models = {}
    for lang, folder in langs.items():
        if (found := tokenizer_model_in(folder)) is None:
            raise ValueError(f"tokenizer.langs.{lang}: {folder} holds no tokenizer.model (nor one sub-folder with it)")
        models[str(lang)] = found
    if "spl_tokens" not in models:
        raise ValueError("tokenizer.langs needs a spl_tokens entry (the special-token model)")
    return CanaryTokenizer(models)


def open_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a `.nemo` file, a Serinus model folder, a folder with `tokenizer.model`
    (unified), or a folder with `spl_tokens/` and one sub-folder per language (aggregate)."""
    import json
    import tempfile

    p = Path(path)
    if p.is_file() and p.suffix == ".nemo":
        import yaml

        from serinus.weights import extract_nemo

        with tempfile.TemporaryDirectory(prefix="serinus-tok-") as tmp:
            root = extract_nemo(p, tmp)
            cfg = yaml.safe_load((root / "model_config.yaml").read_text())
            return load_tokenizer(cfg["tokenizer"], nemo_resolver(root))  # models are read into memory
    if not p.is_dir():
        raise ValueError(f"{p}: no such tokenizer file or folder")
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        return load_tokenizer(cfg["tokenizer"], lambda q: p / "tokenizer" / q)
    if (p / "tokenizer.model").is_file():
        return UnifiedTokenizer(p / "tokenizer.model")
    if (p / "spl_tokens").is_dir():
        models = {"spl_tokens": tokenizer_model_in(p / "spl_tokens")}
        for d in sorted(x for x in p.iterdir() if x.is_dir() and x.name != "spl_tokens"):
            if (m := tokenizer_model_in(d)) is not None:
                models[d.name] = m
        if models["spl_tokens"] is not None and len(models) > 1:
            return CanaryTokenizer(models)  # language order: sorted (ids differ from a model's, lengths do not)
    raise ValueError(f"{p}: no tokenizer found (expected a .nemo, tokenizer.model, or spl_tokens/ + language folders)")
