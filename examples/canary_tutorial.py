#!/usr/bin/env python
"""NeMo's Canary tutorial notebook, every step, in Serinus, in the notebook's order.

    python examples/canary_tutorial.py --fast                 # tiny sizes, < 3 min on a 2-core CPU
    python examples/canary_tutorial.py --model nvidia/canary-1b-v2 --flash-model nvidia/canary-180m-flash

Each step prints a header `## Step N: title`, the NeMo call it replaces, and its real result:

  0    the data: a LibriSpeech-style tree (the notebook downloads LibriLight) built from synth-v1
  1.x  inference with canary-1b-v2 (`--model`): ASR, En->X translation, word/segment timestamps,
       a long-form file stitched from one chapter's utterances, with and without timestamps
  2    the training manifest from the LibriSpeech-style tree (`serinus manifest build`)
  3.x  the special-token and the English tokenizer (`serinus tokenizer special/train`), the prompt
  4    a 2+2-layer model trained from scratch for 10 steps (`serinus train --config ... overrides`)
  5.x  the fine-tuning config built from canary-180m-flash (`--flash-model`): its tokenizers
       (`save_tokenizers`), prompt format and architecture, `init_from`; a 10-step fine-tune
  6.x  new tasks: decoder context, timestamp targets, a `summarize` slot with rebuilt special
       tokens and retained token embeddings; which checkpoint weights to load (include/exclude)
  7    2-D bucket bins (`serinus buckets estimate`)
  8    OOMptimizer (`serinus oomptimize`)
  9    prompt-loss masking: the loss of one batch with use_loss_mask_for_prompt false / true

Without `--model` / `--flash-model` the tiny NeMo-made fixture checkpoints of the same kinds are
used (`shared/fixtures/nemo/tiny_canary2_v2style.nemo`: canary-1b-v2 layout with its CTC aligner;
`tiny_canary2.nemo`: canary-180m-flash layout). They know nine sentences, so their transcripts of
other audio are one of those sentences; the plumbing is what this shows. shared/ is `../shared`
next to the repository, or `$SERINUS_SHARED`. Everything is written under `--out-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def short(path) -> Path:
    """`path` relative to the working directory when that is at most one level up, else absolute
    (so printed commands read like the ones a user types)."""
    rel = os.path.relpath(Path(path).absolute())
    return Path(rel) if not rel.startswith(os.path.join("..", "..")) else Path(path).absolute()


REPO = Path(__file__).resolve().parents[1]
SHARED = short(os.environ.get("SERINUS_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "nemo"
SYNTH = SHARED / "data" / "synth-v1"

# Sizes: --fast keeps everything tiny; the default run is somewhat larger.
SIZES = {
    True: dict(chapter_seconds=42.0, other_utts=16, vocab=128, d_enc=64, d_dec=64, val_limit=2, batch_duration=15,
               buckets=2, sub_buckets=2, max_duration=None, oom_max_batch=4, new_task_steps=5),
    False: dict(chapter_seconds=75.0, other_utts=None, vocab=256, d_enc=128, d_dec=128, val_limit=8, batch_duration=60,
                buckets=8, sub_buckets=2, max_duration=40.0, oom_max_batch=32, new_task_steps=20),
}

# Hand-written "summaries" of three fixture clips, for the summarization recipe (step 6.3).
SUMMARIES = {
    "en_01.wav": "A fox jumps over a dog.",
    "en_02.wav": "The meeting is late.",
    "en_03.wav": "The report is due on Friday.",
}


# ---------------------------------------------------------------------------------------------
# printing and running commands


_STARTS: list[tuple[str, float]] = []  # (step, start time), for the timing summary at the end


def header(step: str, title: str, nemo: str) -> None:
    _STARTS.append((step, time.time()))
    print(f"\n{'=' * 100}\n## Step {step}: {title}\n   NeMo: {nemo}\n{'=' * 100}", flush=True)


def timing_summary() -> str:
    ends = [t for _, t in _STARTS[1:]] + [time.time()]
    return "  ".join(f"{step} {end - start:.0f}s" for (step, start), end in zip(_STARTS, ends))


class _Tee(io.TextIOBase):
    """Write to the real stdout and keep a copy (to read results back from a command's output)."""

    def __init__(self, out):
        self.out, self.buf = out, io.StringIO()

    def write(self, s):
        self.out.write(s)
        self.buf.write(s)
        return len(s)

    def flush(self):
        self.out.flush()


def _shown(argv: list[str]) -> str:
    return " ".join(a if re.fullmatch(r"[\w@%+=:,./-]+", a) else repr(a) for a in argv)


def serinus(*argv) -> str:
    """Run `serinus ARGV` in this process (the CLI's own code) and return what it printed."""
    from serinus.cli import main

    argv = [str(a) for a in argv]
    print(f"$ serinus {_shown(argv)}", flush=True)
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"serinus {argv[0]} failed with exit status {rc}")
    return tee.buf.getvalue()


def serinus_subprocess(*argv) -> str:
    """Run `serinus ARGV` as its own process (for measurements of a process's own memory)."""
    argv = [str(a) for a in argv]
    print(f"$ serinus {_shown(argv)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "serinus.cli", *argv], capture_output=True, text=True)
    sys.stdout.write(proc.stderr + proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"serinus {argv[0]} failed with exit status {proc.returncode}")
    return proc.stdout


def line_value(text: str, key: str):
    """The JSON value after `key:` on the first line that starts with it."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return json.loads(line[len(key) + 1 :].split("  (")[0])
    raise SystemExit(f"no {key!r} line in the output")


# ---------------------------------------------------------------------------------------------
# step 0: data


def librispeech_text(text: str) -> str:
    """LibriSpeech transcript style: upper case, no punctuation but apostrophes."""
    return " ".join(re.sub(r"[^\w' ]", " ", text).upper().split())


def build_librispeech_tree(root: Path, sizes: dict) -> list[dict]:
    """`<spk>/<chapter>/<spk>-<chapter>-<utt>.flac` + `<spk>-<chapter>.trans.txt` from synth-v1 English.

    The first chapter holds at least `chapter_seconds` of audio (for the long-form step), the rest
    chapters of 8 utterances. Utterances with digits are left out: LibriSpeech spells numbers out.
    """
    lines = [json.loads(x) for x in open(SYNTH / "asr_train.jsonl", encoding="utf-8")]
    en = [x for x in lines if x["source_lang"] == "en" and not re.search(r"\d", x["text"])]
    chapters, current, total = [], [], 0.0
    for x in en:
        current.append(x)
        total += x["duration"]
        if (not chapters and total >= sizes["chapter_seconds"]) or (chapters and len(current) == 8):
            chapters.append(current)
            current = []
        if chapters and sizes["other_utts"] is not None and sum(map(len, chapters[1:])) >= sizes["other_utts"]:
            break
    if current and (sizes["other_utts"] is None):
        chapters.append(current)
    if root.exists():
        shutil.rmtree(root)
    utts = []
    for k, chapter in enumerate(chapters):
        spk, chap = str(1001 + k // 2), str(100001 + k)
        d = root / spk / chap
        d.mkdir(parents=True)
        trans = []
        for u, x in enumerate(chapter):
            utt_id = f"{spk}-{chap}-{u:04d}"
            shutil.copyfile(SYNTH / x["audio_filepath"], d / f"{utt_id}.flac")
            trans.append(f"{utt_id} {librispeech_text(x['text'])}\n")
            utts.append({"path": d / f"{utt_id}.flac", "text": x["text"], "duration": x["duration"], "chapter": k})
        (d / f"{spk}-{chap}.trans.txt").write_text("".join(trans), encoding="utf-8")
    return utts


# ---------------------------------------------------------------------------------------------
# helpers for the recipes


def print_sentences_per_item(items) -> None:
    """The notebook's printout of long-form results, one sentence a line."""
    for i, item in enumerate(items, 1):
        text = item.text if hasattr(item, "text") else str(item)
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        print(f"--- Audio {i} ---")
        for s in sentences:
            print(s if s[-1] in ".!?" else s + ".")
        print()


def print_word_timestamps(hyp) -> None:
    print("\nWord level timestamps:")
    for sample in hyp.timestamp["word"]:
        word, start, end = sample["word"], sample["start"], sample["end"]
        print(f"{word:<15}[{start:.2f}s, {end:.2f}s]")


def pieces_of(tokenizer, ids) -> str:
    return " ".join(tokenizer.ids_to_tokens(ids))


def batch_loss(model, batch, pad_id: int, prompt_mask: bool):
    """Teacher-forced loss of a PromptedBatch, with or without the prompt-loss mask."""
    import torch

    from serinus.model.canary import sequence_loss

    inputs, labels = batch.decoder_inputs_outputs()
    lengths = batch.prompted_transcript_lens - 1
    with torch.set_grad_enabled(model.training):
        log_probs = model(batch.audio, batch.audio_lens, inputs, lengths)
    loss = sequence_loss(log_probs, labels, pad_id, batch.prompt_lens if prompt_mask else None, lengths)
    return loss


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """A manifest; audio paths are written relative to its folder (as NeMo resolves them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "audio_filepath": os.path.relpath(Path(r["audio_filepath"]).absolute(), path.parent.absolute())}
            for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# the tutorial


def run(args) -> None:
    import numpy as np
    import soundfile as sf
    import torch
    import yaml

    import serinus as S
    from serinus.data.dataset import PromptedDataset
    from serinus.data.manifest import manifest_to_cuts
    from serinus.prompt import CANARY2, Slot, encode_prompt, encode_training_example, select_slots
    from serinus.tokenizer import CanaryTokenizer

    sizes = SIZES[args.fast]
    out = short(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # -- 0. data --------------------------------------------------------------------------------
    header("0", "Data: a LibriSpeech-style tree (the notebook downloads LibriLight's 1 h split)",
           "download_and_prepare_librilight_data()")
    libri = out / "datasets" / "LibriLight" / "librispeech_finetuning" / "1h" / "0" / "clean"
    utts = build_librispeech_tree(libri, sizes)
    n_ch = 1 + max(u["chapter"] for u in utts)
    print(f"{len(utts)} utterances ({sum(u['duration'] for u in utts):.1f} s) in {n_ch} chapters "
          f"from synth-v1 English, LibriSpeech layout, at {libri}")
    first = utts[0]
    print(f"e.g. {first['path'].relative_to(out)}  reference: {first['text']!r}")

    # -- 1. inference with canary-1b-v2 ---------------------------------------------------------
    header("1.1", f"Load model ({args.model})",
           "EncDecMultiTaskModel.from_pretrained('nvidia/canary-1b-v2', map_location=map_location)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    canary_model = S.CanaryModel.from_pretrained(str(args.model), device=device)
    cfg = canary_model.cfg
    n_params = sum(p.numel() for p in canary_model.parameters())
    print(f"canary_model = serinus.CanaryModel.from_pretrained({str(args.model)!r}, device={device!r})")
    print(f"{n_params / 1e6:.2f} M parameters; encoder {cfg.encoder.n_layers}x{cfg.encoder.d_model}, "
          f"decoder {cfg.decoder.num_layers}x{cfg.decoder.hidden_size}, prompt {cfg.prompt_format}, "
          f"tokenizer {type(canary_model.tokenizer).__name__} ({canary_model.tokenizer.vocab_size} tokens), "
          f"CTC aligner for timestamps: {'yes' if canary_model.aligner is not None else 'no'}")

    audio_path = str(args.audio or first["path"])
    header("1.2", "Speech-to-text recognition",
           "canary_model.transcribe(audio=[audio_path], batch_size=1, source_lang='en', target_lang='en')")
    transcript = canary_model.transcribe(audio=[audio_path], batch_size=1, source_lang="en", target_lang="en")
    print(f"audio: {audio_path}" + ("" if args.audio else f"  (reference: {first['text']!r})"))
    print("\n\nEnglish speech recognition:")
    print(f'  "{transcript[0].text}"')

    header("1.3", "Speech-to-text translation (En->Es)",
           "canary_model.transcribe(audio=[audio_path], batch_size=1, source_lang='en', target_lang='es')")
    transcript = canary_model.transcribe(audio=[audio_path], batch_size=1, source_lang="en", target_lang="es")
    print("\n\nSpeech to text translation form English to Spanish with punctuations and capitalizations:")
    print(f'  "{transcript[0].text}"')

    header("1.4", "Timestamp prediction (word and segment)",
           "canary_model.transcribe(audio=[audio_path], source_lang='en', target_lang='en', timestamps=True)")
    transcript = canary_model.transcribe(audio=[audio_path], batch_size=1, source_lang="en", target_lang="en",
                                         timestamps=True)
    how = ("forced alignment with the packed CTC aligner (Viterbi)" if canary_model.aligner is not None
           else "timestamp tokens written by the decoder")
    print(f"\n\nEnglish speech to text recognition with timestamp prediction ({how}):\n")
    print(f'Predicted output: \n"{transcript[0].text}"')
    print("\nSegment level timestamps:")
    for sample in transcript[0].timestamp["segment"]:
        segment, start, end = sample["segment"], sample["start"], sample["end"]
        print(f"{segment}")
        print(f"Segment start: {start:.2f}s")
        print(f"Segment end: {end:.2f}s\n")
    print_word_timestamps(transcript[0])

    header("1.5", "Create a long-form audio sample (one chapter's utterances stitched together)",
           "get_longform_audio_sample()  # librosa.load + sf.write of 3526-175658-*.flac")
    chapter = sorted((u for u in utts if u["chapter"] == 0), key=lambda u: u["path"].name)
    data = [sf.read(str(u["path"]), dtype="float32")[0] for u in chapter]
    stem = "-".join(chapter[0]["path"].name.split("-")[:2])
    longform_audio_path = out / "datasets" / "LibriLight" / "longform" / f"{stem}.wav"
    longform_audio_path.parent.mkdir(parents=True, exist_ok=True)
    longform = np.concatenate(data)
    sf.write(str(longform_audio_path), longform, 16000)
    minutes, seconds = divmod(len(longform) / 16000, 60)
    print(f"{int(minutes)} min {int(seconds)} sec audio file saved at {longform_audio_path} "
          f"({len(chapter)} utterances)")

    header("1.6", "Long-form inference without timestamps (30-40 s chunks, merged)",
           "canary_model.transcribe(audio=[longform_audio_path], batch_size=1, source_lang='en', target_lang='en')")
    t0 = time.time()
    transcript = canary_model.transcribe(audio=[str(longform_audio_path)], batch_size=1,
                                         source_lang="en", target_lang="en")
    print(f"({time.time() - t0:.1f} s)")
    print_sentences_per_item(transcript)

    header("1.7", "Long-form inference with timestamps",
           "canary_model.transcribe(audio=[longform_audio_path], ..., timestamps=True)")
    t0 = time.time()
    transcript = canary_model.transcribe(audio=[str(longform_audio_path)], batch_size=1,
                                         source_lang="en", target_lang="en", timestamps=True)
    print(f"({time.time() - t0:.1f} s; {len(transcript[0].timestamp['word'])} words, "
          f"{len(transcript[0].timestamp['segment'])} segments)")
    print_word_timestamps(transcript[0])
    del canary_model

    # -- 2. manifest ----------------------------------------------------------------------------
    header("2", "Prepare the training manifest from the LibriSpeech-style tree",
           "build_manifest(data_dir, train_manifest)  # glob *.txt, librosa durations, lower-case, pnc False")
    train_manifest = out / "datasets" / "LibriLight" / "train_manifest.json"
    serinus("manifest", "build", libri, train_manifest)
    rows = [json.loads(x) for x in train_manifest.read_text().splitlines()]
    total = sum(r["duration"] for r in rows)
    print(f"{len(rows)} lines, {total:.1f} s of audio; first line:\n{json.dumps(rows[0])}")
    serinus("manifest", "check", train_manifest, "--langs", "en")

    # -- 3. tokenizers and prompt ---------------------------------------------------------------
    tok_dir = out / "tokenizers"
    header("3.1", "Build the tokenizer for special tokens",
           "python scripts/build_canary_2_special_tokenizer.py tokenizers/spl_tokens")
    serinus("tokenizer", "special", tok_dir / "spl_tokens")
    first_tokens = (tok_dir / "spl_tokens" / "train_text.txt").read_text().split("\n")[:12]
    print("first special tokens:", " ".join(first_tokens))

    header("3.2", "Build the language-specific (English) tokenizer",
           f"python scripts/process_asr_text_tokenizer.py --data_file=train_text.lst "
           f"--vocab_size={sizes['vocab']} --tokenizer=spe --spe_type=bpe --no_lower_case")
    en_out = serinus("tokenizer", "train", tok_dir / "en", "--manifest", train_manifest, "--lang", "en",
                     "--vocab-size", sizes["vocab"])
    en_model = Path(en_out.strip().splitlines()[-1]) / "tokenizer.model"
    tokenizer = CanaryTokenizer({"spl_tokens": tok_dir / "spl_tokens" / "tokenizer.model", "en": en_model})
    sample = rows[0]["text"]
    print(f"aggregate tokenizer: {tokenizer.sub_vocab_sizes} -> {tokenizer.vocab_size} tokens")
    print(f"{sample!r} -> {tokenizer.text_to_tokens(sample, 'en')}")

    header("3.3", "Prompt format (canary2)", "model.prompt_format='canary2'  (Canary2PromptFormatter)")
    prompt = encode_prompt(tokenizer, CANARY2, {"source_lang": "en", "target_lang": "en", "pnc": rows[0]["pnc"]})
    print(f"decoder prompt for the training lines (pnc={rows[0]['pnc']}):")
    print("".join(tokenizer.ids_to_tokens(prompt)))

    # -- 4. train from scratch ------------------------------------------------------------------
    header("4", "Train a 2-layer encoder, 2-layer decoder Canary from scratch (10 steps)",
           "python scripts/speech_to_text_aed.py --config-name=fast-conformer_aed.yaml "
           "model.encoder.n_layers=2 model.transf_decoder.config_dict.num_layers=2 trainer.max_steps=10 ...")
    small_dir = out / "canary_results" / "canary-small"
    if small_dir.exists():
        shutil.rmtree(small_dir)
    serinus(
        "train", "--config", short(REPO / "configs" / "canary_tiny.yaml"),
        "model.prompt_format=canary2",
        f"train_ds.manifest_filepath={train_manifest}",
        f"validation_ds.manifest_filepath={train_manifest}", f"validation_ds.limit={sizes['val_limit']}",
        f"tokenizer.dir={tok_dir}",
        "model.encoder.n_layers=2", "model.decoder.num_layers=2",
        f"model.encoder.d_model={sizes['d_enc']}", f"model.decoder.hidden_size={sizes['d_dec']}",
        f"model.decoder.inner_size={4 * sizes['d_dec']}",
        f"train_ds.batch_duration={sizes['batch_duration']}",
        f"trainer.out_dir={small_dir}", "trainer.max_steps=10", "trainer.log_every=1",
        "trainer.val_check_interval=0", "trainer.checkpoint_every=0",
    )
    small_model_dir = small_dir / "model"  # the final model (a Serinus model folder)
    if not small_model_dir.is_dir():
        small_model_dir = small_dir / "checkpoints" / (small_dir / "checkpoints" / "last").read_text().strip() / "model"
    print(f"trained model: {small_model_dir}")

    # -- 5. fine-tune from canary-180m-flash ----------------------------------------------------
    header("5.1", f"Build the fine-tuning config from {args.flash_model}",
           "base_model_cfg['init_from_pretrained_model'] = ...; canary_model.save_tokenizers(...); "
           "copy prompt_format, encoder, transf_decoder, preprocessor from canary_model._cfg")
    flash = S.CanaryModel.from_pretrained(str(args.flash_model))
    if not isinstance(flash.tokenizer, CanaryTokenizer):
        raise SystemExit(f"--flash-model {args.flash_model}: expected a flash-style checkpoint with the concatenated "
                         f"tokenizer (spl_tokens + one per language), got a {type(flash.tokenizer).__name__}")
    base_model_cfg = yaml.safe_load((REPO / "configs" / "canary_tiny.yaml").read_text())
    # 1. initialise from the checkpoint
    flash_path = os.path.abspath(args.flash_model) if Path(args.flash_model).exists() else str(args.flash_model)
    base_model_cfg["init_from"] = {"path": flash_path, "include": [], "exclude": []}  # the saved file works anywhere
    # 2. the checkpoint's tokenizers
    flash_tok_dir = out / "canary_flash_tokenizers"
    tok_cfg = flash.save_tokenizers(flash_tok_dir)
    print(f"canary_model.save_tokenizers({str(flash_tok_dir)!r}) -> {sorted(os.listdir(flash_tok_dir))}")
    print(f"  tokenizer config: {json.dumps(tok_cfg)}")
    from serinus.tokenizer import open_tokenizer

    try:
        readable = open_tokenizer(str(flash_tok_dir)).vocab == flash.tokenizer.vocab
    except ValueError as e:
        readable, why = False, str(e)
    else:
        why = "its vocabulary differs from the model's"
    if readable:
        base_model_cfg["tokenizer"] = {"dir": os.path.abspath(flash_tok_dir), "from_checkpoint": None}
    else:
        # `serinus train` reads tokenizer.dir / tokenizer.from_checkpoint only; for an aggregate
        # tokenizer the save_tokenizers() folder is not one it reads, so take it from the checkpoint.
        print(f"  note: serinus train cannot use that folder as tokenizer.dir ({why}); "
              f"using tokenizer.from_checkpoint (the same tokenizer)")
        base_model_cfg["tokenizer"] = {"dir": None, "from_checkpoint": flash_path}
    # 3. prompt format, 4. architecture
    fcfg = flash.cfg
    base_model_cfg["model"]["preset"] = None
    base_model_cfg["model"]["prompt_format"] = fcfg.prompt_format
    base_model_cfg["model"]["features"] = dataclasses.asdict(fcfg.features)
    base_model_cfg["model"]["encoder"] = dataclasses.asdict(fcfg.encoder)
    base_model_cfg["model"]["decoder"] = {k: v for k, v in dataclasses.asdict(fcfg.decoder).items()
                                          if k != "vocab_size"}  # the vocabulary comes from the tokenizer
    base_model_cfg["model"]["decoding"] = dataclasses.asdict(fcfg.decoding)
    base_model_cfg["optim"].update(lr=1e-4, warmup_steps=0)
    ft_config = out / "config" / "canary-180m-flash-finetune.yaml"
    ft_config.parent.mkdir(parents=True, exist_ok=True)
    ft_config.write_text(yaml.safe_dump(base_model_cfg, sort_keys=False))
    print(f"saved {ft_config}:")
    shown = {k: base_model_cfg[k] for k in ("init_from", "tokenizer")}
    shown["model"] = {k: base_model_cfg["model"][k] for k in ("prompt_format", "encoder", "decoder")}
    print(yaml.safe_dump(shown, sort_keys=False, default_flow_style=None).rstrip())

    header("5.2", "Fine-tune from the checkpoint (10 steps)",
           "python scripts/speech_to_text_aed.py --config-name=canary-180m-flash-finetune.yaml "
           "trainer.max_steps=10 ...")
    ft_dir = out / "canary_results" / "canary-180m-flash-finetune"
    if ft_dir.exists():
        shutil.rmtree(ft_dir)
    serinus(
        "train", "--config", ft_config,
        f"train_ds.manifest_filepath={train_manifest}",
        f"validation_ds.manifest_filepath={train_manifest}", f"validation_ds.limit={sizes['val_limit']}",
        f"train_ds.batch_duration={sizes['batch_duration']}",
        f"trainer.out_dir={ft_dir}", "trainer.max_steps=10", "trainer.log_every=1",
        "trainer.val_check_interval=0", "trainer.checkpoint_every=0",
    )

    # -- 6. new tasks ---------------------------------------------------------------------------
    new_dir = out / "new_tasks"
    ftok = flash.tokenizer
    clip = FIXTURES / "audio" / "en_03.wav"
    header("6.1", "New task: decoding with context (the decodercontext slot)",
           "metadata = {..., 'decodercontext': decoder_context}  (Canary2PromptFormatter)")
    context = "report by friday"
    metadata = {"audio_filepath": str(clip), "duration": round(sf.info(str(clip)).duration, 4),
                "text": "Please send me the report by Friday afternoon.", "target_lang": "en", "source_lang": "en",
                "decodercontext": context}
    print(f"metadata = {json.dumps(metadata)}")
    ex = encode_training_example(ftok, CANARY2, metadata["text"], select_slots(CANARY2, metadata))
    print(f"prompt ({len(ex.context_ids)} tokens): {pieces_of(ftok, ex.context_ids)}")
    print(f"answer: {pieces_of(ftok, ex.answer_ids)} <|endoftext|>")
    for ctx in ("", context):
        hyp = flash.transcribe([str(clip)], batch_size=1, source_lang="en", target_lang="en", decodercontext=ctx)
        print(f"flash model, transcribe({clip.name}, decodercontext={ctx!r}): {hyp[0].text!r}")
    print("(the tiny fixture never saw a context in training; a model trained with decodercontext lines uses it)")

    header("6.2", "New task: timestamp targets (<|n|> frame tokens around each word)",
           "text='<|3|> it's <|7|> <|8|> almost <|9|> ...', timestamp='yes'; "
           "CanaryTokenizer._text_with_timestamps_to_ids")
    unk = {i for i, piece in enumerate(ftok.vocab) if piece == "<unk>"}
    syn = next(x for x in map(json.loads, open(SYNTH / "asr_train.jsonl", encoding="utf-8"))
               if x["source_lang"] == "en" and not unk & set(ftok.text_to_ids(x["text"], "en")))
    frame = flash.frame_seconds
    ts_text = " ".join(f"<|{round(w['start'] / frame)}|> {w['word']} <|{round(w['end'] / frame)}|>"
                       for w in syn["words"])
    rows_ts = [{"audio_filepath": str(SYNTH / syn["audio_filepath"]), "duration": syn["duration"], "text": t,
                "target_lang": "en", "source_lang": "en", "timestamp": ts}
               for t, ts in ((syn["text"], "no"), (ts_text, "yes"))]
    print("# without timestamps\nmetadata =", json.dumps(rows_ts[0]))
    print("# with timestamps (frames of 80 ms from synth-v1's word times)\nmetadata =", json.dumps(rows_ts[1]))
    ex = encode_training_example(ftok, CANARY2, ts_text, select_slots(CANARY2, rows_ts[1]))
    print(f"prompt: {pieces_of(ftok, ex.context_ids)}")
    print(f"answer: {pieces_of(ftok, ex.answer_ids)}")
    frames = [ftok.timestamp_frame(i) for i in ex.answer_ids if ftok.is_timestamp_id(i)]
    print(f"frame tokens in the target: {frames}")
    ts_manifest = write_jsonl(new_dir / "timestamps.jsonl", rows_ts)
    ds = PromptedDataset(ftok, CANARY2)
    flash.eval()
    for r, c in zip(rows_ts, manifest_to_cuts(ts_manifest)):
        loss = float(batch_loss(flash, ds[[c]], ds.pad_id, True))
        print(f"flash model's loss (answer + EOS) on the line with timestamp={r['timestamp']}: {loss:.4f}")
    hyp = flash.transcribe([rows_ts[1]["audio_filepath"]], batch_size=1, source_lang="en", target_lang="en",
                           timestamps=True)
    print(f"flash model with timestamps=True: {hyp[0].text!r}, words "
          f"{[(w['word'], w['start_offset'], w['end_offset']) for w in hyp[0].timestamp['word']]}")

    header("6.3", "New task: speech summarization (a summarize slot, rebuilt special tokens, retained embeddings)",
           "add 'summarize' to Canary2PromptFormatter; rebuild spl_tokens with <|summarize|>/<|nosummarize|>; "
           "retain the token embeddings of matched tokens")
    fmt = CANARY2.add_slot(Slot("summarize", "bool", default="no"))
    print("fmt = CANARY2.add_slot(Slot('summarize', 'bool', default='no'))")
    print(f"template: {''.join(fmt.template)}")
    sum_tok_dir = out / "tokenizers_summarize"
    serinus("tokenizer", "special", sum_tok_dir / "spl_tokens", "--extra-tokens", "<|summarize|>", "<|nosummarize|>")
    models = {"spl_tokens": sum_tok_dir / "spl_tokens" / "tokenizer.model"}
    models.update({lang: flash_tok_dir / tok_cfg["langs"][lang]["model_path"] for lang in ftok.langs})
    new_tok = CanaryTokenizer(models)  # the flash model's language tokenizers, in its order
    print(f"new tokenizer: {new_tok.sub_vocab_sizes} -> {new_tok.vocab_size} tokens; "
          f"<|summarize|> = id {new_tok.token_to_id('<|summarize|>')}, "
          f"<|nosummarize|> = id {new_tok.token_to_id('<|nosummarize|>')}")
    from serinus.model.canary import CanaryModel, padded_vocab

    new_cfg = dataclasses.replace(
        flash.cfg, aligner=None,
        decoder=dataclasses.replace(flash.cfg.decoder, vocab_size=padded_vocab(new_tok.vocab_size)))
    torch.manual_seed(0)
    summarizer = CanaryModel(new_cfg, new_tok)
    fresh = {k: v.clone() for k, v in summarizer.state_dict().items()}
    from serinus.train.init import init_from_model  # what `serinus train` does when the tokenizer changes

    report = init_from_model(summarizer, flash, [], [], str(args.flash_model))
    kept, new_pieces = report.rows["decoder.token_embedding.weight"][0], report.new_pieces
    print(f"retained {kept} of {new_tok.vocab_size} token embeddings from {args.flash_model} "
          f"(matched by piece); new, freshly initialised: {new_pieces}")
    rows_sum = []
    for name, summary in SUMMARIES.items():
        wav = FIXTURES / "audio" / name
        rows_sum.append({"audio_filepath": str(wav), "duration": sf.info(str(wav)).duration, "text": summary,
                         "target_lang": "en", "source_lang": "en", "summarize": "true"})
    print("metadata =", json.dumps(rows_sum[0]))
    sum_manifest = write_jsonl(new_dir / "summarize.jsonl", rows_sum)
    ds = PromptedDataset(new_tok, fmt)
    batch = ds[manifest_to_cuts(sum_manifest)]
    n = int(batch.prompt_lens[0])
    print(f"prompt: {pieces_of(new_tok, batch.prompt[0, :n].tolist())}")
    reinit = CanaryModel(new_cfg, new_tok)
    reinit.load_state_dict(fresh)
    reinit.load_state_dict({k: v for k, v in summarizer.state_dict().items()
                            if not k.startswith(("decoder.token_embedding", "decoder.head_bias"))}, strict=False)
    reinit.eval()
    summarizer.eval()
    print(f"loss before training: retained embeddings {float(batch_loss(summarizer, batch, ds.pad_id, True)):.4f}, "
          f"all token embeddings re-initialised {float(batch_loss(reinit, batch, ds.pad_id, True)):.4f}")
    summarizer.train()
    opt = torch.optim.AdamW(summarizer.parameters(), lr=1e-3)
    for step in range(1, sizes["new_task_steps"] + 1):
        loss = batch_loss(summarizer, batch, ds.pad_id, True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"summarize step {step:>3}  loss {loss.item():.4f}")
    del reinit, summarizer, opt

    header("6.4", "Starting from a Canary-flash checkpoint: which weights to load (include / exclude)",
           "init_from_pretrained_model: {model0: {name: nvidia/canary-180m-flash, include: [encoder], "
           "exclude: [transf_decoder._embedding.token_embedding, log_softmax.mlp.layer0]}}")
    print("(Serinus matches parameter-name prefixes of Serinus names; NeMo matches substrings of NeMo names)")
    for what, override in (("(i) all parameters", "init_from.include=[]"),
                           ("(ii) just the encoder", "init_from.include=[encoder.]"),
                           ("(iii) all but the token embeddings", "init_from.exclude=[decoder.token_embedding,"
                                                                  "decoder.head_bias]")):
        print(f"{what}:")
        d = out / "canary_results" / "init-from"
        shutil.rmtree(d, ignore_errors=True)
        serinus("train", "--config", ft_config, override, f"train_ds.manifest_filepath={train_manifest}",
                "validation_ds.manifest_filepath=null", f"train_ds.batch_duration={sizes['batch_duration']}",
                f"trainer.out_dir={d}", "trainer.max_steps=1", "trainer.checkpoint_every=0")

    # -- 7. 2-D bucketing -----------------------------------------------------------------------
    header("7", "2-D bucketing: estimate bucket_duration_bins",
           "python scripts/speech_recognition/estimate_duration_bins_2d.py -b 30 -s 2 -l 0.5 -u 40.0 -t ... -f canary2")
    print(f"(Serinus checkpoints carry no train_ds section: the bins come from your own data; "
          f"the notebook's canary-180m-flash values are [[3.79,27],[3.79,65],...])")
    # The notebook bounds durations with -l 0.5 -u 40.0; the top bin then reaches 40 s, which is what
    # the OOMptimizer tries (--fast leaves -u out: the longest utterance bounds the top bin).
    est = serinus("buckets", "estimate", train_manifest, "--tokenizer", tok_dir, "-b", sizes["buckets"],
                  "-s", sizes["sub_buckets"], "-l", "0.5",
                  *(["-u", sizes["max_duration"]] if sizes["max_duration"] else []),
                  "-f", "canary2", "--batch-duration", "60")
    bins = line_value(est, "bucket_duration_bins")

    # -- 8. OOMptimizer -------------------------------------------------------------------------
    header("8", "OOMptimizer: the largest batch per bucket that trains within a memory budget",
           'python scripts/speech_recognition/oomptimizer.py -m EncDecMultiTaskModel -c $config --no-ddp -b "$BUCKETS"')
    oom_argv = ["oomptimize", "--config", small_model_dir, "--buckets", json.dumps(bins),
                "--max-batch", sizes["oom_max_batch"]]
    if torch.cuda.is_available():
        oom_argv += ["--device", "cuda", "--memory-fraction", "0.9"]
    else:
        oom_argv += ["--device", "cpu", "--memory-gib", "4"]
    oom = serinus_subprocess(*oom_argv)
    line_value(oom, "bucket_batch_size")
    print("-> put both lists in the training config: train_ds.bucket_duration_bins=... train_ds.bucket_batch_size=...")

    # -- 9. prompt-loss masking -----------------------------------------------------------------
    header("9", "Masking the loss of the prompt tokens (use_loss_mask_for_prompt)",
           "print(canary_model._cfg['use_loss_mask_for_prompt'])")
    print(f"prompt loss masking for {args.flash_model}: \n {flash.cfg.use_loss_mask_for_prompt}")
    ds = PromptedDataset(ftok, flash.cfg.prompt_format)
    batch = ds[list(manifest_to_cuts(FIXTURES / "audio" / "manifest.jsonl"))[:3]]
    flash.eval()
    masked_labels, all_labels = int(batch.loss_mask.sum()), int((batch.prompted_transcript[:, 1:] != ds.pad_id).sum())
    print(f"batch: {[Path(c.recording.sources[0].source).name for c in batch.cuts]}, prompts of "
          f"{batch.prompt_lens.tolist()} tokens; {all_labels} labels, {masked_labels} of them answer + EOS")
    ref = {}
    ref_file = FIXTURES / "reference" / Path(str(args.flash_model)).stem / "loss.json"
    if ref_file.is_file():
        ref = json.loads(ref_file.read_text())
    for on in (False, True):
        value = float(batch_loss(flash, batch, ds.pad_id, on))
        nemo = ref.get(f"loss_use_loss_mask_for_prompt_{str(on).lower()}")
        print(f"use_loss_mask_for_prompt={str(on).lower():<5}  loss {value:.6f}"
              + (f"   (NeMo 3.0.0 on the same batch: {nemo:.6f})" if nemo is not None else ""))
    print("the same switch in training (model.use_loss_mask_for_prompt): the first step of the step-4 run, "
          "same seed and batch:")
    for on in ("false", "true"):
        shutil.rmtree(out / "canary_results" / f"loss-mask-{on}", ignore_errors=True)
        serinus(
            "train", "--config", short(REPO / "configs" / "canary_tiny.yaml"), f"model.use_loss_mask_for_prompt={on}",
            f"train_ds.manifest_filepath={train_manifest}", "validation_ds.manifest_filepath=null",
            f"tokenizer.dir={tok_dir}", "model.encoder.n_layers=2", "model.decoder.num_layers=2",
            f"model.encoder.d_model={sizes['d_enc']}", f"model.decoder.hidden_size={sizes['d_dec']}",
            f"model.decoder.inner_size={4 * sizes['d_dec']}", f"train_ds.batch_duration={sizes['batch_duration']}",
            f"trainer.out_dir={out / 'canary_results' / f'loss-mask-{on}'}", "trainer.max_steps=1",
            "trainer.checkpoint_every=0", "trainer.val_check_interval=0",
        )

    print(f"\ntutorial finished in {time.time() - t_start:.1f} s; everything written under {out}")
    print(f"seconds per step: {timing_summary()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(FIXTURES / "tiny_canary2_v2style.nemo"),
                   help="canary-1b-v2-style model for the inference steps (a .nemo, folder or Hub id; "
                   "default: the tiny v2-style fixture with its CTC aligner)")
    p.add_argument("--flash-model", default=str(FIXTURES / "tiny_canary2.nemo"),
                   help="canary-180m-flash-style model for fine-tuning and the new-task steps "
                   "(default: the tiny flash-style fixture)")
    p.add_argument("--audio", help="the audio file for steps 1.2-1.4 (default: the first utterance of the tree)")
    p.add_argument("--out-dir", default=str(short(REPO / "runs" / "tutorial")),
                   help="where everything is written (default: runs/tutorial in the repository, git-ignored)")
    p.add_argument("--fast", action="store_true", help="tiny sizes and few lines (< 3 min on a 2-core CPU)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: 1 with --fast, where more only add overhead and "
                   "crawl on a shared CPU; else torch's default)")
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.fast else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the commands run as their own process
    if not FIXTURES.is_dir() or not SYNTH.is_dir():
        print(f"canary_tutorial: shared data not found at {SHARED} (set SERINUS_SHARED)", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
