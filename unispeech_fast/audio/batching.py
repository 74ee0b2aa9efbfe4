"""Length-bucketed batch planning (:func:`plan_batches`) and the progress bar of a run."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Sequence

from .resampling import SAMPLE_RATE

__all__ = ["plan_batches", "Progress"]


def plan_batches(
    lengths: Sequence[int],
    max_batch_samples: int,
    max_padding: float = 0.15,
    exact: bool = False,
) -> list[list[int]]:
    """Group input indices into batches, longest first.

    Indices are sorted by length (descending, ties in input order) and added greedily to the
    current batch while ``batch_size * longest <= max_batch_samples`` and the padded fraction
    ``1 - sum(lengths) / (batch_size * longest)`` stays ``<= max_padding``; ``exact`` allows equal
    lengths only (no padding at all). An input longer than ``max_batch_samples`` forms its own batch.
    Zero lengths (a corpus job's files whose header could not be read) batch together: a batch of
    empty inputs has no padding.
    """
    if not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding!r}")
    if max_batch_samples <= 0:
        raise ValueError(f"max_batch_samples must be positive, got {max_batch_samples!r}")
    negative = [n for n in lengths if n < 0]
    if negative:
        raise ValueError(f"lengths must be >= 0, got {negative[0]!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        n = lengths[i]
        if current:
            longest = lengths[current[0]]
            size = len(current) + 1
            fits = size * longest <= max_batch_samples
            if exact:
                fits = fits and n == longest
            else:
                # longest == 0: every length so far is 0 (sorted descending), so is n: no padding
                fits = fits and (longest == 0 or 1.0 - (total + n) / (size * longest) <= max_padding + 1e-12)
            if fits:
                current.append(i)
                total += n
                continue
            batches.append(current)
        current, total = [i], n
    if current:
        batches.append(current)
    return batches


# ============================================================================================ progress
class Progress:
    """A small progress bar on stderr: ``desc  42% |########          | 12.3/29.0 s audio, 3/7 files``.

    On a terminal it redraws one line; elsewhere (logs, pipes) it prints a line every 10%.
    """

    def __init__(self, total: float, desc: str, files: int, enabled: bool = True, stream=None) -> None:
        self.total = max(float(total), 1e-9)
        self.desc, self.files, self.enabled = desc, files, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.files_done = 0.0, 0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw, self._last_decile = 0.0, -1
        self._start = time.perf_counter()

    def advance(self, amount: float, files: int = 0) -> None:
        self.done = min(self.total, self.done + amount)
        self.files_done += files
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self._draw("\r", "")
                self._last_draw = now
        else:
            decile = int(10 * self.done / self.total + 1e-9)
            if self.files_done < self.files:
                decile = min(decile, 9)  # the 100% line waits for the last batch's results
            if decile > self._last_decile:
                self._last_decile = decile
                self._draw("", "\n")

    def _draw(self, prefix: str, suffix: str) -> None:
        frac = self.done / self.total
        bar = "#" * int(round(20 * frac))
        elapsed = time.perf_counter() - self._start
        self.stream.write(
            f"{prefix}{self.desc} {100 * frac:3.0f}% |{bar:<20}| {self.done / SAMPLE_RATE:.1f}/"
            f"{self.total / SAMPLE_RATE:.1f} s audio, {self.files_done}/{self.files} files, {elapsed:.1f} s{suffix}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self._draw("\r", "\n")


@contextlib.contextmanager
def _stage_hooks(model, on_stage: Callable[[], None], enabled: bool):
    """Call ``on_stage`` after the conv feature encoder and after every transformer layer.

    This registers forward hooks on the model for the block, so it is used only when a progress bar
    is shown (``enabled``); without one (the API default) an inference call leaves the model as it is.
    """
    backbone = model.base_model
    modules = [backbone.feature_extractor, *backbone.encoder.layers]
    if not enabled:
        yield len(modules)
        return
    handles = [m.register_forward_hook(lambda *_: on_stage()) for m in modules]
    try:
        yield len(modules)
    finally:
        for h in handles:
            h.remove()
