"""Results: an item's hour segments gathered into its transcript, turned into a `Hypothesis`
(NeMo's timestamp dicts, made here and only here), reported as it completes, returned in input
order; and the progress bar.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterator

from serinus.audio import SAMPLE_RATE
from serinus.decoding import Hypothesis
from serinus.pipeline.decode import Transcript
from serinus.pipeline.inputs import Item
from serinus.pipeline.merge import join_hours
from serinus.pipeline.plan import Piece


def to_hypothesis(transcript: Transcript, keep_timestamps: bool) -> Hypothesis:
    """What transcribe() returns for a transcript: NeMo's Hypothesis, timestamps as NeMo's dicts."""
    timestamp = transcript.timestamps.to_nemo() if keep_timestamps and transcript.timestamps is not None else {}
    nbest = [to_hypothesis(t, True) for t in transcript.nbest]
    return Hypothesis(text=transcript.text, y_sequence=transcript.tokens, score=transcript.score,
                      timestamp=timestamp, nbest=nbest, warnings=list(transcript.warnings))


class HourSegments:
    """Gathers the hour segments of each item as their batches complete; an item is done when all
    its segments are, and fails as a whole when one of them does."""

    def __init__(self, frame_seconds: float):
        self.frame_seconds = frame_seconds
        self.pending: dict[int, list[tuple[float, Transcript] | None]] = {}  # item index -> per segment
        self.failed: set[int] = set()

    def add(self, piece: Piece, transcript: Transcript) -> Transcript | None:
        """The item's whole transcript once this was its last segment, else None."""
        segments = self.pending.setdefault(piece.item.index, [None] * piece.n_segments)
        segments[piece.segment] = (piece.start / SAMPLE_RATE, transcript)
        if any(s is None for s in segments):
            return None
        del self.pending[piece.item.index]
        return join_hours([t for _, t in segments], [start for start, _ in segments], self.frame_seconds)

    def fail(self, item: Item) -> bool:
        """Mark the item failed; False when it had failed already (report it once)."""
        if item.index in self.failed:
            return False
        self.failed.add(item.index)
        self.pending.pop(item.index, None)
        return True


class Results:
    """Hypotheses in input order; `on_result(item, hyp)` is called as each one completes."""

    def __init__(self, items: list[Item], on_result: Callable[[Item, Hypothesis], None] | None):
        self.hyps: list[Hypothesis | None] = [None] * len(items)
        self.on_result = on_result

    def add(self, item: Item, hyp: Hypothesis) -> None:
        self.hyps[item.index] = hyp
        if self.on_result:
            self.on_result(item, hyp)

    def add_all(self, results: Iterator[tuple[Item, Hypothesis]], bar: "Progress | None") -> None:
        try:
            for item, hyp in results:
                self.add(item, hyp)
                if bar is not None:
                    bar.file_done()
        finally:
            if bar is not None:
                bar.close()


class Progress:
    """tqdm bar on stderr: files done, hours of audio done, real-time factor."""

    def __init__(self, items: list[Item]):
        from tqdm import tqdm

        self.total_seconds = sum(item.duration for item in items)
        self.done_seconds = 0.0
        self.start = time.perf_counter()
        self.bar = tqdm(total=len(items), unit="file", desc="transcribing", dynamic_ncols=True, file=sys.stderr)
        self._postfix()

    def _postfix(self):
        elapsed = time.perf_counter() - self.start
        rtf = f"{elapsed / self.done_seconds:.3f}" if self.done_seconds else "-"
        self.bar.set_postfix_str(f"audio {_hms(self.done_seconds)}/{_hms(self.total_seconds)} h, RTF {rtf}")

    def audio_done(self, seconds: float):
        self.done_seconds += seconds
        self._postfix()

    def file_done(self):
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
