"""The front door: `sanitize(model, clean_set, trigger=None, config=None)`.

The CLI, the Prefect flows and the benchmark all come through here. SanitizeResult lives in defense/result.py and
is re-exported here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet, Split
from gradprune_mlflow.defense.pipeline import run_sanitize
from gradprune_mlflow.defense.progress import Progress, SilentProgress
from gradprune_mlflow.defense.result import SanitizeResult
from gradprune_mlflow.defense.triggers import Trigger


def sanitize(
    model: nn.Module,
    clean_set: CleanSet,
    trigger: Trigger | None = None,
    config: SanitizeConfig | None = None,
    *,
    eval_trigger: Trigger | None = None,
    test_set: Split | CleanSet | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> SanitizeResult:
    """Remove a backdoor from `model` using the trusted `clean_set`.

    Takes the model (not changed: a copy is sanitized), the clean set, an optional known trigger (else trigger-free
    mode synthesises candidates), a config (keyword overrides replace its fields), an optional evaluation-only trigger
    and test set (measured, never shown to the defense), and a progress sink.
    Returns a SanitizeResult. Raises BadInput/UnsupportedModel/TriggerError for inputs the user can fix.
    """
    cfg = (config or SanitizeConfig()).with_overrides(**overrides)
    return run_sanitize(
        model, clean_set, trigger, cfg, eval_trigger=eval_trigger, test_set=test_set,
        progress=progress or SilentProgress(),
    )
