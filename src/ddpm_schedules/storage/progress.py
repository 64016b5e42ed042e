"""Progress bars that also tell listeners (a live W&B run) how far a long stage has got."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm.auto import tqdm as _tqdm

Listener = Callable[[str, float, float | None], None]  # (bar description, n done, total or None)
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` from every progress bar while the block runs (at most every ``every_seconds`` per bar)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class tqdm(_tqdm):  # noqa: N801 (a drop-in for tqdm.auto.tqdm)
    """tqdm.auto's bar, reporting (desc, n, total) to the listeners at most every 10 s and when it closes."""

    every_seconds = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._told = time.monotonic()

    def __iter__(self):
        for item in super().__iter__():
            yield item
            self._maybe_tell()

    def update(self, n: float = 1) -> bool | None:
        out = super().update(n)
        self._maybe_tell()
        return out

    def close(self) -> None:
        if _listeners and not self.disable and not getattr(self, "_closed_told", False):
            self._closed_told = True
            self._tell()
        super().close()

    def _maybe_tell(self) -> None:
        if _listeners and not self.disable and time.monotonic() - self._told >= self.every_seconds:
            self._tell()

    def _tell(self) -> None:
        self._told = time.monotonic()
        for listener in list(_listeners):
            listener(str(self.desc or "progress"), float(self.n), None if self.total is None else float(self.total))
