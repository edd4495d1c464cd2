"""timemoe-forecast's progress: series done, series/s and shards written, as one updating line on a terminal and
as plain lines (every `interval` seconds and at each shard written) on a stderr that is not one, and always in the
output folder's log, which every process appends to."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class Progress:
    def __init__(self, total: int | None, enabled: bool, log: Path | None = None, who: str = "",
                 interval: float = 10.0):
        self.total, self.enabled, self.log, self.who = total, enabled, log, who
        self.tty = sys.stderr.isatty()
        self.intervals = {"stderr": 0.5 if self.tty else interval, "log": interval}
        self.started = time.perf_counter()
        self.last = dict.fromkeys(self.intervals, self.started)
        self.series = self.shards = 0

    def update(self, series: int) -> None:
        """Series forecast (a tqdm-like bar's `update`)."""
        self.series += series
        now = time.perf_counter()
        due = [where for where, every in self.intervals.items() if now - self.last[where] >= every]
        for where in due:
            self.last[where] = now
        if due:
            self._say(self.line(), *due)

    def shard(self, name: str) -> None:
        self.shards += 1
        self._say(f"{self.line()}; wrote {name}", "stderr", "log")

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.series / elapsed
        done = f"{self.series} of {self.total} series" if self.total else f"{self.series} series"
        left = f", ~{(self.total - self.series) / rate:.0f} s left" if self.total and rate > 0 else ""
        return f"timemoe-forecast: {self.who}{done}, {rate:.1f} series/s, {self.shards} shards written{left}"

    def close(self) -> None:
        if self.enabled and self.tty and self.series:
            print(file=sys.stderr, flush=True)

    def _say(self, line: str, *where: str) -> None:
        if self.enabled and "stderr" in where:
            print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
                  flush=True)
        if self.log is not None and "log" in where:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.log, "a") as f:  # one write per line: lines of several processes do not interleave
                f.write(f"{stamp} {line}\n")
