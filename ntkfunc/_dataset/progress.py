"""The progress bar of a run: units done (tiles, feature chunks), ETA, and entries (or samples) per second."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """tqdm bar on stderr (when ``enabled``): ``unit``\\ s done of ``total``, ETA, ``counted``/s."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str = "kernel_matrix", unit: str = "tile",
                 counted: str = "entries") -> None:
        self.bar: Any = None
        self.entries = 0
        self.counted = counted
        self.start = time.perf_counter()
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def advance(self, entries: int, seconds: float) -> None:
        """One more unit of ``entries`` kernel entries (or samples), computed in ``seconds``."""
        self.entries += entries
        if self.bar is not None:
            rate = self.entries / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.3g} {self.counted}/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_progress(enabled: bool, total: int, initial: int, desc: str = "kernel_matrix", unit: str = "tile",
                  counted: str = "entries") -> Progress:
    """A bar when asked for and stderr is a terminal; a silent counter otherwise."""
    return Progress(enabled and sys.stderr.isatty(), total, initial, desc, unit, counted)
