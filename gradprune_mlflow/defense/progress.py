"""Progress reporting from deep inside the defense, without the library knowing about terminals.

The defense calls `progress.phase(name, total)` then `progress.advance(**info)`; the CLI passes a sink that draws a
bar on a terminal, and everything else gets the silent default.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Progress(Protocol):
    def phase(self, name: str, total: int | None = None) -> None:
        """A new phase starts ("synthesis", "pruning", "fine-tuning", ...) with `total` steps if known."""

    def advance(self, steps: int = 1, **info: Any) -> None:
        """`steps` more steps of the current phase are done; info holds numbers worth showing (loss, acc)."""

    def close(self) -> None:
        """The run is over."""


class SilentProgress:
    """The default: reports nothing."""

    def phase(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, steps: int = 1, **info: Any) -> None:
        pass

    def close(self) -> None:
        pass


class PhaseTimer:
    """Wall-clock seconds per named phase: `with timer("pruning"): ...`; a phase entered twice adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
