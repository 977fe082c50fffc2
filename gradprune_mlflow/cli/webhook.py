"""`gradprune webhook serve|register`: MLflow's `model_version.created` webhook into Prefect events.

`serve` runs the receiver (gradprune_mlflow/webhooks) under uvicorn and sends each verified delivery to the Prefect
API as an event (gradprune_flows/events.py); `register` creates (or updates) the MLflow webhook that delivers to it.
Both take the shared secret from GRADPRUNE_WEBHOOK_SECRET.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from gradprune_mlflow.errors import BadInput

WEBHOOK_NAME = "gradprune-model-version-created"
MLFLOW_EVENT = "model_version.created"
# What an MLflow server needs before it delivers to an http:// or loopback / in-cluster receiver.
SERVER_SETTINGS_HINT = ("an http:// receiver needs MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and a loopback or "
                        "private address MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true, both on the MLflow server")

webhook_app = typer.Typer(name="webhook", help="The MLflow webhook: receive deliveries, or register the webhook.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `webhook serve` and `webhook register` to the app."""
    app.add_typer(webhook_app, name="webhook")


@webhook_app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8765,
) -> None:
    """Receive MLflow webhook deliveries on POST /webhook and emit a Prefect event for each new model version."""
    from gradprune_mlflow.webhooks.receiver import create_app
    from gradprune_mlflow.webhooks.signature import secret_from_env

    secret = secret_from_env()
    require_prefect_api()
    import uvicorn

    from gradprune_flows.events import emit_model_version_created

    _log_deliveries()
    typer.echo(f"gradprune webhook receiver on http://{host}:{port}/webhook")
    uvicorn.run(create_app(secret, emit_model_version_created), host=host, port=port, log_level="info")


@webhook_app.command("register")
def register_command(
    url: Annotated[str, typer.Option("--url", help="The receiver's URL, e.g. https://gradprune.example/webhook.")],
    name: Annotated[str, typer.Option("--name", help="The webhook's name in MLflow.")] = WEBHOOK_NAME,
) -> None:
    """Create the MLflow webhook for model_version.created (or point the existing one of that name at URL)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from gradprune_mlflow.webhooks.signature import secret_from_env

    secret = secret_from_env()
    client = MlflowClient()
    try:
        existing = [w for w in _all_webhooks(client) if w.name == name]
        if existing:
            hook = client.update_webhook(existing[0].webhook_id, url=url, events=[MLFLOW_EVENT], secret=secret,
                                         status="ACTIVE")
        else:
            hook = client.create_webhook(name, url, events=[MLFLOW_EVENT], secret=secret,
                                         description="gradprune: scan new model versions")
    except MlflowException as exc:
        raise BadInput(f"MLflow refused the webhook: {exc.message}; {SERVER_SETTINGS_HINT}") from None
    typer.echo(f"webhook {hook.name} ({hook.webhook_id}) {'updated' if existing else 'created'}: "
               f"{MLFLOW_EVENT} -> {hook.url}")


def _log_deliveries() -> None:
    """One line per delivery on stderr. Importing MLflow and Prefect configures the root logger already (at
    WARNING), so the receiver's logger gets a handler of its own."""
    logger = logging.getLogger("gradprune.webhook")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _all_webhooks(client) -> list:
    out, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def require_prefect_api() -> str:
    """The Prefect API URL (PREFECT_API_URL or the active profile's); raises BadInput when none is set.

    Events and automations need a running Prefect server: Prefect's embedded temporary one would lose them.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise BadInput("PREFECT_API_URL is not set; point it at the Prefect server (e.g. http://127.0.0.1:4200/api "
                       "after `prefect server start`)")
    return url
