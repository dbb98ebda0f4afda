"""One progress/cancel mechanism for the CLI (tqdm), Slicer (progress dialog) and tests.

Long loops call ``progress.step(...)``; a cancel request is a flag the loops check, so a
cancelled run stops at the next slice and raises :class:`Cancelled` before anything is written.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Cancelled

# callback(stage, done, total) -> None
ProgressCallback = Callable[[str, int, int], None]


class Progress:
    def __init__(self, callback: Optional[ProgressCallback] = None):
        self.callback = callback
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("Cancelled by the user; the segmentation was left unchanged.")

    def step(self, stage: str, done: int, total: int) -> None:
        self.check()
        if self.callback is not None:
            self.callback(stage, done, total)

    def child(self, callback: Optional[ProgressCallback] = None) -> "Progress":
        """A Progress that shares this one's cancel flag but reports to ``callback`` (None: nowhere); a batch
        gives each case one, so cancelling stops the case while the bar stays the batch's."""
        child = Progress(callback)
        child._cancel = self._cancel
        return child


def tqdm_progress(disable: bool = False) -> Progress:
    """A Progress that draws one tqdm bar per stage (for the command line)."""
    from tqdm import tqdm  # here: Slicer imports this module at start-up, before tqdm may be installed

    bars: dict = {}

    def callback(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, leave=False, disable=disable)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return Progress(callback)
