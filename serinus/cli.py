"""`serinus` command line: `serinus COMMAND [options]`.

Each command lives in the module that does its work and exposes `main(argv) -> int`;
modules are imported only when their command runs, so `serinus --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line description)
COMMANDS = {
    "transcribe": ("serinus.transcribe", "Transcribe or translate audio files, folders or manifests."),
    "align": ("serinus.align", "Forced-align a given transcript to audio (word/segment times)."),
    "manifest": ("serinus.data.manifest", "Build and check NeMo JSONL manifests."),
    "tokenizer": ("serinus.data.tokenizers", "Build Canary tokenizers (special tokens, per-language, unified)."),
    "buckets": ("serinus.data.bucketing", "Estimate 2-D (duration x tokens) bucket bins from a manifest."),
    "oomptimize": ("serinus.data.oomptimizer", "Find the largest batch size per bucket within a memory budget."),
    "pack-aligner": ("serinus.checkpoint", "Pack a CTC model into a Canary checkpoint as its timestamp aligner."),
    "export": ("serinus.nemo_export", "Write a model as a .nemo archive that NeMo restores."),
    "train": ("serinus.train", "Train or fine-tune a Canary model from a YAML config with dotted overrides."),
    "serve": ("serinus.serve.server", "An OpenAI-compatible transcription/translation server (needs serinus[serve])."),
}


def _usage() -> str:
    lines = ["usage: serinus COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `serinus COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from serinus import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"serinus: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
