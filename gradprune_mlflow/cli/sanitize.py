"""`gradprune sanitize MODEL --clean-data DATA ...`: sanitize one model and write report.json and the model folder.

Heavy imports (torch, mlflow) happen inside the command so that `--help` and argument errors answer at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from gradprune_mlflow.api import SanitizeResult
    from gradprune_mlflow.data.cleanset import CleanSet

DEFAULT_OUT = Path("gradprune-out")


def register(app: typer.Typer) -> None:
    """Add `sanitize` to the app."""
    app.command("sanitize", no_args_is_help=True)(sanitize_command)


def sanitize_command(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", show_default=False,
        help="torch.save file of a whole nn.Module, torch.jit.save or torch.export (.pt2) file, MLflow pytorch "
             "model folder (pickle, pt2 or TorchScript), or models:/name/3, models:/name@alias, runs:/<run>/<path>.")],
    clean_data: Annotated[str, typer.Option(
        "--clean-data", metavar="DATA", show_default=False,
        help="Trusted clean image set: a folder in the clean-set layout or s3://bucket/prefix.")],
    test_data: Annotated[str | None, typer.Option(
        "--test-data", metavar="DATA", help="Held-out set (same layout) to measure accuracy on; else the clean "
                                            "set's validation split.")] = None,
    trigger: Annotated[str | None, typer.Option(
        "--trigger", metavar="T.json", help="Known trigger (paper setting). Without it, triggers are synthesized "
                                            "from the clean set.")] = None,
    eval_trigger: Annotated[str | None, typer.Option(
        "--eval-trigger", metavar="T.json", help="Trigger used only to measure attack success; never shown to the "
                                                 "defense.")] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output folder.")] = DEFAULT_OUT,
    mode: Annotated[Literal["fast", "paper"], typer.Option(
        "--mode", help="fast: layer-normalised scores, several filters per step; paper: the authors' loop.")] = "fast",
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(
        "--device", help="auto takes CUDA when present.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (splits, synthesis, fine-tuning).")] = 0,
    on_clean: Annotated[Literal["skip", "sanitize"], typer.Option(
        "--on-clean", help="When no backdoor is flagged: skip writes no model; sanitize unlearns the top "
                           "candidate anyway.")] = "skip",
    on_suspect: Annotated[Literal["report", "sanitize"], typer.Option(
        "--on-suspect", help="When the flag score is suspect (not flagged, not clean): report writes no model and "
                             "exits 5; sanitize unlearns the top candidate.")] = "report",
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a sanitizer setting (repeatable; see SanitizeConfig), e.g. "
                                           "--set finetune_epochs=10.")] = None,
) -> None:
    """Remove a backdoor from MODEL; writes DIR/report.json, DIR/pruning_history.json and the model in MODEL's
    format: DIR/model (an MLflow model folder) or, for a TorchScript or pt2 file, DIR/model.pt / DIR/model.pt2."""
    import gradprune_mlflow
    from gradprune_mlflow.cli.common import parse_settings
    from gradprune_mlflow.cli.progress import terminal_progress
    from gradprune_mlflow.config import SanitizeConfig
    from gradprune_mlflow.defense.triggers import load_trigger
    from gradprune_mlflow.errors import BadInput
    from gradprune_mlflow.models.io import is_mlflow_uri, load_model, model_format

    overrides = parse_settings(settings)
    own = sorted(set(overrides) & {"mode", "device", "seed", "on_clean", "on_suspect"})
    if own:  # one place per setting: otherwise --set mode=paper would lose silently to --mode's default
        raise BadInput(f"--set {own[0]}=...: use --{own[0].replace('_', '-')} instead")
    config = SanitizeConfig(mode=mode, device=device, seed=seed, on_clean=on_clean,
                            on_suspect=on_suspect).with_overrides(**overrides)
    # Cheap checks first: triggers, then the data (validated before any model is touched), then the model.
    known = load_trigger(trigger) if trigger else None
    evaluation = load_trigger(eval_trigger) if eval_trigger else None
    clean_set = load_clean_data(clean_data)
    test_set = load_clean_data(test_data) if test_data else None
    net = load_model(model)
    fmt = model_format(net, from_file=not is_mlflow_uri(model) and Path(model.removeprefix("file://")).is_file())

    progress = terminal_progress()
    try:
        result = gradprune_mlflow.sanitize(net, clean_set, known, config, eval_trigger=evaluation,
                                           test_set=test_set, progress=progress)
    finally:
        progress.close()
    result.report["model_format"] = fmt
    written = write_outputs(result, out, input_shape=clean_set.meta.input_shape)
    print_summary(result, written)
    from gradprune_mlflow.errors import Suspect, VerificationFailed
    from gradprune_mlflow.report.summary import suspect, suspect_reason, verification_failed, verification_finding

    if result.model is None and suspect(result.report):  # exit 5: nothing written, the evidence needs a look
        raise Suspect(f"{suspect_reason(result.report)}; no model written: review the evidence in {out}, "
                      "or rerun with --on-suspect sanitize")
    if verification_failed(result.report):  # exit 4: written, but not to be used unreviewed
        raise VerificationFailed(f"verification failed: {verification_finding(result.report)}; the model in {out} "
                                 "still answers to a trigger: review it before using it")


def load_clean_data(ref: str) -> CleanSet:
    """Fetch (for s3://bucket/prefix), validate with the Great Expectations suite, and load a clean set.

    Raises DataError (exit 2) for a missing set or one that fails validation, naming what failed.
    """
    from gradprune_mlflow.data.cleanset import load_clean_set
    from gradprune_mlflow.data.expectations import validate_clean_set
    from gradprune_mlflow.data.s3 import fetch_clean_set

    folder = fetch_clean_set(ref)
    validate_clean_set(folder, source=ref, raise_on_failure=True)
    return load_clean_set(folder, source=ref)


def write_outputs(result: SanitizeResult, out: Path, *, input_shape: tuple[int, int, int]) -> dict[str, Path]:
    """Write report.json, pruning_history.json, the model folder (when there is a model) and synthesized triggers.

    Returns what was written, by name. A model folder left by an earlier run is removed when this run has no model,
    so that DIR never pairs a report with another run's model.
    """
    from gradprune_mlflow.defense.trigger_files import save_triggers
    from gradprune_mlflow.models.io import save_model

    out.mkdir(parents=True, exist_ok=True)
    written = {"report": out / "report.json", "history": out / "pruning_history.json"}
    written["report"].write_text(json.dumps(result.report, indent=2) + "\n")
    written["history"].write_text(json.dumps(result.history, indent=2) + "\n")
    model_dir = out / "model"
    if result.model is not None:
        written["model"] = save_model(result.model, model_dir, input_shape=input_shape, history=result.history)
    elif (model_dir / "MLmodel").is_file():
        shutil.rmtree(model_dir)
    for i, path in enumerate(save_triggers(result.triggers, out / "triggers")):
        written[f"trigger{i}"] = path
    return written


def print_summary(result: SanitizeResult, written: dict[str, Path]) -> None:
    """A before/after table and where the files are, on stdout."""
    from rich.console import Console
    from rich.table import Table

    from gradprune_mlflow.report.summary import pct, rows, suspect, verification_headline

    report, console = result.report, Console(soft_wrap=True)  # long paths stay on one line in logs
    headline = verification_headline(report)
    if headline:  # first: a sanitized model that still answers to a trigger is the news
        colour = {"passed": "green", "failed": "yellow"}.get((report.get("verification") or {}).get("verdict"))
        console.print(headline.replace("**", "").replace("`", ""), style=colour, highlight=False, markup=False)
    table = Table(title="gradprune sanitize", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for label, key in rows(report):
        table.add_row(label, pct((report.get("before") or {}).get(key)), pct((report.get("after") or {}).get(key)))
    console.print(table)
    for line in _facts(report):
        console.print(line, highlight=False)
    if result.model is None and not suspect(report):
        console.print("no backdoor flagged: no model written (--on-clean sanitize unlearns the top candidate anyway)")
    console.print("wrote " + ", ".join(str(p) for p in written.values()), highlight=False)


def _num(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "?"


def _facts(report: dict[str, Any]) -> list[str]:
    from gradprune_mlflow.defense.evidence import describe

    lines = []
    det = report.get("detection")
    if det:
        by = det.get("flagged_by")
        flag = ("flagged" + (f" by the {by.replace('_', ' ')}" if by else "")) if det.get("flagged") else "not flagged"
        score = det.get("score") or {}
        scored = f", flag score {_num(score.get('value'))} of {_num(score.get('threshold'))}" if score else ""
        lines.append(f"detection: class {det.get('target')} {flag} (anomaly index {_num(det.get('anomaly_index'))}"
                     f"{scored})")
        if score.get("verdict") == "suspect":
            lines.append(f"suspect: {describe(score)}")
    lines.append(f"trigger: {report.get('trigger_source', '?')}; attack measured with "
                 f"{report.get('asr_measured_with', '?')} trigger; evaluated on {report.get('evaluated_on', '?')}")
    lines.append(f"pruned {report.get('pruned_filters', '?')} of {report.get('total_filters', '?')} filters, "
                 f"{report.get('gradient_passes', '?')} gradient passes, {_num(report.get('seconds'), '.1f')} s on "
                 f"{report.get('device', '?')} ({report.get('mode', '?')} mode)")
    return lines
