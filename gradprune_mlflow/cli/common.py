"""Helpers the sub-commands share: `--set KEY=VALUE` parsing, a quiet terminal for flow runs, and the table of
what a scan did to each version (`scan` and `demo` print it).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from gradprune_mlflow.errors import BadInput
from gradprune_mlflow.report.summary import pct


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


def _attack_pair(outcome: dict[str, Any]) -> str:
    """ASR before -> after; without a real trigger to measure with, the synthesized trigger's rate, labelled so."""
    real = _pair(outcome, "attack_success_rate")
    synthesized = _pair(outcome, "synthesized_trigger_success_rate")
    return f"{synthesized} (synthesized trigger)" if real == "-" and synthesized != "-" else real


def _pair(outcome: dict[str, Any], key: str) -> str:
    before, after = (outcome.get("before") or {}).get(key), (outcome.get("after") or {}).get(key)
    if before is None and after is None:
        return "-"
    return f"{pct(before)} -> {pct(after)}"


def outcomes_table(outcomes: list[dict[str, Any]], title: str = "gradprune scan"):
    """A rich Table: model, version, status, ASR and clean accuracy before -> after, the sanitized version."""
    from rich.table import Table

    table = Table(title=f"{title} (before -> after)", title_justify="left")
    for col in ("model", "version", "status", "ASR", "clean accuracy", "new version"):
        table.add_column(col, no_wrap=col in ("model", "status"), overflow="fold")
    # unverified (registered without the alias) and suspect (nothing registered, the evidence short of a flag): for a
    # person to review; neither a success nor an error
    colours = {"sanitized": "green", "clean": "green", "unverified": "yellow", "suspect": "yellow", "skipped": "dim"}
    for o in outcomes:
        status = o["status"]
        table.add_row(o["model"], str(o["version"]), f"[{colours.get(status, 'red')}]{status}[/]",
                      _attack_pair(o), _pair(o, "clean_accuracy"),
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
