"""The model adapter: a model in a saved format (pt2, TorchScript) as an nn.Module the sanitizer can train.

An adapter gives the pipeline (a) a module that takes a batch of any size, (b) its `inner` module, whose parameters
are trained and pruned (FilterMasks traces it on `trace_input`, see defense/dataflow.py), and (c) `write`, which
saves the sanitized model in the format it came in: the same kind of file, or the same MLflow model folder with only
the model file replaced (MLmodel, signature, input example, requirements and extra files are kept byte for byte).
Eager modules (torch.save, MLflow pickle) need no adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.errors import BadInput

HISTORY_FILE = "pruning_history.json"
# Written by MLflow into a downloaded registry version (its name and version): the source's, not the new model's.
NOT_KEPT = {HISTORY_FILE, "registered_model_meta"}


@dataclass
class Source:
    """Where a model came from: a single file (`folder` empty) or an MLflow model folder's other files, by path."""

    model_file: str
    folder: dict[str, bytes] = field(default_factory=dict)

    @property
    def is_mlflow(self) -> bool:
        return bool(self.folder)

    @classmethod
    def from_folder(cls, root: Path, model_file: Path) -> Source:
        files = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.is_symlink() and path != model_file and rel not in NOT_KEPT:
                files[rel] = path.read_bytes()
        return cls(model_file.relative_to(root).as_posix(), files)


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A fresh folder path to write a model folder into; when the block ends it replaces `out` in one rename, so a
    failed write leaves `out` as it was. Raises BadInput when `out` is a non-empty folder that is not an MLflow model.
    """
    if out.exists() and any(out.iterdir()) and not (out / "MLmodel").is_file():
        raise BadInput(f"{out} exists and is not an MLflow model folder; choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        target = staging / "model"
        yield target
        if out.exists():
            shutil.rmtree(out)
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class FormatAdapter(nn.Module):
    """Base of the per-format adapters; subclasses set `model_format` and implement forward, `model_bytes`."""

    model_format = "module"

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    @property
    def inner(self) -> nn.Module:
        """The loaded module whose parameters are trained."""
        raise NotImplementedError

    def trace_input(self, example: torch.Tensor) -> torch.Tensor:
        """A batch of `example`'s images that `inner` accepts as it is (its graph may fix the batch size)."""
        return example

    def model_bytes(self) -> bytes:
        """The sanitized model file's content, in the source's format."""
        raise NotImplementedError

    def write(self, out: Path, history: list[dict[str, Any]] | None = None) -> Path:
        """Write the model in its own format: the MLflow folder `out` for an MLflow source (with `history` as
        pruning_history.json), else the file `out` with the source file's suffix. Returns the path written."""
        data = self.model_bytes()
        if not self.source.is_mlflow:
            target = out.with_suffix(Path(self.source.model_file).suffix or ".pt")
            if target.is_dir():
                raise BadInput(f"{target} is a folder; choose another output folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            return target
        with replacing(out) as target:
            files = dict(self.source.folder) | {self.source.model_file: data}
            for rel, content in files.items():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(content)
            if history is not None:
                (target / HISTORY_FILE).write_text(json.dumps(history, indent=2))
        return out

