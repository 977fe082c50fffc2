"""`gradprune scan [--model NAME]`: one pass of the `scan-registry` Prefect flow, then a table of what it did.

The flow runs on the Prefect API at PREFECT_API_URL when set, else on Prefect's embedded temporary server.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from gradprune_mlflow.cli.common import parse_settings, print_outcomes, quiet_output
from gradprune_mlflow.errors import GradpruneError


def register(app: typer.Typer) -> None:
    """Add `scan` to the app."""
    app.command("scan")(scan_command)


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
    from gradprune_flows.scan import scan_registry

    outcomes = scan_registry(model=model, config=overrides or None, min_per_class=min_per_class,
                             retry_failed=retry_failed)
    print_outcomes(outcomes)
    failed = [o for o in outcomes if o["status"] == "failed"]
    if failed:
        raise GradpruneError(f"{len(failed)} version(s) failed ({failed[0]['model']} v{failed[0]['version']}: "
                             f"{failed[0]['reason']}); rerun with --retry-failed once fixed")
