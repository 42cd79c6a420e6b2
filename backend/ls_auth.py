"""Credentials for calls to Label Studio: legacy token or Personal Access Token, and only ever for LS's own origin.

- Legacy token (opaque): `Authorization: Token <key>`.
- Personal Access Token (a JWT refresh token): exchanged at `POST {LS}/api/token/refresh/ {"refresh": PAT}` for a
  short-lived access JWT, sent as `Authorization: Bearer <access>`, cached until shortly before its `exp`. Sending the
  PAT itself as Bearer is refused by LS (reference label_studio.md §7.2).

Headers are returned only for URLs whose scheme, host and port equal LS's, so public URLs, storage hosts and presigned
redirects never see LS credentials. The key is never logged or shown in `repr`.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import httpx
import jwt

from backend.errors import AuthError, Unavailable

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL, default ports filled in; None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def is_jwt(key: str) -> bool:
    """True when `key` parses as a JWT (a Personal Access Token), as the LS SDK decides Bearer vs Token."""
    try:
        jwt.get_unverified_header(key)
        jwt.decode(key, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    return True


class LabelStudioAuth:
    """Authorization headers for one Label Studio instance (thread-safe; refreshes PAT access tokens itself)."""

    def __init__(self, ls_url: str, api_key: str, *, timeout: float = 10.0, refresh_margin: float = 30.0,
                 client: httpx.Client | None = None) -> None:
        ls_origin = origin(ls_url)
        if ls_origin is None:
            raise ValueError("the Label Studio URL must be an absolute http(s) URL")
        if not api_key or not api_key.strip():
            raise ValueError("the Label Studio API key is empty")
        self.ls_url = ls_url.rstrip("/")
        self.origin = ls_origin
        self.is_pat = is_jwt(api_key.strip())
        self._key = api_key.strip()
        self._timeout = timeout
        self._margin = refresh_margin
        self._client = client
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires = 0.0
        self.refresh_count = 0  # how many access tokens were fetched (observability and tests)

    def __repr__(self) -> str:
        return f"LabelStudioAuth({self.ls_url!r}, {'PAT' if self.is_pat else 'legacy token'})"

    def is_ls_url(self, url: str) -> bool:
        """True when `url` has LS's scheme, host and port."""
        return origin(url) == self.origin

    def headers_for(self, url: str) -> dict[str, str]:
        """`{"Authorization": ...}` for a URL on the LS origin, `{}` for any other. May refresh a PAT access token
        (AuthError when LS refuses the PAT, Unavailable when LS cannot be reached)."""
        if not self.is_ls_url(url):
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self._key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def invalidate(self) -> None:
        """Forget the cached access token (after LS answered 401), so the next `headers_for` fetches a new one."""
        with self._lock:
            self._access, self._access_expires = None, 0.0

    def _access_token(self) -> str:
        with self._lock:
            if self._access is None or time.time() >= self._access_expires:
                self._access, self._access_expires = self._refresh()
            return self._access

    def _refresh(self) -> tuple[str, float]:
        url = f"{self.ls_url}/api/token/refresh/"
        try:
            if self._client is not None:
                response = self._client.post(url, json={"refresh": self._key}, timeout=self._timeout)
            else:
                with httpx.Client(trust_env=False, timeout=self._timeout) as client:
                    response = client.post(url, json={"refresh": self._key})
        except httpx.HTTPError as error:
            raise Unavailable(f"Label Studio at {self.ls_url} is unreachable for the token refresh: "
                              f"{type(error).__name__}", code="ls_unreachable") from None
        if response.status_code in (400, 401, 403):
            raise AuthError(f"Label Studio refused the Personal Access Token (HTTP {response.status_code} from "
                            "/api/token/refresh/): it may be revoked or rotated; set a current LABEL_STUDIO_API_KEY",
                            code="ls_auth_failed", field="LABEL_STUDIO_API_KEY")
        try:
            access = response.json()["access"]
            claims = jwt.decode(access, options={"verify_signature": False})
        except (ValueError, KeyError, TypeError, jwt.PyJWTError):
            raise Unavailable(f"Label Studio answered HTTP {response.status_code} without an access token to "
                              "/api/token/refresh/", code="ls_bad_response") from None
        self.refresh_count += 1
        expires = float(claims.get("exp", time.time() + 60))
        lifetime = expires - float(claims.get("iat", expires - 300))
        # Renew a little before expiry: `refresh_margin`, at most a fifth of the token's lifetime.
        return access, expires - min(self._margin, max(lifetime, 0) / 5)
