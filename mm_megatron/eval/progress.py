"""A progress bar for evaluation loops: samples done, rate and ETA, on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mm_megatron.data.progress import duration


class SampleProgress:
    """``label [#####.....] 12/40 30% 0.52 samples/s 0:00:23 elapsed ETA 0:00:54``.

    Redrawn in place on a terminal (at most every 0.2 s), one line every ``interval`` seconds
    otherwise (logs), and always at the end.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:
        self.total = max(total, 0)
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 30.0)
        self.start = self._last = time.perf_counter()
        self.done = 0
        self.note = ""

    def line(self, now: float | None = None) -> str:
        """The current progress line."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = duration(eta) if eta == eta else "?"
        note = f" {self.note}" if self.note else ""
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} {100 * frac:3.0f}% "
            f"{rate:.2f} samples/s {duration(elapsed)} elapsed ETA {eta_text}{note}"
        )

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` more samples done."""
        self.done += n
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\033[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
