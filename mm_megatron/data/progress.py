"""A dependency-free progress line: docs/s, MB/s, tokens/s, percent of input and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Prints a progress line: in place on a terminal, else one line every ``interval`` s."""

    def __init__(
        self,
        total_bytes: int,
        label: str = "",
        enabled: bool = True,
        interval: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.total_bytes = max(total_bytes, 1)
        self.label = label
        self.start = time.perf_counter()
        self._last = self.start
        self.docs = self.tokens = self.nbytes = self.position = 0

    def update(self, docs: int, tokens: int, nbytes: int, position: int) -> None:
        """Add counts of one processed chunk; ``position`` is input bytes consumed so far."""
        self.docs += docs
        self.tokens += tokens
        self.nbytes += nbytes
        self.position = max(self.position, position)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        """The current progress line."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        frac = min(self.position / self.total_bytes, 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        return (
            f"{self.label}{100 * frac:5.1f}% | {human(self.docs)} docs "
            f"{human(self.docs / elapsed)} docs/s | {self.nbytes / elapsed / 1e6:.2f} MB/s | "
            f"{human(self.tokens)} tok {human(self.tokens / elapsed)} tok/s | "
            f"{duration(elapsed)} elapsed, ETA {duration(eta)}"
        )

    def _print(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\033[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Print the final line."""
        if self.enabled:
            self.position = self.total_bytes
            self._print(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
