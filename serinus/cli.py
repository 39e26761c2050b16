"""`serinus` command line: `serinus COMMAND [options]`, and the `transcribe` command itself.

Each other command lives in the module that does its work and exposes `main(argv) -> int`;
modules are imported only when their command runs, so `serinus --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> ("module" or "module:function", one-line description); the function defaults to main
COMMANDS = {
    "transcribe": ("serinus.cli:transcribe_main", "Transcribe or translate audio files, folders or manifests."),
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
    module, _, function = COMMANDS[name][0].partition(":")
    return int(getattr(importlib.import_module(module), function or "main")(argv[1:]) or 0)


# -- serinus transcribe ------------------------------------------------------------------------

DESCRIPTION = """\
Transcribe or translate audio with a Canary model.

INPUT may be audio files, folders (searched recursively for audio files), glob patterns
(quote them: 'talks/*.mp3') or NeMo JSONL manifests (.json/.jsonl; relative audio paths are
taken relative to the manifest's folder, and each line's source_lang/target_lang/pnc/... are
used unless given here). Audio longer than 40 s is cut into 30-40 s chunks with 1 s overlap
and merged; audio over an hour is processed one hour at a time.

Results are written as they complete (longest files first), so an interrupted run keeps what
it finished; run again with --resume to skip what the output already holds. Files that cannot
be transcribed are reported on stderr and at the end; the exit status is then 1."""

EPILOG = """\
output formats:
  txt    one line per input: AUDIO_PATH<TAB>TEXT
  jsonl  one JSON object per input: the manifest line (or audio_filepath and duration) plus
         "pred_text" (and "word"/"segment" timestamps with --timestamps)
  srt    SubRip subtitles from segment timestamps (implies --timestamps); --output is a folder
  vtt    WebVTT subtitles, likewise                 (or a file when there is a single input)

exit status: 0 all inputs transcribed, 1 some failed, 2 bad usage or model, 130 interrupted.

examples:
  serinus transcribe talk.wav
  serinus transcribe recordings/ --source-lang de --target-lang en -o out.jsonl --format jsonl
  serinus transcribe manifest.jsonl --model nvidia/canary-1b-flash --batch-size 16 --device cuda
  serinus transcribe 'lectures/*.mp3' --format srt -o subtitles/ --resume"""


def build_transcribe_parser() -> argparse.ArgumentParser:
    from serinus.pipeline.options import CHUNK_MERGES

    p = argparse.ArgumentParser(prog="serinus transcribe", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders, glob patterns or JSONL manifests")
    p.add_argument("-m", "--model", default="nvidia/canary-1b-v2",
                   help="a Hugging Face Hub id (nvidia/canary-1b-v2, nvidia/canary-1b-flash, nvidia/canary-180m-flash, "
                        "nvidia/canary-1b; downloaded once into the Hugging Face cache, HF_HUB_OFFLINE=1 honoured), "
                        "a .nemo file, or a folder written by save_pretrained (default: %(default)s)")
    g = p.add_argument_group("task")
    g.add_argument("--source-lang", help="language spoken in the audio (default: the manifest's, else en)")
    g.add_argument("--target-lang", help="language to write; differs from --source-lang for translation "
                                         "(default: the manifest's, else en)")
    g.add_argument("--pnc", choices=["yes", "no"], help="punctuation and capitals (default: the manifest's, else yes)")
    g.add_argument("--timestamps", action="store_true", help="word and segment timestamps (jsonl output, srt/vtt)")
    g.add_argument("--slot", action="append", default=[], metavar="NAME=VALUE",
                   help="any other prompt slot, e.g. --slot itn=yes --slot decodercontext='...' (repeatable)")
    g = p.add_argument_group("decoding")
    g.add_argument("--beam-size", type=int, help="1 = greedy (default: the checkpoint's decoding config)")
    g.add_argument("--batch-size", type=int, default=4, help="encoder rows per batch (default: %(default)s)")
    g.add_argument("--no-chunking", action="store_true", help="decode long audio whole instead of in 30-40 s chunks")
    g.add_argument("--no-speculative", action="store_true",
                   help="greedy float32 on a CPU: one token per decoder pass, without the int8 draft (same tokens)")
    g.add_argument("--chunk-merge", choices=CHUNK_MERGES, default="auto",
                   help="how chunks are joined: nemo = NeMo's LCS merge exactly, overlap = Serinus' merge that keeps "
                        "every word once, auto = nemo for canary-1b-v2 style checkpoints, else overlap")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "float16"], default="float32",
                   help="precision: bfloat16 = weights and compute (GPU, or a CPU with AVX-512 BF16/AMX), int8 = "
                        "dynamically quantised Linear layers (CPU) (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", help="output file (folder for srt/vtt with several inputs); default: stdout")
    g.add_argument("-f", "--format", choices=["txt", "jsonl", "srt", "vtt"], default=None,
                   help="output format (default: from the --output extension, else txt)")
    g.add_argument("--resume", action="store_true", help="skip inputs already in --output, append the rest")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _parse_slots(parser, values: list[str]) -> dict:
    slots = {}
    for value in values:
        name, sep, val = value.partition("=")
        if not sep or not name:
            parser.error(f"--slot takes NAME=VALUE, got {value!r}")
        slots[name.strip()] = val
    return slots


def transcribe_main(argv: list[str] | None = None) -> int:
    """`serinus transcribe`: exit status 0 all inputs transcribed, 1 some failed, 2 bad usage or model, 130 interrupted."""
    import torch

    from serinus import output
    from serinus.transcribe import Item, TranscribeError, can_timestamp, collect_items, transcribe

    parser = build_transcribe_parser()
    args = parser.parse_args(argv)
    fmt = args.format or output.format_from_path(args.output)
    slots = _parse_slots(parser, args.slot)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.beam_size is not None and args.beam_size < 1:
        parser.error("--beam-size must be >= 1")
    if args.resume and not args.output:
        parser.error("--resume needs --output")

    items = collect_items(args.inputs)
    try:
        writer = output.open_writer(args.output, fmt, items, resume=args.resume)
    except output.OutputError as e:
        print(f"serinus transcribe: error: {e}", file=sys.stderr)
        return 2
    skipped = [item for item in items if writer.is_done(item)]
    todo = [item for item in items if not writer.is_done(item)]

    try:
        from serinus.checkpoint import load_model

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model = load_model(args.model, device=device, dtype=args.dtype if args.dtype != "float16" else "float32")
        if args.dtype == "float16":
            model = model.to(torch.float16)
    except Exception as e:  # CheckpointError, a bad --device, ...
        print(f"serinus transcribe: error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        writer.close()
        return 2
    timestamps = True if (args.timestamps or fmt in ("srt", "vtt")) else None
    if timestamps and not can_timestamp(model):
        print(f"serinus transcribe: error: {args.model} gives no timestamps (no packed aligner, no frame tokens); "
              f"--timestamps and --format {fmt} need them", file=sys.stderr)
        writer.close()
        return 2

    failures: list[str] = []
    n_done = 0

    def on_result(item: Item, hyp):
        nonlocal n_done
        error = hyp.error
        if error is None:
            error = writer.write(item, hyp)
        if error is not None:
            failures.append(error)
            print(f"serinus transcribe: failed: {error}", file=sys.stderr)
        else:
            n_done += 1
            for warning in hyp.warnings:
                print(f"serinus transcribe: warning: {item.name}: {warning}", file=sys.stderr)

    try:
        transcribe(model, todo, batch_size=args.batch_size, source_lang=args.source_lang,
                   target_lang=args.target_lang, pnc=args.pnc, timestamps=timestamps, beam_size=args.beam_size,
                   speculative=not args.no_speculative, enable_chunking=not args.no_chunking,
                   chunk_merge=args.chunk_merge, progress=not args.quiet,
                   on_result=on_result, **slots)
    except TranscribeError as e:
        print(f"serinus transcribe: error: {e}", file=sys.stderr)
        writer.close()
        return 2
    except KeyboardInterrupt:
        writer.close()
        print(f"\nserinus transcribe: interrupted after {n_done} file(s); run again with --resume to continue",
              file=sys.stderr)
        return 130
    writer.close()
    summary = f"serinus transcribe: {n_done} file(s) transcribed"
    if skipped:
        summary += f", {len(skipped)} already in {args.output} (skipped)"
    if failures:
        summary += f", {len(failures)} failed:\n" + "\n".join(f"  {f}" for f in failures)
    print(summary, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
