"""What a training run shows and writes while it runs (rank 0 only):

    log.jsonl                 one JSON record per step and per validation (the record of the run)
    tensorboard/              event files: loss (and its parts), lr, grad norm, WER/BLEU, padding
                              ratios, audio seconds per wall second (tensorboardX, optional)
    console                   a tqdm bar with loss, lr and audio s/s (on a terminal), else a line
                              every `log_every` steps
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def padding_ratios(batch) -> dict:
    """Share of the batch tensors that is padding: audio (input) and target tokens (output)."""
    audio = batch.audio_lens.float()
    out = {"input_padding": 1.0 - float(audio.sum()) / max(float(audio.max()) * len(audio), 1.0)}
    tokens = getattr(batch, "prompted_transcript_lens", None)
    tokens = (tokens if tokens is not None else batch.transcript_lens).float()
    out["output_padding"] = 1.0 - float(tokens.sum()) / max(float(tokens.max()) * len(tokens), 1.0)
    return out


def _tensorboard_writer(folder: Path, wanted):
    """A tensorboardX SummaryWriter, None when not wanted; `auto` without tensorboardX says so once."""
    if wanted is False:
        return None, None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        if wanted is True:
            return None, "trainer.tensorboard=true but tensorboardX is not installed (pip install tensorboardX)"
        return None, "TensorBoard logging off: tensorboardX is not installed (pip install tensorboardX)"
    return SummaryWriter(str(folder)), None


class Monitor:
    def __init__(self, out_dir: Path, tr: dict, max_steps: int, first_step: int, rank: int):
        self.active = rank == 0
        self.log_every = int(tr["log_every"])
        self.t_start = time.time()
        self.clock = {"train": 0.0, "audio": 0.0}  # wall seconds in training steps, audio seconds seen
        self.log_f = self.writer = self.bar = None
        if not self.active:
            return
        self.log_f = open(out_dir / "log.jsonl", "a")
        self.writer, note = _tensorboard_writer(out_dir / "tensorboard", tr["tensorboard"])
        if note:
            print(f"serinus train: {note}", file=sys.stderr, flush=True)
        show_bar = tr["progress_bar"] is True or (tr["progress_bar"] == "auto" and sys.stderr.isatty())
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def print(self, line: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    @property
    def audio_per_second(self) -> float:
        return self.clock["audio"] / max(self.clock["train"], 1e-9)

    def step(self, step: int, record: dict, seconds: float, audio_seconds: float) -> None:
        """One optimizer step done: `record` holds loss, its parts, lr, grad_norm, padding, batch size..."""
        self.clock["train"] += seconds
        self.clock["audio"] += audio_seconds
        if not self.active:
            return
        record = {"step": step, **record, "audio_per_second": round(self.audio_per_second, 2),
                  "elapsed": round(time.time() - self.t_start, 3)}  # seconds since the run started
        self.log_f.write(json.dumps(record) + "\n")
        self.log_f.flush()  # a line per step, readable while the run goes (and after a crash)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.3f}  lr {record['lr']:.2e}  "
                                     f"{self.audio_per_second:.0f} audio s/s", refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0 or step == 1:
            parts = "".join(f"  {k} {record[k]:.3f}" for k in ("attention", "ctc") if k in record and "ctc" in record)
            print(f"step {step:>6}  loss {record['loss']:.4f}{parts}  lr {record['lr']:.2e}  "
                  f"grad_norm {record['grad_norm']:.2f}  batch {record['batch_size']}  epoch {record['epoch']}  "
                  f"{self.audio_per_second:.0f} audio s/s  {(time.time() - self.t_start) / 60:.1f} min", flush=True)

    def validation(self, step: int, record: dict, seconds: float, examples: list[dict]) -> None:
        if not self.active:
            return
        shown = [k for k in record if k.startswith(("val_loss", "wer", "bleu"))]
        self.print(f"validation step {step} ({record['minutes']:.1f} min, {seconds:.0f} s): "
                   + "  ".join(f"{k} {record[k]:.4f}" for k in shown))
        for ex in examples:
            self.print(f"  ref: {ex['ref']}\n  hyp: {ex['hyp']}")
        self.log_f.write(json.dumps(record) + "\n")
        self.log_f.flush()
        if self.writer is not None:
            for key in shown:
                self.writer.add_scalar(f"val/{key}", record[key], step)
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.log_f is not None:
            self.log_f.close()
