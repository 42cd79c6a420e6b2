"""Real HTTP servers on loopback for media/auth tests: a small Label Studio look-alike and a foreign host.

Both record every request (method, path, headers) so tests can prove where credentials went. The LS look-alike issues
real HS256 JWTs with PyJWT: a PAT is a refresh token, `/api/token/refresh/` returns access tokens with a short `exp`.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt

Reply = tuple[int, dict[str, Any], bytes]
Route = Callable[["Request"], Reply]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """A running loopback server; `routes` maps a path (without query) to a handler, `requests` records calls."""

    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def route(self, path: str, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.routes[path] = lambda request: (status, headers or {}, body)

    def auth_headers(self) -> list[str | None]:
        return [r.headers.get("authorization") for r in self.requests]


@contextmanager
def serve(server: Server | None = None, host: str = "127.0.0.1") -> Iterator[Server]:
    """Run `server` on `host` (random port) in a thread for the duration of the block. Another loopback address
    (127.0.0.2, ...) is a different host to the backend than 127.0.0.1."""
    state = server or Server()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            request = Request(self.command, parts.path, parse_qs(parts.query),
                              {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
            state.requests.append(request)
            handler = state.routes.get(parts.path)
            status, headers, body = handler(request) if handler else (404, {}, b"not found")
            self.send_response(status)
            headers = {"Content-Length": str(len(body)), **headers}
            if headers["Content-Length"] is None:  # no length: the body ends when the connection closes
                self.close_connection = True
            for key, value in headers.items():
                if value is not None:
                    self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD" and body:
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        do_GET = do_POST = do_HEAD = _handle

    with serving(Handler, host) as url:
        state.url = url
        yield state


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> Iterator[str]:
    """Run `handler` in a threaded HTTP server on `host` (random port); yields its base URL, stops it on exit."""
    httpd = ThreadingHTTPServer((host, 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


class FakeLabelStudio(Server):
    """LS-shaped auth: legacy `Token`, PAT refresh → `Bearer` access JWTs; protected media routes answer 401 without."""

    SECRET = "loopback-test-signing-key-0123456789abcdef"

    def __init__(self, legacy_token: str = "legacy-token-123", access_lifetime: float = 300.0) -> None:
        super().__init__()
        self.legacy_token = legacy_token
        self.access_lifetime = access_lifetime
        self.access_secret = self.SECRET + "-access"
        self.refreshes = 0
        self.routes["/api/token/refresh/"] = self._refresh

    def make_pat(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"token_type": "refresh", "exp": now + 86400 * 365, "iat": now, "jti": "pat-1", "user_id": 1,
                   **claims}
        return jwt.encode(payload, self.SECRET, algorithm="HS256")

    def _refresh(self, request: Request) -> Reply:
        try:
            refresh = json.loads(request.body)["refresh"]
            claims = jwt.decode(refresh, self.SECRET, algorithms=["HS256"])
            assert claims["token_type"] == "refresh"
        except Exception:  # noqa: BLE001 - any bad input is a 401, as in LS
            return 401, {"Content-Type": "application/json"}, b'{"detail": "Token is invalid or expired"}'
        self.refreshes += 1
        now = time.time()
        access = jwt.encode({"token_type": "access", "exp": now + self.access_lifetime, "iat": now,
                             "jti": f"access-{self.refreshes}", "user_id": 1}, self.access_secret, algorithm="HS256")
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": access}).encode()

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if header == f"Token {self.legacy_token}":
            return True
        if header.startswith("Bearer "):
            try:
                claims = jwt.decode(header[7:], self.access_secret, algorithms=["HS256"])
            except jwt.PyJWTError:
                return False
            return claims.get("token_type") == "access"
        return False

    def protect(self, path: str, reply: Route | Reply) -> None:
        """Serve `reply` at `path` only to authorized requests (401 otherwise)."""
        def handler(request: Request) -> Reply:
            if not self.authorized(request):
                return 401, {"Content-Type": "application/json"}, b'{"detail": "Authentication required."}'
            return reply(request) if callable(reply) else reply
        self.routes[path] = handler

    def revoke_access_tokens(self) -> None:
        """Invalidate every access token issued so far (as after a key rotation)."""
        self.access_secret += "-rotated"

    def add_presign(self, task_id: int, target_for: Callable[[str], str]) -> None:
        """`GET /tasks/{id}/presign/?fileuri=<b64>` → 303 to `target_for(decoded uri)`."""
        def handler(request: Request) -> Reply:
            uri = base64.urlsafe_b64decode(request.query["fileuri"][0]).decode()
            return 303, {"Location": target_for(uri)}, b""
        self.protect(f"/tasks/{task_id}/presign/", handler)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
