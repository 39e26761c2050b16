"""Build Canary tokenizers with SentencePiece, the way NeMo's scripts do, so ids match.

- `build_special_tokenizer`: the canary2 `spl_tokens` model (NeMo's
  `scripts/speech_recognition/canary/build_canary_2_special_tokenizer.py`): 1152 pieces, every
  special token a user-defined symbol, in NeMo's order so ids are the same as NeMo's.
  `prompt_format="canary"` builds canary-1b's instead (NeMo's `build_canary_1b_special_tokenizer.py`):
  30 pieces, the v1 control tokens, `<|en|> <|es|> <|de|> <|fr|>` and 16 spare `<|spltokenK|>`.
- `train_bpe_tokenizer`: a per-language BPE (NeMo's `scripts/tokenizers/process_asr_text_tokenizer.py`
  with `--tokenizer spe --spe_type bpe`), written to `OUT/tokenizer_spe_bpe_v{N}/`.
- `train_unified_tokenizer`: one BPE with all special tokens as user-defined symbols (the
  canary-1b-v2 layout), the same builder with `--spe_user_defined_symbols <special tokens>`.

SentencePiece training is deterministic for a given input, options and sentencepiece version;
with sentencepiece 0.2.x these reproduce the NeMo fixtures' vocabularies piece for piece.

CLI: `serinus tokenizer special OUT_DIR [--prompt-format canary]` and
`serinus tokenizer train --manifest M ... OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable

# NeMo's canary_tokenizer.DEFAULT_TOKENS: always first, so <pad> is id 2 and <|endoftext|> id 3.
DEFAULT_TOKENS = ["<|nospeech|>", "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|pnc|>", "<|nopnc|>"]

CONTROL_TOKENS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|nopnc|>", "<|pnc|>", "<|nospeech|>", "<|startofcontext|>",
    "<|itn|>", "<|noitn|>", "<|timestamp|>", "<|notimestamp|>", "<|diarize|>", "<|nodiarize|>", "<|spkchange|>",
    "<|audioseparator|>", "<|emo:undefined|>", "<|emo:neutral|>", "<|emo:happy|>", "<|emo:sad|>", "<|emo:angry|>",
]  # fmt: skip

# ISO 639-1 codes in the order of NeMo's build_canary_2_special_tokenizer.py (183 languages).
ISO_LANGS = (
    "aa ab af ak sq am ar an hy as av ae ay az bm ba eu be bn bi bs br bg my ca ch ce ny zh cu cv kw co cr hr cs "
    "da dv nl dz en eo et ee fo fj fi fr fy ff gd gl lg ka de el kl gn gu ht ha he hz hi ho hu is io ig id ia ie "
    "iu ik ga it ja jv kn kr ks kk km ki rw ky kv kg ko kj ku lo la lv li ln lt lu lb mk mg ms ml mt gv mi mr mh "
    "mn na nv nd nr ng ne no nb nn oc oj or om os pi ps fa pl pt pa qu ro rm rn ru se sm sg sa sc sr sn sd si sk "
    "sl so st es su sw ss sv tl ty tg ta tt te th bo ti to ts tn tr tk tw ug uk ur uz ve vi vo wa cy wo xh ii yi "
    "yo za zu"
).split()

# canary-1b (prompt format `canary`): NeMo's build_canary_1b_special_tokenizer.py token list, in its order.
CANARY1_CONTROL_TOKENS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|translate|>", "<|nopnc|>", "<|pnc|>",
    "<|nospeech|>",
]  # fmt: skip
CANARY1_LANGS = ("en", "es", "de", "fr")
CANARY1_NUM_SPARE = 16  # <|spltoken0|>..<|spltoken15|>

NUM_TIMESTAMP_TOKENS = 900  # <|0|>..<|899|>: frame indices (80 ms each) for word timestamps
NUM_SPEAKER_TOKENS = 16

_SPECIAL_RE = re.compile(r"<\|.+\|>")


def _as_special(token: str) -> str:
    """`summarize` -> `<|summarize|>`; tokens already in `<|..|>` form are kept (as NeMo does)."""
    return token if _SPECIAL_RE.match(token) else f"<|{token}|>"


def _check_extra(extra_tokens: Iterable[str], known: set[str]) -> list[str]:
    """Extra tokens in `<|..|>` form; each must be new and usable as a SentencePiece user symbol."""
    extra = [_as_special(t) for t in extra_tokens]
    for t in extra:
        if t in known or extra.count(t) > 1:
            raise ValueError(f"extra token {t} is already in the special-token vocabulary")
        if "," in t:
            raise ValueError(f"extra token {t} contains ',' which SentencePiece cannot take in a user symbol")
    return extra


def canary2_special_tokens(extra_tokens: Iterable[str] = ()) -> list[str]:
    """The special tokens in vocabulary order (ids 1..N of the spl_tokens model; 0 is <unk>).

    Padding tokens `<|spltokenK|>` fill the vocab (with <unk>, <pad> and `▁`) up to a multiple of 64.
    Extra tokens (new tasks, e.g. `<|summarize|>`) come after the padding and take the place of its
    last entries, so every other token keeps its id and the vocab stays 1152 while there is room.
    """
    base = CONTROL_TOKENS + ["<|unklang|>"] + [f"<|{c}|>" for c in ISO_LANGS]
    base += [f"<|{i}|>" for i in range(NUM_TIMESTAMP_TOKENS)] + [f"<|spk{i}|>" for i in range(NUM_SPEAKER_TOKENS)]
    extra = _check_extra(extra_tokens, set(DEFAULT_TOKENS) | set(base))
    num = len(base) + len(extra) + 3  # + <pad>, <unk> and "▁", as NeMo counts
    num_pad = (num + 63) // 64 * 64 - num
    tokens = DEFAULT_TOKENS + base + [f"<|spltoken{i}|>" for i in range(num_pad)] + extra
    return list(dict.fromkeys(tokens))  # NeMo de-duplicates DEFAULT_TOKENS vs the script's list


def canary1_special_tokens(extra_tokens: Iterable[str] = ()) -> list[str]:
    """canary-1b's special tokens in vocabulary order (ids 1..28 of its spl_tokens model; 0 is <unk>).

    NeMo prepends DEFAULT_TOKENS to the script's list and de-duplicates, so the order is <|nospeech|>,
    <pad>, <|endoftext|>, <|startoftranscript|>, <|pnc|>, <|nopnc|>, <|transcribe|>, <|translate|>,
    the four languages, then <|spltoken0..15|>. Extra tokens take the place of the last spare ones
    (the vocab stays 30 while there is room, every other id is kept) and are appended beyond that.
    """
    base = CANARY1_CONTROL_TOKENS + [f"<|{c}|>" for c in CANARY1_LANGS]
    extra = _check_extra(extra_tokens, set(DEFAULT_TOKENS) | set(base))
    num_pad = max(CANARY1_NUM_SPARE - len(extra), 0)
    tokens = DEFAULT_TOKENS + base + [f"<|spltoken{i}|>" for i in range(num_pad)] + extra
    return list(dict.fromkeys(tokens))


def special_tokens(prompt_format: str = "canary2", extra_tokens: Iterable[str] = ()) -> list[str]:
    """The special-token list of the spl_tokens model for `prompt_format` ("canary2" or "canary")."""
    if prompt_format == "canary2":
        return canary2_special_tokens(extra_tokens)
    if prompt_format == "canary":
        return canary1_special_tokens(extra_tokens)
    raise ValueError(f"unknown prompt format {prompt_format!r} for a special-token model; known: canary2, canary")


def _train_spm(
    text_path: Path,
    out_dir: Path,
    vocab_size: int,
    model_type: str,
    lowercase: bool = False,
    character_coverage: float = 1.0,
    user_defined_symbols: Iterable[str] = (),
    control_symbols: Iterable[str] = (),
    sample_size: int = -1,
    max_sentencepiece_length: int = -1,
    split_digits: bool = False,
    byte_fallback: bool = False,
    split_by_unicode_script: bool = True,
    remove_extra_whitespaces: bool = False,
) -> Path:
    """SentencePiece training with the options of NeMo's `create_spt_model` (no bos/eos, no pad id)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer.vocab", "vocab.txt"):
        (out_dir / name).unlink(missing_ok=True)
    user_defined_symbols, control_symbols = list(user_defined_symbols), list(control_symbols)
    opts = dict(
        input=str(text_path),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=character_coverage,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    if control_symbols:
        opts["control_symbols"] = ",".join(control_symbols)
    if user_defined_symbols:
        opts["user_defined_symbols"] = ",".join(user_defined_symbols)
    if lowercase:
        opts["normalization_rule_name"] = "nmt_nfkc_cf"  # NeMo lower-cases through case folding
    if sample_size > 0:
        opts["input_sentence_size"] = sample_size
    if max_sentencepiece_length >= 0:
        opts["max_sentencepiece_length"] = max_sentencepiece_length
    if byte_fallback:
        opts["byte_fallback"] = True
    if split_digits:
        opts["split_digits"] = True
    if not split_by_unicode_script:
        opts["split_by_unicode_script"] = False
    if not remove_extra_whitespaces:
        opts["remove_extra_whitespaces"] = False
    try:
        spm.SentencePieceTrainer.Train(**opts)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training on {text_path} failed: {e}") from None
    # vocab.txt as NeMo writes it: pieces without specials, "▁x" -> "x", "x" -> "##x".
    specials = {"<s>", "</s>", "<pad>", "<unk>"} | set(control_symbols) | set(user_defined_symbols)
    vocab = []
    with open(out_dir / "tokenizer.vocab", encoding="utf-8") as f:
        for line in f:
            piece = line.split("\t")[0]
            if piece in specials:
                continue
            token = piece[1:] if piece.startswith("▁") else f"##{piece}"
            vocab.append(token if token else piece[0])
    (out_dir / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    return out_dir


def build_special_tokenizer(
    out_dir: str | os.PathLike, extra_tokens: Iterable[str] = (), prompt_format: str = "canary2"
) -> Path:
    """Write the special-token SentencePiece model (`spl_tokens`) to `out_dir`; returns it.

    `prompt_format` "canary2" gives the flash/v2 model (1152 pieces), "canary" canary-1b's (30).
    Like NeMo's `CanaryTokenizer.build_special_tokenizer`: a unigram model over a text made of the
    tokens themselves, each declared a user-defined symbol, vocab = tokens + <unk> + "▁".
    """
    out_dir = Path(out_dir)
    tokens = special_tokens(prompt_format, extra_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = out_dir / "train_text.txt"
    text_path.write_text("\n".join(tokens), encoding="utf-8")
    return _train_spm(text_path, out_dir, len(tokens) + 2, "unigram", user_defined_symbols=tokens)


def manifest_texts(manifests: Iterable[str | os.PathLike], lang: str | None = None) -> list[str]:
    """The `text` of every manifest line (optionally only lines whose `target_lang`/`lang` is `lang`)."""
    texts = []
    for m in manifests:
        with open(m, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{m}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise ValueError(f"{m}:{lineno}: no 'text' string")
                if lang is not None and (item.get("target_lang") or item.get("lang")) != lang:
                    continue
                texts.append(item["text"])
    if not texts:
        where = ", ".join(map(str, manifests)) + (f" for language {lang!r}" if lang else "")
        raise ValueError(f"no text found in {where}")
    return texts


def _text_file(texts: str | os.PathLike | Iterable[str], out_dir: Path) -> Path:
    """A one-sentence-per-line text file: given as a path, or written to OUT/text_corpus/document.txt."""
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise ValueError(f"{path}: no such text file")
        return path
    path = out_dir / "text_corpus" / "document.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
    return path


def train_bpe_tokenizer(
    texts: str | os.PathLike | Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int,
    lowercase: bool = False,
    character_coverage: float = 1.0,
    user_defined_symbols: Iterable[str] = (),
    spe_type: str = "bpe",
    **spm_options,
) -> Path:
    """Train a SentencePiece tokenizer into `out_dir/tokenizer_spe_{spe_type}_v{vocab_size}/`; returns that folder.

    `texts` is a text file (one sentence per line) or an iterable of sentences (e.g.
    `manifest_texts([m], lang="en")`). Options beyond these (sample_size, max_sentencepiece_length,
    split_digits, byte_fallback, ...) follow NeMo's `create_spt_model`.
    """
    out_dir = Path(out_dir)
    text_path = _text_file(texts, out_dir)
    tok_dir = out_dir / f"tokenizer_spe_{spe_type}_v{vocab_size}"
    if spm_options.get("max_sentencepiece_length", -1) > 0:
        tok_dir = tok_dir.with_name(f"{tok_dir.name}_max_{spm_options['max_sentencepiece_length']}")
    return _train_spm(
        text_path, tok_dir, vocab_size, spe_type, lowercase=lowercase, character_coverage=character_coverage,
        user_defined_symbols=user_defined_symbols, **spm_options,
    )


def train_unified_tokenizer(
    texts: str | os.PathLike | Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int,
    extra_tokens: Iterable[str] = (),
    lowercase: bool = False,
    character_coverage: float = 1.0,
    **spm_options,
) -> Path:
    """One BPE whose first pieces are the canary2 special tokens (user-defined symbols), canary-1b-v2 style.

    `vocab_size` counts everything (1150 specials + <unk> + BPE pieces), as SentencePiece does.
    """
    specials = canary2_special_tokens(extra_tokens)
    if vocab_size <= len(specials) + 1:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for text pieces after {len(specials) + 1} special ones"
        )
    return train_bpe_tokenizer(
        texts, out_dir, vocab_size, lowercase=lowercase, character_coverage=character_coverage,
        user_defined_symbols=specials, **spm_options,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serinus tokenizer", description="Build Canary tokenizers.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("special", help="special-token model (spl_tokens): canary2 (1152 pieces) or canary (30).")
    s.add_argument("out_dir")
    s.add_argument("--prompt-format", default="canary2", choices=["canary2", "canary"],
                   help="canary2: canary-1b-flash/180m-flash/1b-v2 (default); canary: canary-1b")
    s.add_argument("--extra-tokens", nargs="+", default=[], help="new special tokens, e.g. summarize nosummarize")
    t = sub.add_parser("train", help="Per-language (or --unified) SentencePiece BPE from manifest text.")
    t.add_argument("out_dir")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", action="append", help="NeMo manifest whose `text` is the corpus (repeatable)")
    src.add_argument("--text", help="a text file, one sentence per line")
    t.add_argument("--lang", help="only manifest lines whose target_lang (or lang) is this")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--unified", action="store_true", help="include all special tokens as user-defined symbols")
    t.add_argument("--extra-tokens", nargs="+", default=[], help="with --unified: new special tokens")
    t.add_argument("--lowercase", action="store_true", help="case-fold (NeMo's default; off here, as --no_lower_case)")
    t.add_argument("--character-coverage", type=float, default=1.0)
    t.add_argument("--spe-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    t.add_argument("--user-defined-symbols", nargs="+", default=[])
    args = parser.parse_args(argv)
    try:
        if args.cmd == "special":
            out = build_special_tokenizer(args.out_dir, args.extra_tokens, args.prompt_format)
            print(f"{out}: {len(special_tokens(args.prompt_format, args.extra_tokens)) + 2} pieces")
            return 0
        texts = args.text if args.text else manifest_texts(args.manifest, args.lang)
        if args.unified:
            out = train_unified_tokenizer(
                texts, args.out_dir, args.vocab_size, args.extra_tokens, args.lowercase, args.character_coverage,
                spe_type=args.spe_type,
            )
        else:
            out = train_bpe_tokenizer(
                texts, args.out_dir, args.vocab_size, args.lowercase, args.character_coverage,
                args.user_defined_symbols, args.spe_type,
            )
        print(out)
        return 0
    except (ValueError, OSError) as e:
        print(f"serinus tokenizer: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
