"""Progress reporting from deep inside the defense, without the library knowing about terminals.

The defense calls `progress.phase(name, total)` then `progress.advance(**info)`; the CLI passes a sink that draws a
bar on a terminal, and everything else gets the silent default.
"""

from __future__ import annotations

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
