"""`gradprune scan [--model NAME]`: one pass of the `scan-registry` Prefect flow, then a table of what it did.

The flow runs on the Prefect API at PREFECT_API_URL when set, else on Prefect's embedded temporary server.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated, Any, Literal

import typer

from gradprune_mlflow.errors import BadInput, GradpruneError


def register(app: typer.Typer) -> None:
    """Add `scan` to the app."""
    app.command("scan")(scan_command)


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings to a dict; values are read as JSON when they parse (3, 0.5, true), else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def quiet_output() -> None:
    """Keep the terminal for the flow's log and our table, and give Prefect's embedded server time to start.

    MLflow prints a 'View run' link for every run it ends (our table has the links), and importing mlflow.pytorch
    calls logging.basicConfig, whose root handler then echoes every record that propagates, INFO included. A root
    handler of our own, at WARNING, comes first and keeps warnings visible.
    """
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Prefect's embedded server gets 20 s to start by default; a busy two-core machine can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def scan_command(
    model: Annotated[str | None, typer.Option("--model", metavar="NAME",
                                              help="Only this registered model.")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Make versions that ended `failed` pending again first.")] = False,
    min_per_class: Annotated[int, typer.Option(
        "--min-per-class", help="Fewest clean images any class may have (the clean set is rejected below).")] = 10,
    mode: Annotated[Literal["fast", "paper"] | None, typer.Option("--mode", help="Sanitizer mode.")] = None,
    device: Annotated[Literal["auto", "cpu", "cuda"] | None, typer.Option("--device")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a sanitizer setting, e.g. --set finetune_epochs=10 "
                                           "(repeatable; see SanitizeConfig).")] = None,
) -> None:
    """Sanitize (or mark) every pending model version once, then print what happened to each."""
    from gradprune_mlflow.config import SanitizeConfig

    chosen = {"mode": mode, "device": device}
    overrides = {**parse_settings(settings), **{k: v for k, v in chosen.items() if v is not None}}
    SanitizeConfig().with_overrides(**overrides)  # bad settings fail here, before any server starts
    quiet_output()
    from flows.scan import scan_registry

    outcomes = scan_registry(model=model, config=overrides or None, min_per_class=min_per_class,
                             retry_failed=retry_failed)
    print_outcomes(outcomes)
    failed = [o for o in outcomes if o["status"] == "failed"]
    if failed:
        raise GradpruneError(f"{len(failed)} version(s) failed ({failed[0]['model']} v{failed[0]['version']}: "
                             f"{failed[0]['reason']}); rerun with --retry-failed once fixed")


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _pair(outcome: dict[str, Any], key: str) -> str:
    before, after = (outcome.get("before") or {}).get(key), (outcome.get("after") or {}).get(key)
    if before is None and after is None:
        return "-"
    return f"{_pct(before)} -> {_pct(after)}"


def outcomes_table(outcomes: list[dict[str, Any]], title: str = "gradprune scan"):
    """A rich Table: model, version, status, ASR and clean accuracy before -> after, the sanitized version."""
    from rich.table import Table

    table = Table(title=f"{title} (before -> after)", title_justify="left")
    for col in ("model", "version", "status", "ASR", "clean accuracy", "new version"):
        table.add_column(col, no_wrap=col in ("model", "status"), overflow="fold")
    colours = {"sanitized": "green", "clean": "green", "skipped": "dim"}
    for o in outcomes:
        status = o["status"]
        table.add_row(o["model"], str(o["version"]), f"[{colours.get(status, 'red')}]{status}[/]",
                      _pair(o, "attack_success_rate"), _pair(o, "clean_accuracy"),
                      f"v{o['sanitized_version']}" if o.get("sanitized_version") else "-")
    return table


def print_outcomes(outcomes: list[dict[str, Any]], title: str = "gradprune scan") -> None:
    """Print the outcomes table and, under it, each version's run link and the reason of every non-success."""
    from rich.console import Console

    console = Console(width=max(100, Console().width))
    if not outcomes:
        console.print("nothing pending: every version is done (or its model has no gradprune.clean_data tag and "
                      "GRADPRUNE_CLEAN_DATA is not set)")
        return
    console.print(outcomes_table(outcomes, title))
    for o in outcomes:
        line = f"{o['model']} v{o['version']} {o['status']}"
        if o.get("reason") and o["status"] != "sanitized":
            line += f": {o['reason']}"
        if o.get("run_url"):
            line += f" (run: {o['run_url']})"
        console.print(line, highlight=False, soft_wrap=True)
