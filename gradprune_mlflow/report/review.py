"""What a reviewer reads in the MLflow UI for one sanitize run: the HTML report (`report.html`), the figures as PNGs
under `plots/`, and the run's markdown description (the `mlflow.note.content` tag, shown on the run page).

log.py logs the numbers; this module logs what is built from them.
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient

from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.triggers import Trigger
from gradprune_mlflow.report import figures
from gradprune_mlflow.report.html import render_report
from gradprune_mlflow.report.summary import run_description

NOTE_TAG = "mlflow.note.content"
VALID_TAG = "gradprune.clean_set_valid"  # written by registry.log.log_validation


def comparison_triggers(result, real: Trigger | None) -> list[tuple[str, Trigger]]:
    """The triggers to show side by side: each synthesized one of the flagged class, then the real one if known."""
    shown: list[tuple[str, Trigger]] = [(f"synthesized #{i + 1} (class {t.target})", t)
                                        for i, t in enumerate(result.triggers)]
    if real is not None:
        shown.append((f"real (class {real.target})", real))
    return shown


def review_figures(result, clean_set: CleanSet | None, real: Trigger | None) -> dict[str, Any]:
    """Artifact path -> PIL image for the figures that exist for this result (pruning curve, filters per layer,
    synthesized vs real trigger)."""
    out: dict[str, Any] = {}
    if result.curve:
        out["plots/pruning_curve.png"] = figures.curve_png(result.curve)
    out["plots/pruned_by_layer.png"] = figures.pruned_by_layer_png(result.report)
    shown = comparison_triggers(result, real)
    if shown and clean_set is not None and len(clean_set):
        target = shown[0][1].target
        others = (clean_set.labels != target).nonzero().flatten()
        image = clean_set.images[int(others[0]) if len(others) else 0]
        out["plots/trigger_comparison.png"] = figures.trigger_comparison_png(shown, image)
    return {k: v for k, v in out.items() if v is not None}


_CAPTIONS = {"plots/pruning_curve.png": "Pruning curve (validation split)",
             "plots/pruned_by_layer.png": "Filters pruned per layer",
             "plots/trigger_comparison.png": "Synthesized trigger beside the real one (when known)"}


def log_review(client: MlflowClient, run_id: str, result, *, model: str, version: str,
               clean_set: CleanSet | None = None, real_trigger: Trigger | None = None,
               validation: dict[str, Any] | None = None, links: dict[str, str] | None = None) -> list[str]:
    """Log the review artifacts of a SanitizeResult to run `run_id`: the figures (those not logged yet), report.html
    and the run description. `real_trigger` is the evaluation or known trigger, if any. Returns the paths logged."""
    figs = review_figures(result, clean_set, real_trigger)
    logged = [path for path in figs if path != "plots/pruning_curve.png"]  # log.log_result logs the curve
    for path in logged:
        client.log_image(run_id, figs[path], artifact_file=path)
    title = f"gradprune report: {model} version {version}"
    html = render_report(result.report, title=title, figures={_CAPTIONS[p]: img for p, img in figs.items()},
                         validation=validation, links=links)
    client.log_text(run_id, html, "report.html")
    set_run_note(client, run_id, result.report, model=model, version=version)
    return [*logged, "report.html"]


def set_run_note(client: MlflowClient, run_id: str, report: dict[str, Any], *, model: str, version: str,
                 sanitized_version: str | None = None) -> str:
    """Write (or rewrite) the run's markdown description; returns it."""
    valid = client.get_run(run_id).data.tags.get(VALID_TAG)
    note = run_description(report, model, version, validation_ok=None if valid is None else valid == "true",
                           sanitized_version=sanitized_version)
    client.set_tag(run_id, NOTE_TAG, note)
    return note
