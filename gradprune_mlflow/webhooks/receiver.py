"""The ASGI receiver for MLflow webhooks (docs/contracts.md: `gradprune webhook serve`).

POST /webhook takes MLflow's deliveries; GET /health answers 200. Answers:
- 202 a verified `model_version.created` for a version to scan: `emit` was called and returned;
- 200 a verified delivery we ignore: another event, or a version carrying `gradprune.role` (one we registered);
- 400 a verified body that is not MLflow's JSON; 401 unsigned, forged or stale; 409 a replayed delivery id;
- 413 a body over `max_body` bytes (read no further); 503 `emit` failed (MLflow retries 5xx with the same id).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.webhooks import signature as sig
from gradprune_mlflow.webhooks.replay import ReplayCache

log = logging.getLogger("gradprune.webhook")

MAX_BODY = 1024 * 1024
PATH = "/webhook"
EVENT = "mlflow.model_version.created"


@dataclass(frozen=True)
class ModelVersionCreated:
    """A verified `model_version.created` delivery: the version and what MLflow sent about it."""

    name: str
    version: str
    delivery_id: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def resource_id(self) -> str:
        """The Prefect resource id of the version: mlflow.model-version.NAME.VERSION."""
        return f"mlflow.model-version.{self.name}.{self.version}"


Emit = Callable[[ModelVersionCreated], Awaitable[None]] | Callable[[ModelVersionCreated], None]


class _TooLarge(Exception):
    pass


def create_app(secret: str, emit: Emit, *, max_body: int = MAX_BODY, replay: ReplayCache | None = None) -> Starlette:
    """The receiver app.

    Takes the shared secret, the function to call for each version to scan (sync functions run in a worker
    thread; async ones are awaited), the body size limit in bytes and the replay cache (a fresh one by default).
    Returns a Starlette app to run under uvicorn. Raises ValueError for an empty secret.
    """
    if not secret:
        raise ValueError("the webhook secret is empty")
    seen = replay or ReplayCache(ttl=2 * sig.MAX_AGE_SECONDS + 60)

    async def receive(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, max_body)
        except _TooLarge:
            return _answer(413, f"body over {max_body} bytes")
        except ClientDisconnect:
            return _answer(400, "client disconnected")
        headers = request.headers
        delivery_id = headers.get(sig.DELIVERY_ID_HEADER)
        try:
            sig.verify(secret, delivery_id, headers.get(sig.TIMESTAMP_HEADER), headers.get(sig.SIGNATURE_HEADER), body)
        except sig.SignatureError as exc:
            log.warning("refused delivery %s: %s", delivery_id, exc)
            return _answer(401, str(exc))
        if not seen.reserve(delivery_id):
            log.warning("refused delivery %s: replayed", delivery_id)
            return _answer(409, f"delivery {delivery_id} was already received")
        try:
            return await _handle(body, delivery_id, emit)
        except Exception as exc:  # MLflow retries a 5xx with the same delivery id: let that one through
            seen.release(delivery_id)
            log.exception("delivery %s: emitting the event failed", delivery_id)
            return _answer(503, f"could not emit the event: {type(exc).__name__}: {exc}")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route(PATH, receive, methods=["POST"]), Route("/health", health, methods=["GET"])])


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing early (by Content-Length) or while streaming once it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _handle(body: bytes, delivery_id: str, emit: Emit) -> JSONResponse:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _answer(400, "body is not JSON")
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        return _answer(400, "body is not an MLflow webhook payload (no 'data' object)")
    event = f"{payload.get('entity')}.{payload.get('action')}"
    if event != "model_version.created":
        return _answer(200, f"ignored: event {event}", status="ignored")
    data = payload["data"]
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name or not isinstance(version, str | int) or not str(version).strip():
        return _answer(400, "model_version.created payload without a name and version")
    if T.ROLE in (data.get("tags") or {}):
        log.info("delivery %s: %s v%s carries %s; ignored", delivery_id, name, version, T.ROLE)
        return _answer(200, f"ignored: version carries {T.ROLE}", status="ignored")
    created = ModelVersionCreated(name, str(version), delivery_id, data)
    if inspect.iscoroutinefunction(emit):
        await emit(created)
    else:
        await to_thread.run_sync(emit, created)
    log.info("delivery %s: %s for %s", delivery_id, EVENT, created.resource_id)
    return JSONResponse({"status": "emitted", "event": EVENT, "resource": created.resource_id}, status_code=202)


def _answer(code: int, message: str, status: str | None = None) -> JSONResponse:
    return JSONResponse({"status": status or "refused", "message": message}, status_code=code)

