"""Model files in and out: load in any supported format after scanning (loading.py, scan.py), and save the
sanitized model in the format it came in: adapters (pt2, TorchScript) write their own format, eager modules are
written as an MLflow pickle-format model folder.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.models.adapter import FormatAdapter, replacing
from gradprune_mlflow.models.loading import (  # noqa: F401  (the public names callers import from here)
    SAFE_PICKLE_MODULES,
    is_mlflow_uri,
    load_mlflow_dir,
    load_model,
    load_model_file,
    model_format,
)
from gradprune_mlflow.models.scan import EXTRA_UNSAFE, scan_model_file  # noqa: F401


def save_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    input_shape: tuple[int, int, int] | list[int],
    history: list[dict[str, Any]] | None = None,
    extra_files: list[str | Path] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the sanitized `model`: in its own format for an adapter (see FormatAdapter.write; a file source gives
    the file `out_dir` + its suffix), else as an MLflow pytorch model folder that `mlflow.pytorch.load_model(out_dir)`
    loads.

    Takes the model, the folder (replaced when it already holds an MLflow model), the input shape [C, H, W] for the
    signature (float32 [-1, C, H, W] -> logits), the pruning history (written beside it as pruning_history.json),
    extra files to copy in, and MLmodel metadata (both for eager models only). Returns the path written. Raises
    BadInput when out_dir is a non-empty folder that is not an MLflow model.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    out_dir = Path(out_dir)
    if isinstance(model, FormatAdapter):
        return model.cpu().eval().write(out_dir, history)
    model = model.cpu().eval()
    example = torch.zeros(1, *map(int, input_shape))
    with torch.no_grad():
        logits = model(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    with replacing(out_dir) as target:
        with quiet("mlflow.pytorch"):  # its pickle warning is about loading untrusted files; this one is ours
            mlflow.pytorch.save_model(
                model, str(target), serialization_format="pickle", pickle_module=pickle, signature=signature,
                # Given explicitly: inferring them would load the model again in a subprocess.
                pip_requirements=_requirements(), extra_files=[str(f) for f in extra_files or []] or None,
                metadata=metadata,
            )
        if history is not None:
            (target / "pruning_history.json").write_text(json.dumps(history, indent=2))
    return out_dir


def _requirements() -> list[str]:
    import mlflow.pytorch

    from gradprune_mlflow import __version__

    return [*mlflow.pytorch.get_default_pip_requirements(), f"gradprune-mlflow=={__version__}"]


@contextmanager
def quiet(name: str) -> Iterator[None]:
    """Raise a logger's level to ERROR inside a with block: mlflow.pytorch warns about pickle on every save and load,
    and ours are scanned first, so the warning says nothing to our users."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
