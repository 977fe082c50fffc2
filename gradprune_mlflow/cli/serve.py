"""`gradprune serve`: the event-triggered sanitize deployment and the scheduled reconciler, served from one process.

Flow runs execute here, as subprocesses of this process, against PREFECT_API_URL (see gradprune_flows/deployments.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from gradprune_mlflow.errors import BadInput


def register(app: typer.Typer) -> None:
    """Add `serve` to the app."""
    app.command("serve")(serve_command)


def require_reachable(api_url: str) -> None:
    """Raise BadInput unless the Prefect API at `api_url` answers its health check (serving needs it from the start)."""
    import httpx

    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=30).raise_for_status()
    except httpx.HTTPError as exc:
        raise BadInput(f"cannot reach the Prefect API at {api_url} ({type(exc).__name__}); start it "
                       "(`prefect server start`) or fix PREFECT_API_URL") from None


def serve_command(
    scan_interval: Annotated[float, typer.Option(
        "--scan-interval", metavar="SECONDS", min=1, help="How often the reconciler scans the registry.")] = 600,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Most flow runs at once (default: no limit; the gradprune-gpu tag's "
                               "concurrency limit still holds sanitizations).")] = None,
    min_per_class: Annotated[int, typer.Option(
        "--min-per-class", help="Fewest clean images any class may have (the clean set is rejected below).")] = 10,
    mode: Annotated[Literal["fast", "paper"] | None, typer.Option("--mode", help="Sanitizer mode.")] = None,
    device: Annotated[Literal["auto", "cpu", "cuda"] | None, typer.Option("--device")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a sanitizer setting (repeatable; see SanitizeConfig).")] = None,
) -> None:
    """Serve the webhook-triggered and the scheduled deployments against PREFECT_API_URL until stopped."""
    from gradprune_mlflow.cli.common import parse_settings, quiet_output
    from gradprune_mlflow.cli.webhook import require_prefect_api
    from gradprune_mlflow.config import SanitizeConfig

    chosen = {"mode": mode, "device": device}
    overrides = {**parse_settings(settings), **{k: v for k, v in chosen.items() if v is not None}}
    SanitizeConfig().with_overrides(**overrides)  # bad settings fail here, before anything is registered
    require_reachable(require_prefect_api())
    quiet_output()
    from gradprune_flows.deployments import serve_deployments

    serve_deployments(limit=limit, scan_interval=scan_interval, config=overrides or None,
                      min_per_class=min_per_class)
