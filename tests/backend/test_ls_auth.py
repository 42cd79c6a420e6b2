"""LS credentials: legacy vs PAT, origin equality, access-token refresh and caching against a real loopback server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from backend.errors import AuthError, Unavailable
from backend.ls_auth import LabelStudioAuth, is_jwt, origin
from tests.backend.http_servers import FakeLabelStudio, serve


def test_origin_normalises_scheme_host_and_default_ports() -> None:
    assert origin("HTTP://LS.example.com/data/upload/1/a.png") == ("http", "ls.example.com", 80)
    assert origin("https://ls.example.com:443/x") == origin("https://ls.example.com/y")
    assert origin("http://ls:8080") != origin("http://ls:8081")
    assert origin("s3://bucket/key") is None and origin("/data/upload/1/a.png") is None
    assert origin("http://[::1]:bad/") is None


def test_legacy_token_only_for_the_ls_origin() -> None:
    auth = LabelStudioAuth("http://ls.example.com:8080/", "abc123")
    assert not auth.is_pat
    assert auth.headers_for("http://ls.example.com:8080/data/upload/1/a.png") == {"Authorization": "Token abc123"}
    for other in ("http://ls.example.com:8081/a.png", "https://ls.example.com:8080/a.png", "http://evil.com/a.png",
                  "http://ls.example.com.evil.com:8080/a.png", "http://user@evil.com:8080/"):
        assert auth.headers_for(other) == {}
    assert "abc123" not in repr(auth)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LabelStudioAuth("ls.example.com", "key")
    with pytest.raises(ValueError):
        LabelStudioAuth("http://ls.example.com", "  ")


def test_pat_is_exchanged_and_cached() -> None:
    with serve(FakeLabelStudio()) as ls:
        pat = ls.make_pat()
        assert is_jwt(pat) and not is_jwt("abc123")
        auth = LabelStudioAuth(ls.url, pat)
        assert auth.is_pat
        first = auth.headers_for(ls.url + "/data/upload/1/a.png")
        second = auth.headers_for(ls.url + "/api/projects")
        assert first == second and first["Authorization"].startswith("Bearer ")
        assert first["Authorization"] != f"Bearer {pat}"  # the PAT itself is never sent as Bearer
        assert ls.refreshes == 1 and auth.refresh_count == 1
        assert auth.headers_for("http://other.example.com/a.png") == {}
        refresh = [r for r in ls.requests if r.path == "/api/token/refresh/"]
        assert len(refresh) == 1 and refresh[0].method == "POST"
        assert "authorization" not in refresh[0].headers


def test_access_token_renewed_before_expiry() -> None:
    with serve(FakeLabelStudio(access_lifetime=1.5)) as ls:
        auth = LabelStudioAuth(ls.url, ls.make_pat(), refresh_margin=0.5)
        first = auth.headers_for(ls.url)
        assert auth.headers_for(ls.url) == first
        time.sleep(1.3)  # past exp - min(margin, lifetime / 5)
        assert auth.headers_for(ls.url) != first
        assert ls.refreshes == 2


def test_invalidate_forces_a_new_access_token() -> None:
    with serve(FakeLabelStudio()) as ls:
        auth = LabelStudioAuth(ls.url, ls.make_pat())
        first = auth.headers_for(ls.url)
        auth.invalidate()
        assert auth.headers_for(ls.url) != first and ls.refreshes == 2


def test_concurrent_callers_share_one_refresh() -> None:
    with serve(FakeLabelStudio()) as ls:
        auth = LabelStudioAuth(ls.url, ls.make_pat())
        with ThreadPoolExecutor(8) as pool:
            headers = list(pool.map(lambda _: auth.headers_for(ls.url), range(16)))
        assert len({h["Authorization"] for h in headers}) == 1 and ls.refreshes == 1


def test_refused_pat_is_an_auth_error() -> None:
    with serve(FakeLabelStudio()) as ls:
        forged = FakeLabelStudio()
        forged.SECRET = "another-secret-of-enough-length-0123456789"
        auth = LabelStudioAuth(ls.url, forged.make_pat())
        with pytest.raises(AuthError, match="refused the Personal Access Token") as info:
            auth.headers_for(ls.url)
        assert info.value.field == "LABEL_STUDIO_API_KEY"
        assert forged.make_pat() not in info.value.message


def test_unreachable_ls_during_refresh() -> None:
    with serve(FakeLabelStudio()) as ls:
        pat = ls.make_pat()
        url = ls.url
    auth = LabelStudioAuth(url, pat, timeout=2)  # the server is gone now
    with pytest.raises(Unavailable, match="unreachable"):
        auth.headers_for(url)


def test_shared_client_is_used() -> None:
    with serve(FakeLabelStudio()) as ls, httpx.Client() as client:
        auth = LabelStudioAuth(ls.url, ls.make_pat(), client=client)
        assert auth.headers_for(ls.url)["Authorization"].startswith("Bearer ")
