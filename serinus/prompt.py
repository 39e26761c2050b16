"""Canary decoder prompts: the `canary` (v1) and `canary2` formats, as NeMo 3.0.0 encodes them.

A format is data: an ordered template of literal special tokens and `{slot}` references, plus one
`Slot` per reference saying what values it takes and its default. A new control token is a new
entry, e.g. a yes/no `summarize` slot that becomes `<|summarize|>` / `<|nosummarize|>`:

    fmt = CANARY2.add_slot(Slot("summarize", "bool", default="no"))
    encode_prompt(tokenizer, fmt, {"source_lang": "en", "target_lang": "en", "summarize": "yes"})

Defaults are NeMo's. A slot either has a fixed `default` or derives one from the slots already
resolved (`derive_default`): canary-1b's `task` is transcription when source and target language
are equal and translation when they differ. (NeMo 3.0.0 always falls back to `asr` there, which
silently ignores a translation request; see README, differences from NeMo.) The languages have no
default here: `transcribe()` fills in NeMo's en -> en, training data must say.

Encoding follows NeMo:
* aggregate tokenizer: every control token maps to its special id, and the free-text slot
  (`decodercontext`) is tokenised by the *target* language's tokenizer;
* unified tokenizer: the whole prompt string goes through SentencePiece, which puts a lone `▁`
  piece first (so the plain canary2 prompt is 10 tokens there, 9 with the aggregate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .tokenizer import BOS, EOS, CanaryTokenizer, Tokenizer

SLOT_KINDS = ("lang", "bool", "choice", "text")

# NeMo's spellings for yes/no slots. Only BOOL_ON (and the slot's own name or token) switch a flag on:
# "Yes" is accepted but, as in NeMo 3.0.0, gives the "no" token.
BOOL_ON = ("yes", "1", "True", "true")
BOOL_ACCEPTED = ("yes", "Yes", "true", "True", "1", "no", "No", "false", "False", "0")

# Slot names NeMo's prompt dicts may carry that are not part of the prompt itself.
# `prompt_language` routes NeMo's aggregate tokenizer; we always know the route, so it is ignored.
IGNORED_SLOTS = ("prompt_language",)


@dataclass(frozen=True)
class Slot:
    """One variable position of a prompt.

    kind:
      * "lang": a language code (`en`) or its token (`<|en|>`); it must have a token in the vocabulary.
      * "bool": a yes/no flag rendered as `<|name|>` / `<|noname|>` (override with `tokens`).
      * "choice": one of `choices` (accepted value -> token).
      * "text": free text (the decoder context), tokenised in the language of slot `text_lang`.
    default: used when the caller leaves the slot out; None means the caller must give it.
    derive_default: used instead when there is no `default`: called with the slots resolved so far
      (slot name -> token, every slot without a derived default) and returns the slot's value.
    """

    name: str
    kind: str
    default: str | None = None
    choices: Mapping[str, str] = field(default_factory=dict)
    tokens: tuple[str, str] | None = None  # bool: (on, off)
    text_lang: str = "target_lang"
    derive_default: Callable[[Mapping[str, str]], str] | None = None

    def __post_init__(self):
        if self.kind not in SLOT_KINDS:
            raise ValueError(f"slot {self.name!r}: unknown kind {self.kind!r}; allowed: {', '.join(SLOT_KINDS)}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"slot {self.name!r}: a 'choice' slot needs choices")

    @property
    def bool_tokens(self) -> tuple[str, str]:
        return self.tokens or (f"<|{self.name}|>", f"<|no{self.name}|>")

    def allowed_values(self) -> list[str]:
        if self.kind == "bool":
            on, off = self.bool_tokens
            return [*BOOL_ACCEPTED, self.name, f"no{self.name}", on, off]
        if self.kind == "choice":
            return list(self.choices)
        return []


@dataclass(frozen=True)
class PromptFormat:
    """A prompt layout: `template` lists literal special tokens and `{slot}` references in order."""

    name: str
    template: tuple[str, ...]
    slots: tuple[Slot, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)  # old slot name -> slot name

    def __post_init__(self):
        refs = [p[1:-1] for p in self.template if p.startswith("{")]
        names = [s.name for s in self.slots]
        if sorted(refs) != sorted(names):
            raise ValueError(f"prompt format {self.name!r}: template slots {refs} do not match slots {names}")

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise ValueError(f"prompt format {self.name!r} has no slot {name!r}; slots: {', '.join(self.slot_names)}")

    def add_slot(self, slot: Slot, after: str | None = None) -> "PromptFormat":
        """A copy with `slot` inserted after slot `after` (default: at the end of the prompt)."""
        template = list(self.template)
        pos = len(template) if after is None else template.index("{" + self.slot(after).name + "}") + 1
        template.insert(pos, "{" + slot.name + "}")
        return dataclasses.replace(self, template=tuple(template), slots=self.slots + (slot,))


_EMOTIONS = ("<|emo:undefined|>", "<|emo:neutral|>", "<|emo:angry|>", "<|emo:happy|>", "<|emo:sad|>")
_TASKS = {
    "asr": "<|transcribe|>",
    "transcribe": "<|transcribe|>",
    "<|transcribe|>": "<|transcribe|>",
    "ast": "<|translate|>",
    "translate": "<|translate|>",
    "s2t_translation": "<|translate|>",
    "<|translate|>": "<|translate|>",
}


def default_task(resolved: Mapping[str, str]) -> str:
    """canary-1b's task when none is given: transcribe (`asr`) when the source and target
    languages are equal, else translate (`ast`)."""
    return "asr" if resolved["source_lang"] == resolved["target_lang"] else "ast"


# canary-1b: <|startoftranscript|><|src|><|transcribe|/|translate|><|tgt|><|pnc|/|nopnc|>
# NeMo 3.0.0's transcribe() fills a missing `taskname` with "asr" and `pnc` with "yes"
# (EncDecMultiTaskModel._may_be_make_dict_and_fix_paths); the task here follows the languages instead.
CANARY = PromptFormat(
    name="canary",
    template=(BOS, "{source_lang}", "{task}", "{target_lang}", "{pnc}"),
    slots=(
        Slot("source_lang", "lang"),
        Slot("task", "choice", choices=_TASKS, derive_default=default_task),
        Slot("target_lang", "lang"),
        Slot("pnc", "bool", default="yes"),
    ),
    aliases={"taskname": "task"},  # older Canary manifests
)

# canary-1b-flash / 180m-flash / 1b-v2:
# <|startofcontext|>CONTEXT<|startoftranscript|><|emo|><|src|><|tgt|><|pnc|><|itn|><|timestamp|><|diarize|>
CANARY2 = PromptFormat(
    name="canary2",
    template=(
        "<|startofcontext|>",
        "{decodercontext}",
        BOS,
        "{emotion}",
        "{source_lang}",
        "{target_lang}",
        "{pnc}",
        "{itn}",
        "{timestamp}",
        "{diarize}",
    ),
    slots=(
        Slot("decodercontext", "text", default=""),
        Slot("emotion", "choice", default="<|emo:undefined|>", choices={e: e for e in _EMOTIONS}),
        Slot("source_lang", "lang"),
        Slot("target_lang", "lang"),
        Slot("pnc", "bool", default="yes"),
        Slot("itn", "bool", default="no"),
        Slot("timestamp", "bool", default="no"),
        Slot("diarize", "bool", default="no"),
    ),
)

FORMATS = {f.name: f for f in (CANARY, CANARY2)}


def get_format(fmt: str | PromptFormat) -> PromptFormat:
    if isinstance(fmt, PromptFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def select_slots(fmt: str | PromptFormat, entry: Mapping[str, object]) -> dict[str, object]:
    """The prompt slots found in a manifest entry (or lhotse `cut.custom`), other keys dropped.

    NeMo's prompt_format_fn likewise reads only its own slots from `cut.custom`, so entries may
    carry `text`, `lang`, `taskname` (canary2), ... alongside them.
    """
    fmt = get_format(fmt)
    return {k: v for k, v in entry.items() if k in fmt.slot_names or k in fmt.aliases}


def _lang_code(value: str) -> str:
    return value[2:-2] if value.startswith("<|") and value.endswith("|>") else value


def resolve_slots(tokenizer: Tokenizer, fmt: str | PromptFormat, slots: Mapping[str, object]) -> dict[str, str]:
    """Slot name -> the special token it becomes (or the raw text of a "text" slot), defaults filled in.

    Raises ValueError for an unknown slot name, a missing required slot, a value a slot does not
    accept, or a language without a token in `tokenizer`.
    """
    fmt = get_format(fmt)
    given: dict[str, object] = {}
    for name, value in slots.items():
        if name in IGNORED_SLOTS:
            continue
        if name in fmt.aliases:
            if fmt.aliases[name] in slots:
                continue  # as NeMo: the real name wins over its old alias
            name = fmt.aliases[name]
        if name not in fmt.slot_names:
            raise ValueError(
                f"unknown slot {name!r} for prompt format {fmt.name!r}; slots: {', '.join(fmt.slot_names)}"
            )
        given[name] = value

    out: dict[str, str] = {}
    derived = []
    for slot in fmt.slots:
        if given.get(slot.name) is None and slot.default is None and slot.derive_default is not None:
            derived.append(slot)  # after the slots it may depend on
            continue
        out[slot.name] = _resolve_value(tokenizer, fmt, slot, given.get(slot.name, slot.default))
    for slot in derived:
        out[slot.name] = _resolve_value(tokenizer, fmt, slot, slot.derive_default(dict(out)))
    return {slot.name: out[slot.name] for slot in fmt.slots}


def _resolve_value(tokenizer: Tokenizer, fmt: PromptFormat, slot: Slot, value: object) -> str:
    """One slot's token (or text) for `value`; ValueError when the slot does not take it."""
    if value is None:
        raise ValueError(f"prompt format {fmt.name!r} needs slot {slot.name!r} (it has no default)")
    if slot.kind == "bool" and isinstance(value, int) and value in (0, 1):
        value = "yes" if value else "no"  # convenience: Python/JSON booleans, and 0/1 as numbers
    if not isinstance(value, str):
        raise ValueError(f"slot {slot.name!r} takes a string, got {value!r}")
    if slot.kind == "text":
        return value
    if slot.kind == "lang":
        code = _lang_code(value)
        if code not in tokenizer.prompt_langs:
            raise ValueError(
                f"unknown language {value!r} for slot {slot.name!r}; this tokenizer has language tokens for: "
                f"{', '.join(tokenizer.prompt_langs)}"
            )
        return f"<|{code}|>"
    allowed = slot.allowed_values()
    if value not in allowed:
        raise ValueError(f"slot {slot.name!r} does not accept {value!r}; allowed: {', '.join(allowed)}")
    if slot.kind == "choice":
        return slot.choices[value]
    on, off = slot.bool_tokens
    return on if value in (*BOOL_ON, slot.name, on) else off


def encode_prompt(tokenizer: Tokenizer, fmt: str | PromptFormat, slots: Mapping[str, object]) -> list[int]:
    """The decoder prompt ids for `slots` (NeMo's `context_ids` at inference)."""
    fmt = get_format(fmt)
    values = resolve_slots(tokenizer, fmt, slots)
    parts = [values[p[1:-1]] if p.startswith("{") else p for p in fmt.template]
    if not isinstance(tokenizer, CanaryTokenizer):
        # Unified SentencePiece: the prompt is one string, as NeMo tokenises it.
        return tokenizer.text_to_ids("".join(parts))
    ids: list[int] = []
    for p, part in zip(fmt.template, parts):
        slot = fmt.slot(p[1:-1]) if p.startswith("{") else None
        if slot is not None and slot.kind == "text":
            if part:  # NeMo uses the target language's tokenizer for the context
                ids += tokenizer.text_to_ids(part, _lang_code(values[slot.text_lang]))
        else:
            ids.append(tokenizer.token_to_id(part))
    return ids


@dataclass
class PromptedExample:
    """One training example, as NeMo's prompt_format_fn + dataset build it.

    context_ids: the prompt.
    answer_ids: the transcript ids *without* EOS (NeMo's prompt_format_fn strips it).
    input_ids: context_ids + answer_ids + [EOS] (NeMo's `prompted_transcript`).
    mask: one bool per input id, True on the answer and its EOS.
    """

    context_ids: list[int]
    answer_ids: list[int]
    input_ids: list[int]
    mask: list[bool]


def encode_training_example(
    tokenizer: Tokenizer,
    fmt: str | PromptFormat,
    text: str,
    slots: Mapping[str, object],
    lang: str | None = None,
) -> PromptedExample:
    """Prompt + transcript for training. `lang` (the supervision's language) picks the aggregate's
    text tokenizer and defaults to the target language. A transcript holding `<|n|>` tokens gives
    timestamp-token targets (see `CanaryTokenizer.text_to_ids` for NeMo's positional rule)."""
    fmt = get_format(fmt)
    context = encode_prompt(tokenizer, fmt, slots)
    if lang is None:
        lang = _lang_code(resolve_slots(tokenizer, fmt, slots)["target_lang"])
    # NeMo tokenises "text<|endoftext|>" in one go; with the unified SPM that differs from
    # encode(text) + [eos] for an empty text (a lone "▁" piece comes first).
    full = tokenizer.text_to_ids(text + EOS, lang)
    if not full or full[-1] != tokenizer.eos_id:
        raise ValueError(f"transcript {text!r} did not encode to ids ending with {EOS}: {full}")
    answer = full[:-1]
    return PromptedExample(
        context_ids=context,
        answer_ids=answer,
        input_ids=context + full,
        mask=[False] * len(context) + [True] * len(full),
    )
