"""Stage reports for ``modapt export`` and ``modapt merge``: one stderr line per stage, with the
time since the command started and the stage's own duration.

    [  12.3 s] tracing: done in 11.8 s
    [  14.0 s] shard 2/3: model-00002-of-00003.safetensors

Exports of a 135M model take minutes; without these lines the command looks hung. Reports go to
stderr (stdout keeps the final summary, for scripts). ``Progress(quiet=True)`` prints nothing;
library calls get the quiet :data:`SILENT` unless they pass a ``Progress`` themselves.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Progress:
    """Reports stages with elapsed time on ``stream`` (stderr by default), or nothing when quiet."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.quiet = quiet
        self.stream = stream
        self.start = time.perf_counter()

    def note(self, message: str) -> None:
        """One line ``[elapsed] message``."""
        if self.quiet:
            return
        stream = self.stream or sys.stderr
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Announce ``name``, run the block, then report its duration (or that it failed)."""
        self.note(f"{name} ...")
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.note(f"{name}: failed after {time.perf_counter() - t0:.1f} s")
            raise
        self.note(f"{name}: done in {time.perf_counter() - t0:.1f} s")

    def step(self, name: str, index: int, total: int, detail: str = "") -> None:
        """``name i/n: detail`` (``index`` counts from 1)."""
        self.note(f"{name} {index}/{total}" + (f": {detail}" if detail else ""))


#: the reporter library calls get by default: they print nothing unless asked to
SILENT = Progress(quiet=True)
