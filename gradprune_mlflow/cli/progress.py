"""Progress bars on a terminal: the CLI's implementation of defense.progress.Progress."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gradprune_mlflow.defense.progress import Progress as ProgressSink
from gradprune_mlflow.defense.progress import SilentProgress


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


class RichProgress:
    """One bar per phase on stderr, with the latest info numbers (loss, acc...) beside it."""

    def __init__(self, console: Console | None = None):
        self._bars = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console or Console(stderr=True),
        )
        self._task = None
        self._open = True
        self._bars.start()

    def phase(self, name: str, total: int | None = None) -> None:
        self._finish_current()
        self._task = self._bars.add_task(name, total=total, info="")

    def advance(self, steps: int = 1, **info: Any) -> None:
        if self._task is None:
            self.phase("working")
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        self._bars.update(self._task, advance=steps, **({"info": text} if info else {}))

    def close(self) -> None:
        if self._open:  # the defense closes it, and the CLI again in case the defense raised
            self._finish_current()
            self._bars.stop()
            self._open = False

    def _finish_current(self) -> None:
        # A phase's total is a cap (early stopping, patience): when it ends, the steps it took are its total.
        if self._task is not None:
            done = self._bars.tasks[self._task].completed
            self._bars.update(self._task, total=done, completed=done)
            self._task = None


def terminal_progress() -> ProgressSink:
    """RichProgress when stderr is a terminal, else SilentProgress (logs and pipes get no bars)."""
    return RichProgress() if sys.stderr.isatty() else SilentProgress()
