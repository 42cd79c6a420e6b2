"""Where the backend fetches from, end to end through a real `python -m backend serve` (embedded, tiny checkpoint).

Three recording loopback servers: a Label Studio look-alike on 127.0.0.1 (PAT -> access JWT refresh, protected
media), a foreign host on 127.0.0.2 and an allow-listed host on 127.0.0.3 (MEDIA_ALLOWED_HOSTS). Different loopback
addresses are different hosts to `backend.media` (it compares scheme, host and port of the URL).
The unit-level twins of these cases are in tests/backend/test_media.py; this file proves the server wires them up.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.backend.conftest import png_bytes
from tests.backend.http_servers import FakeLabelStudio, serve, write_tree
from tests.backend.ls_payloads import predict_body, setup_body, task

pytestmark = pytest.mark.slow

PNG = png_bytes(32, 24)


@pytest.fixture(scope="module")
def ls():
    with serve(FakeLabelStudio()) as server:
        yield server


@pytest.fixture(scope="module")
def foreign():
    with serve(host="127.0.0.2") as server:
        server.route("/img.png", body=PNG, headers={"Content-Type": "image/png"})
        server.route("/presigned.png", body=PNG, headers={"Content-Type": "image/png"})
        yield server


@pytest.fixture(scope="module")
def allowed(foreign):
    with serve(host="127.0.0.3") as server:
        server.route("/img.png", body=PNG, headers={"Content-Type": "image/png"})
        server.route("/to-foreign", status=302, headers={"Location": foreign.url + "/img.png"})
        yield server


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("local-files")
    write_tree(base / "docs", {"images/a.png": PNG})
    write_tree(base, {"secret.png": PNG})
    (base / "docs" / "images" / "link.png").symlink_to(base / "secret.png")
    return base / "docs"


@pytest.fixture(scope="module")
def pat(ls) -> str:
    return ls.make_pat()


@pytest.fixture(scope="module")
def server(start_server, model_env, ls, foreign, allowed, root, pat):
    ls.protect("/data/upload/1/a.png", (200, {"Content-Type": "image/png"}, PNG))
    ls.protect("/go-foreign", lambda request: (302, {"Location": foreign.url + "/img.png"}, b""))
    ls.protect("/go-allowed", lambda request: (302, {"Location": allowed.url + "/img.png"}, b""))
    ls.add_presign(5, lambda uri: foreign.url + "/presigned.png?X-Amz-Signature=s3cr3t")
    env = {**model_env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": pat, "MEDIA_ALLOWED_HOSTS": "127.0.0.3",
           "LOCAL_FILES_DOCUMENT_ROOT": str(root), "MEDIA_TIMEOUT": "5"}
    process = start_server(env)
    assert httpx.post(process.url + "/setup", json=setup_body()).status_code == 200
    return process


def run_batch(server, cases: list[tuple[int, str, str | None]], **params) -> None:
    """Predict a batch; tasks with a code must fail with that logged reason, the others must be predicted."""
    tasks = [task(task_id, url) for task_id, url, _ in cases]
    body = predict_body(tasks)
    body["params"].update(params)
    response = httpx.post(server.url + "/predict", json=body, timeout=90)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == len(cases)
    log = server.log()
    for task_id, url, code in cases:
        failure = re.search(rf"task {task_id}: empty prediction \(([a-z_]+)\): (.*)", log)
        if code is None:
            assert failure is None, failure.group(0)
            assert re.search(rf"task {task_id}: \d+ region\(s\)", log), url
        else:
            assert failure is not None and failure.group(1) == code, (url, failure and failure.group(0))


def test_only_ls_allowed_hosts_and_the_document_root_are_read(server, ls, foreign, allowed, pat):
    foreign_hostport = foreign.url.removeprefix("http://")
    ls_hostport = ls.url.removeprefix("http://")
    foreign_port = foreign_hostport.rsplit(":", 1)[1]
    cases = [
        (1, "/data/upload/1/a.png", None),                                    # LS, with credentials
        (2, ls.url + "/data/upload/1/a.png", None),                           # LS absolute
        (3, allowed.url + "/img.png", None),                                  # allow-listed, no credentials
        (4, "/go-allowed", None),                                             # LS redirect to an allowed host
        (5, "s3://bucket/a.png", None),                                       # presigned by LS: /tasks/5/presign/
        (6, foreign.url + "/img.png", "media_forbidden"),
        (7, f"http://127.0.0.1:{foreign_port}/img.png", "media_forbidden"),   # LS's host, another port
        (8, "/go-foreign", "media_forbidden"),                                # LS redirect elsewhere
        (9, allowed.url + "/to-foreign", "media_forbidden"),                  # allowed host redirect elsewhere
        (10, f"http://{ls_hostport}@{foreign_hostport}/img.png", "media_forbidden"),   # userinfo trick
        (11, f"http://127.0.0.3\\@{foreign_hostport}/img.png", "media_forbidden"),     # parser differential
        (12, "http://2130706434:" + foreign_port + "/img.png", "media_forbidden"),     # 127.0.0.2 as an integer
        (13, f"http://[::ffff:127.0.0.2]:{foreign_port}/img.png", "media_forbidden"),
        (14, "file:///etc/passwd", "bad_image"),
        (15, "/data/local-files/?d=images/a.png", None),
        (16, "/data/local-files/?d=../secret.png", "media_forbidden"),
        (17, "/data/local-files/?d=images/../../secret.png", "media_forbidden"),
        (18, "/data/local-files/?d=%2e%2e/secret.png", "media_forbidden"),
        (19, "/data/local-files/?d=images/link.png", "media_forbidden"),       # symlink out of the root
        (20, "/data/local-files/?d=/etc/passwd", "image_not_found"),           # absolute -> under the root
    ]
    run_batch(server, cases)
    # the foreign host saw only the presigned download, without credentials
    assert [r.path for r in foreign.requests] == ["/presigned.png"]
    assert all("authorization" not in r.headers for r in foreign.requests + allowed.requests)
    assert sorted(r.path for r in allowed.requests) == ["/img.png", "/img.png", "/to-foreign"]
    # LS got every LS request with a Bearer access token; the PAT itself only ever went to the refresh endpoint
    media = [r for r in ls.requests if r.path != "/api/token/refresh/"]
    assert media and all(r.headers.get("authorization", "").startswith("Bearer ") for r in media)
    for request in ls.requests + foreign.requests + allowed.requests:
        where = pat in request.body.decode(errors="replace"), pat in str(request.headers)
        assert not where[1], f"PAT sent as a header to {request.path}"
        assert not where[0] or request.path == "/api/token/refresh/"


def test_hostname_from_the_request_cannot_redirect_relative_urls_when_ls_is_configured(server, ls, foreign):
    before = len(foreign.requests)
    run_batch(server, [(31, "/data/upload/1/a.png", None)], hostname=foreign.url)
    assert len(foreign.requests) == before
    assert ls.requests[-1].path == "/data/upload/1/a.png"


def test_expired_access_token_is_refreshed_and_the_download_retried(server, ls):
    """Unit-level twin: tests/backend/test_media.py::test_pat_refresh_and_retry_on_401."""
    run_batch(server, [(41, "/data/upload/1/a.png", None)])
    refreshes = ls.refreshes
    ls.revoke_access_tokens()  # every access token the backend holds is now refused with 401
    run_batch(server, [(42, "/data/upload/1/a.png", None)])
    assert ls.refreshes == refreshes + 1
    downloads = [r for r in ls.requests if r.path == "/data/upload/1/a.png"]
    assert downloads[-1].headers["authorization"] != downloads[-2].headers["authorization"]


def test_a_revoked_pat_fails_the_task_with_a_clear_reason(start_server, model_env, ls):
    """A PAT LS no longer accepts: the task fails naming the credentials; nothing is retried forever."""
    process = start_server({**model_env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": "not-a-valid-token",
                            "MEDIA_TIMEOUT": "5"})
    assert httpx.post(process.url + "/setup", json=setup_body()).status_code == 200
    run_batch(process, [(51, "/data/upload/1/a.png", "media_unauthorized")])
    assert "LABEL_STUDIO_API_KEY" in process.log()
    assert "not-a-valid-token" not in process.log()
