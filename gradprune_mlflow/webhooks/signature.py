"""The MLflow webhook signature: `v1,` + base64(HMAC-SHA256(secret, "DELIVERY_ID.TIMESTAMP.BODY")).

MLflow (mlflow/webhooks/delivery.py) sends it in `X-MLflow-Signature`, with the delivery id and the Unix timestamp it
signed in `X-MLflow-Delivery-Id` and `X-MLflow-Timestamp`. The timestamp bounds how long a captured delivery can be
replayed; the receiver's replay cache covers the window itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

from gradprune_mlflow.errors import BadInput

SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_ID_HEADER = "x-mlflow-delivery-id"
VERSION = "v1"
SECRET_ENV = "GRADPRUNE_WEBHOOK_SECRET"
# How far a delivery's timestamp may lie from our clock, either way (MLflow retries within seconds).
MAX_AGE_SECONDS = 300


class SignatureError(Exception):
    """The delivery is unsigned, forged, or too old (or from too far in the future); the message says which."""


def secret_from_env(env: dict[str, str] | None = None) -> str:
    """The shared secret from GRADPRUNE_WEBHOOK_SECRET; raises BadInput when it is unset or empty."""
    secret = (os.environ if env is None else env).get(SECRET_ENV, "")
    if not secret.strip():
        raise BadInput(f"{SECRET_ENV} is not set; set it to the webhook's shared secret (any long random string)")
    return secret


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for `body` (bytes as sent); returns 'v1,<base64>'."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), content, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode('ascii')}"


def verify(
    secret: str,
    delivery_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    now: float | None = None,
    max_age: float = MAX_AGE_SECONDS,
) -> None:
    """Check a delivery's headers against its body.

    Takes the secret, the three header values (None when missing) and the raw body. Returns None when the
    signature matches and the timestamp is within `max_age` seconds of `now`; raises SignatureError otherwise.
    """
    if not delivery_id or not timestamp or not signature:
        raise SignatureError("missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature")
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureError(f"X-MLflow-Timestamp is not a Unix timestamp: {timestamp[:40]!r}") from None
    age = (time.time() if now is None else now) - sent
    if abs(age) > max_age:
        raise SignatureError(f"stale delivery: signed {age:.0f} s from now (allowed: {max_age:.0f} s)")
    expected = sign(secret, delivery_id, timestamp, body)
    # MLflow sends one signature; Standard Webhooks allows several, space-separated: accept any that matches.
    if not any(hmac.compare_digest(expected, candidate) for candidate in signature.split()):
        raise SignatureError("signature does not match (wrong secret, or the body was changed)")
