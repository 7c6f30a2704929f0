"""Progress of long work: a live bar on a terminal, a plain line every few seconds in a log.

tqdm redraws its bar with carriage returns; written to a file or a pipe (a SLURM log, `tee`)
that becomes one unreadable line of redraws. Off a terminal every redraw becomes its own line,
at most one per ``LOG_INTERVAL_S``.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

LOG_INTERVAL_S = 10.0
T = TypeVar("T")


class _Lines(io.TextIOBase):
    """A text stream that turns each tqdm redraw into one newline-terminated line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar off a terminal: closing redraws the last line, which on a terminal overwrites
    itself but in a log is a second line, so it is left out when the last line shown (a last
    update that fell due) already says the end: the same count, total and postfix."""

    _shown: tuple[Any, ...] | None = None

    def _state(self) -> tuple[Any, ...]:
        return (self.n, self.total, self.postfix)

    def display(self, msg: str | None = None, pos: int | None = None) -> Any:
        self._shown = self._state()
        return super().display(msg, pos)

    def close(self) -> None:
        if not self.disable and self._shown == self._state():
            self.leave = False  # clearing writes nothing to `_Lines`
        super().close()


def progress(iterable: Iterable[T] | None = None, *, desc: str, unit: str, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; off one, a status line every LOG_INTERVAL_S seconds."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, desc=desc, unit=unit, **kwargs)
    kwargs = {**kwargs, "mininterval": LOG_INTERVAL_S, "file": _Lines(stream), "ncols": 100}
    return _LogBar(iterable, desc=desc, unit=unit, **kwargs)
