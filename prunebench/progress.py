"""Progress that survives in a log file: a bar on a terminal, and log lines a file keeps.

tqdm redraws one line with carriage returns: in a terminal that is the right thing, in a log file
(`prunebench run > run.log 2>&1`, a SLURM output file) it is either absent (tqdm disables itself off a
TTY) or a smear of redraws. So every long loop goes through `progress`, which draws the bar only on a
terminal and, wherever it runs, logs one line at most every `EVERY` seconds ("wanda: block 12/30, 21 s,
~25 s left"). `heartbeat(stage)` covers the stages with no loop of their own (a GGUF conversion, a
Hub download): a line every `EVERY` seconds that nothing else has logged, so a log never goes silent
for longer than that.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

log = logging.getLogger("prunebench.progress")

EVERY = 20.0  # seconds between progress lines (the promise: a line at least every 30 s of a long stage)
_last = [time.monotonic()]  # when a progress or heartbeat line was last logged (process-wide: one log)

T = TypeVar("T")


def _tty() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _say(msg: str, *args) -> None:
    _last[0] = time.monotonic()
    log.info(msg, *args)


class progress:  # noqa: N801 - used like tqdm, a function-like name
    """Iterate `items`, drawing a tqdm bar on a terminal and logging a line every EVERY seconds;
    `set_postfix(loss=...)` shows on the bar and at the end of the next log line."""

    def __init__(self, items: Iterable[T], desc: str, unit: str = "it", total: int | None = None, enabled: bool = True):
        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.items, self.desc, self.unit, self.total, self.enabled = items, desc, unit, total, enabled
        self.postfix = ""
        self.bar = None

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def __iter__(self) -> Iterator[T]:
        if not self.enabled:
            yield from self.items
            return
        if _tty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False)
        start = time.monotonic()
        next_line, done, total = start + EVERY, 0, self.total
        try:
            for item in self.items:
                yield item
                done += 1
                if self.bar is not None:
                    self.bar.update(1)
                now = time.monotonic()
                if now >= next_line:
                    next_line = now + EVERY
                    elapsed = now - start
                    of = f"/{total}" if total else ""
                    left = f", ~{elapsed / done * (total - done):.0f} s left" if total else ""
                    extra = f" ({self.postfix})" if self.postfix else ""
                    _say("%s: %s %d%s, %.0f s%s%s", self.desc, self.unit, done, of, elapsed, left, extra)
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None


@contextmanager
def heartbeat(stage: str, every: float | None = None):
    """While the block runs, log "<stage>: still running (N s)" whenever EVERY seconds passed with no
    progress line, so a stage without a loop of its own (a conversion, a download) is never silent."""
    every = EVERY if every is None else every
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(1.0):
            now = time.monotonic()
            if now - _last[0] >= every:
                _say("%s: still running (%.0f s)", stage, now - start)

    thread = threading.Thread(target=beat, name=f"heartbeat-{stage}", daemon=True)
    _last[0] = start
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)
