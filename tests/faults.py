"""A real network fault for tests: an HTTP forwarder on loopback in front of a real server (moto S3, `mlflow server`).

Clients are pointed at the forwarder instead of the server. It passes every request through, and on demand drops
connections without an answer (the endpoint is down, from the start or after N more requests) or answers chosen
requests with an HTTP error, the way a failing server or load balancer would. Nothing in the code under test is
patched: the failures travel over the wire and meet the real clients' retry logic.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "content-length", "host"}


@dataclass
class Rule:
    """Answer requests that `match(method, path, body)` with `status`, `times` times (None: always)."""

    match: Callable[[str, str, bytes], bool]
    status: int = 500
    times: int | None = 1


class FlakyProxy:
    """Forward HTTP requests from a loopback port to `target` (http://host:port); see the module docstring."""

    def __init__(self, target: str):
        self.target = urlsplit(target)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request that reached the target
        self.dropped = 0
        self.rules: list[Rule] = []
        self._down = False
        self._down_after: int | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def down(self, after: int | None = None) -> None:
        """Drop every request from now on, or after `after` more requests have gone through."""
        with self._lock:
            self._down, self._down_after = after is None, after

    def up(self) -> None:
        """Pass requests through again and forget the rules."""
        with self._lock:
            self._down, self._down_after, self.rules = False, None, []

    def count(self, method: str, path_part: str) -> int:
        """How many `method` requests whose path contains `path_part` reached the target."""
        return sum(1 for m, p in self.requests if m == method and path_part in p)

    def _verdict(self, method: str, path: str, body: bytes) -> int | None:
        """None to forward, 0 to drop the connection, else an HTTP status to answer with."""
        with self._lock:
            if self._down_after is not None:
                if self._down_after <= 0:
                    self._down, self._down_after = True, None
                else:
                    self._down_after -= 1
            if self._down:
                self.dropped += 1
                return 0
            for rule in self.rules:
                if rule.times != 0 and rule.match(method, path, body):
                    rule.times = None if rule.times is None else rule.times - 1
                    return rule.status
            self.requests.append((method, path))
            return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                verdict = proxy._verdict(self.command, self.path, body)
                if verdict == 0:
                    self.close_connection = True
                    return
                if verdict is not None:
                    msg = b'{"error_code": "INTERNAL_ERROR", "message": "injected fault"}'
                    self.send_response(verdict)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Host"] = proxy.target.netloc
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:  # the target itself is down: look down too
                    self.close_connection = True
                    return
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                if self.command != "HEAD":  # a HEAD answer keeps the length of the body it did not send
                    self.send_header("Content-Length", str(len(data)))
                else:
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

        return Handler
