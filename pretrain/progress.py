"""Progress of a long step (prep, upload, export): count, tokens, MB/s and time left.

On a terminal it is a tqdm bar. When stderr is a file or a pipe (a batch job's log), tqdm
either prints nothing or floods the log with carriage returns, so a plain line is printed
every `interval` seconds instead (none at all for a step shorter than that).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

INTERVAL_S = 10.0


class Progress:
    def __init__(self, desc: str, total: int, unit: str, interval: float | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.interval = INTERVAL_S if interval is None else interval
        self.count = self.nbytes = 0
        self.tokens: int | None = None
        self._started = self._printed = time.perf_counter()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # here: `pretrain status` imports this module for fmt_duration

            self._bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, mininterval=0.5)

    def update(self, count: int, nbytes: int, tokens: int | None = None) -> None:
        self.count += count
        self.nbytes += nbytes
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens
        if self._bar is not None:
            self._bar.set_postfix_str(self._rates(), refresh=False)
            self._bar.update(count)
        elif time.perf_counter() - self._printed >= self.interval:
            self._printed = time.perf_counter()
            print(
                f"{self.desc}: {self.count:,}/{self.total:,} {self.unit}s, {self._rates()}, "
                f"{self._eta()} left",
                file=sys.stderr,
                flush=True,
            )

    def _eta(self) -> str:
        if not self.count:
            return "?"
        seconds = time.perf_counter() - self._started
        return fmt_duration(seconds * (self.total - self.count) / self.count, compact=True)

    def _rates(self) -> str:
        seconds = max(time.perf_counter() - self._started, 1e-9)
        tokens = f"{self.tokens:,} tokens, " if self.tokens is not None else ""
        return f"{tokens}{self.nbytes / 1e6:,.1f} MB, {self.nbytes / 1e6 / seconds:.2f} MB/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def fmt_duration(seconds: float, compact: bool = False) -> str:
    """A duration in its two largest units: '3d 4h', '5h 12m', '12m 5s', '45s', and past a
    year '2.0y' (`pretrain plan`). `compact`, for progress and training log lines: hours and
    minutes or minutes and seconds, zero-padded ('26h05m', '5m03s')."""
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if compact:
        h += 24 * d
        return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
    if d >= 365:
        return f"{seconds / 86400 / 365:.1f}y"
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s}s" if m else f"{seconds:.0f}s"
