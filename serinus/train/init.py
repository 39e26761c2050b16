"""Initialising a model from a checkpoint (fine-tuning): which tensors to copy, and token rows.

    init_from.include / exclude   name prefixes (Serinus names), or NeMo's substring rule on NeMo's
                                  names (init_from.match = nemo_substring, the seed's `exclude` lists)
    a different tokenizer         the rows of the token-indexed tensors (embedding, output bias, CTC
                                  head) are copied for every piece both vocabularies have, to its new
                                  id; rows of new pieces keep their fresh initialisation

The report lists the tensors loaded, skipped (by the rules) and new (absent from the checkpoint),
and how many token rows were kept; the loop prints it and writes it to the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from serinus.train.config import ConfigError


def selected(name: str, include: list[str], exclude: list[str], match: str = "prefix") -> bool:
    if match == "nemo_substring":  # NeMo's rule, on NeMo's names for this parameter
        return nemo_selected(name, include, exclude)
    if any(name.startswith(p) for p in exclude):
        return False
    return not include or any(name.startswith(p) for p in include)


def nemo_names(name: str) -> list[str]:
    """The NeMo parameter name(s) of a Serinus one; the tied token embedding is also the head's weight."""
    from serinus.weights import rename

    nemo = rename(name, to_nemo=True)
    return [nemo, "log_softmax.mlp.layer0.weight"] if name == "decoder.token_embedding.weight" else [nemo]


def nemo_selected(name: str, include, exclude) -> bool:
    """NeMo's rule (ModelPT.load_part_of_state_dict) on a Serinus parameter: a NeMo name of it contains an
    include string (none given: all) and no exclude string."""
    def chosen(n):
        return (not include or any(p in n for p in include)) and not any(e in n for e in exclude)

    return any(chosen(n) for n in nemo_names(name))


def init_weights(model, state: dict, include: list[str], exclude: list[str], where: str,
                 match: str = "prefix") -> list[str]:
    """Copy the selected parameters of `state` into `model`; returns their names.

    A selected name the model lacks, or with another shape, is an error: exclude it explicitly
    (e.g. `decoder.token_embedding`, `decoder.head_bias` for a new tokenizer)."""
    own = model.state_dict()
    chosen = {k: v for k, v in state.items() if selected(k, include, exclude, match)}
    if not chosen:
        raise ConfigError(f"init_from: no parameter of {where} matches include={include} exclude={exclude}")
    absent = [k for k in chosen if k not in own]
    if absent:
        raise ConfigError(f"init_from: {where} has {', '.join(absent[:5])}, which this model does not; "
                          "add them to init_from.exclude")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)} here" for k, v in chosen.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"init_from: shapes differ from {where}: {'; '.join(bad[:5])}; add them to init_from.exclude")
    model.load_state_dict(chosen, strict=False)
    return sorted(chosen)


# -- token rows ---------------------------------------------------------------------------------

def piece_keys(tokenizer) -> list[tuple[str, str]]:
    """One key per token id: (sub-tokenizer, piece) for NeMo's aggregate tokenizer (the same piece in two
    languages is two tokens), ("", piece) for a single SentencePiece model."""
    offsets = getattr(tokenizer, "token_id_offset", None)
    if offsets is None:
        return [("", p) for p in tokenizer.vocab]
    keys = []
    for lang, offset in offsets.items():
        keys += [(lang, tokenizer.vocab[offset + i]) for i in range(tokenizer.sub_vocab_sizes[lang])]
    return keys


def token_row_tensors(model) -> dict[str, int]:
    """Names of the tensors indexed by token id (dim 0) -> where the CTC blank row is (-1: none).
    Decoder embedding (tied output weight) and output bias; the CTC head's rows are vocab + blank."""
    names = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "token_embedding"):
        names.update({"decoder.token_embedding.weight": -1, "decoder.head_bias": -1})
        if getattr(model, "ctc_head", None) is not None:
            blank = model.ctc_head.weight.shape[0] - 1
            names.update({"ctc_head.weight": blank, "ctc_head.bias": blank})
    elif hasattr(model, "head"):  # a CTC model: 1x1 conv over vocabulary + blank
        blank = model.head.weight.shape[0] - 1
        names.update({"head.weight": blank, "head.bias": blank})
    return names


@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # copied whole
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> (token rows kept, rows)
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, left out by include/exclude
    new: list[str] = field(default_factory=list)  # in this model only: freshly initialised
    new_pieces: list[str] = field(default_factory=list)  # tokens without a row in the checkpoint

    def text(self) -> str:
        lines = [f"init_from {self.source}: {len(self.loaded)} tensors loaded, {len(self.rows)} loaded by token "
                 f"row, {len(self.skipped)} skipped (include/exclude), {len(self.new)} new"]
        for name, (kept, total) in self.rows.items():
            lines.append(f"  {name}: {kept} of {total} token rows kept (pieces in both vocabularies)")
        if self.new_pieces:
            shown = ", ".join(self.new_pieces[:12]) + (" ..." if len(self.new_pieces) > 12 else "")
            lines.append(f"  new tokens ({len(self.new_pieces)}), freshly initialised: {shown}")
        for title, names in (("skipped", self.skipped), ("new", self.new)):
            if names:
                lines.append(f"  {title}: " + ", ".join(names[:12]) + (" ..." if len(names) > 12 else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "loaded": self.loaded, "skipped": self.skipped, "new": self.new,
                "token_rows": {k: {"kept": a, "rows": b} for k, (a, b) in self.rows.items()},
                "new_pieces": self.new_pieces}


def init_from_model(model, init, include: list[str], exclude: list[str], where: str,
                    match: str = "prefix") -> InitReport:
    """Initialise `model` from the model `init` (include/exclude rules); when the two tokenizers differ,
    the token-indexed tensors are copied row by row for the pieces both have."""
    state, own = init.state_dict(), model.state_dict()
    report = InitReport(where)
    rows = token_row_tensors(model)
    new_tok, old_tok = getattr(model, "tokenizer", None), getattr(init, "tokenizer", None)
    new_keys = piece_keys(new_tok) if new_tok is not None else None
    old_keys = piece_keys(old_tok) if old_tok is not None else None
    remap = new_keys is not None and old_keys is not None and new_keys != old_keys
    chosen = [k for k in state if selected(k, include, exclude, match)]
    report.skipped = sorted(k for k in state if k not in chosen)
    by_row = [k for k in chosen if remap and k in rows and k in own]
    plain = [k for k in chosen if k not in by_row]
    if plain:
        report.loaded = init_weights(model, {k: state[k] for k in plain}, [], [], where)
    elif not by_row:
        raise ConfigError(f"init_from: no parameter of {where} matches include={include} exclude={exclude}")
    if by_row:
        old_index = {key: i for i, key in enumerate(old_keys)}
        pairs = [(i, old_index[key]) for i, key in enumerate(new_keys) if key in old_index]
        report.new_pieces = [key[1] for key in new_keys if key not in old_index]
        dst = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        src = torch.tensor([j for _, j in pairs], dtype=torch.long)
        with torch.no_grad():
            for name in by_row:
                target, source = own[name], state[name].to(own[name].dtype)
                if tuple(target.shape[1:]) != tuple(source.shape[1:]):
                    raise ConfigError(f"init_from: {name} has shape {tuple(source.shape)} in {where} and "
                                      f"{tuple(target.shape)} here; add it to init_from.exclude")
                target[dst] = source[src]
                if rows[name] >= 0:  # the CTC blank is the last row on both sides
                    target[rows[name]] = source[source.shape[0] - 1]
                report.rows[name] = (len(pairs), len(new_keys))
    report.new = sorted(k for k in own if k not in state)
    return report


def load_init_model(path: str):
    """The model to initialise from: a Canary (.nemo / Serinus folder) or a CTC model."""
    from serinus.checkpoint import load_any

    return load_any(path)
