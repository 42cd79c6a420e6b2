"""HTTP behaviour that needs no model: auth, webhook secret, error bodies, health, metrics.

Runs a real `python -m backend serve` in Redis mode (which never loads the model) against the real Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.backend.ls_payloads import NO_BRUSH_CONFIG, predict_body, setup_body, task

AUTH = ("ls-user", "ls-pass-123")
SECRET = "hook-secret-xyz"


@pytest.fixture(scope="module")
def no_worker_env(base_env, redis_db):
    """Redis mode on queues no worker listens to."""
    env = {**base_env, **redis_db.env()}
    return {**env, "QUEUE_INTERACTIVE": env["QUEUE_INTERACTIVE"] + "-idle", "QUEUE_BATCH": env["QUEUE_BATCH"] + "-idle",
            "REDIS_KEY_PREFIX": env["REDIS_KEY_PREFIX"] + "-idle"}


@pytest.fixture(scope="module")
def guarded(start_server, no_worker_env):
    """A Redis-mode server with Basic auth and a webhook secret, and no worker."""
    return start_server({**no_worker_env, "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1],
                         "WEBHOOK_SECRET": SECRET})


@pytest.fixture(scope="module")
def open_server(start_server, no_worker_env):
    """A Redis-mode server without auth, and no worker."""
    return start_server(no_worker_env)


def assert_error_body(response: httpx.Response, status: int | tuple[int, ...], field: str | None = None) -> dict:
    assert response.status_code in (status if isinstance(status, tuple) else (status,)), response.text
    body = response.json()
    assert set(body) == {"error", "message", "field"}
    assert body["message"] and "Traceback" not in body["message"]
    if field is not None:
        assert body["field"] == field
    return body


@pytest.mark.parametrize("method, path", [("GET", "/health"), ("POST", "/setup"), ("POST", "/predict"),
                                          ("GET", "/versions"), ("GET", "/metrics")])
def test_basic_auth_guards_every_route_but_webhook(guarded, method, path):
    response = httpx.request(method, guarded.url + path, json={})
    assert_error_body(response, 401)
    assert response.headers["www-authenticate"].startswith("Basic")
    wrong = httpx.request(method, guarded.url + path, json={}, auth=(AUTH[0], "wrong"))
    assert wrong.status_code == 401


def test_basic_auth_accepts_the_right_credentials(guarded):
    assert httpx.get(guarded.url + "/health", auth=AUTH).status_code == 200
    assert httpx.get(guarded.url + "/versions", auth=AUTH).json() == {"versions": []}


def test_webhook_needs_the_secret_header_not_basic_auth(guarded):
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 3}, "task": {"id": 1}, "project": {"id": 7}}
    assert_error_body(httpx.post(guarded.url + "/webhook", json=event), 401)
    assert_error_body(httpx.post(guarded.url + "/webhook", json=event, headers={"X-Webhook-Secret": "nope"}), 401)
    response = httpx.post(guarded.url + "/webhook", json=event, headers={"X-Webhook-Secret": SECRET})
    assert response.status_code == 200
    assert response.json()["status"] == "queued"


def test_webhook_queues_known_events_and_acknowledges_unknown_ones(open_server, redis_db, no_worker_env):
    timings = []
    with httpx.Client() as client:  # one client: creating one costs ~100 ms of TLS setup, not server time
        for _ in range(5):
            started = time.perf_counter()
            queued = client.post(open_server.url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
            timings.append(time.perf_counter() - started)
            assert queued.status_code == 200 and queued.json()["status"] == "queued"
    print(f"/webhook acknowledged (job queued in Redis): median {sorted(timings)[2] * 1000:.1f} ms of 5")
    batch_queue = no_worker_env["QUEUE_BATCH"]
    assert queued.json()["job_id"].encode() in redis_db.client().lrange(f"rq:queue:{batch_queue}", 0, -1)
    unknown = httpx.post(open_server.url + "/webhook", json={"action": "LABEL_LINK_CREATED", "project": 7})
    assert unknown.status_code == 200 and unknown.json()["status"] == "ignored"
    assert_error_body(httpx.post(open_server.url + "/webhook", json={"no": "action"}), (400, 422), "action")


def test_malformed_json_is_a_400_json_body(open_server):
    for path in ("/predict", "/setup", "/webhook"):
        response = httpx.post(open_server.url + path, content=b'{"tasks": [', headers={"content-type": "application/json"})
        body = assert_error_body(response, 400, "body")
        assert "JSON" in body["message"]


def test_missing_and_wrong_fields_name_the_field(open_server):
    assert_error_body(httpx.post(open_server.url + "/predict", json={"project": "1.1"}), 422, "tasks")
    assert_error_body(httpx.post(open_server.url + "/predict", json=predict_body([])), 422, "tasks")
    assert_error_body(httpx.post(open_server.url + "/setup", json={"project": "1.1"}), 422, "schema")
    bad_extra = setup_body(extra_params="{not json")
    assert_error_body(httpx.post(open_server.url + "/setup", json=bad_extra), (400, 422), "extra_params")
    bad_context = predict_body([task(1, "http://127.0.0.1:1/x.png")], context="text")
    assert_error_body(httpx.post(open_server.url + "/predict", json=bad_context), (400, 422), "params.context")


def test_unservable_label_config_is_a_422_naming_the_problem(open_server):
    body = assert_error_body(httpx.post(open_server.url + "/setup", json=setup_body(NO_BRUSH_CONFIG)), 422)
    assert "Brush" in body["message"]
    predict = predict_body([task(1, "http://127.0.0.1:1/x.png")], label_config=NO_BRUSH_CONFIG)
    assert_error_body(httpx.post(open_server.url + "/predict", json=predict), 422)


def test_without_a_worker_setup_and_predict_answer_503_and_queue_nothing(open_server, redis_db, no_worker_env):
    assert_error_body(httpx.post(open_server.url + "/setup", json=setup_body()), 503)
    interactive_queue = no_worker_env["QUEUE_INTERACTIVE"]
    before = redis_db.client().llen(f"rq:queue:{interactive_queue}")
    assert_error_body(httpx.post(open_server.url + "/predict", json=predict_body([task(1, "http://x/y.png")])), 503)
    assert redis_db.client().llen(f"rq:queue:{interactive_queue}") == before


def test_unknown_routes_and_methods_are_json(open_server):
    assert_error_body(httpx.get(open_server.url + "/nope"), 404)
    assert_error_body(httpx.get(open_server.url + "/predict"), 405)


def test_health_reports_mode_queues_and_redis(open_server, no_worker_env):
    with httpx.Client() as client:
        client.get(open_server.url + "/health")
        started = time.perf_counter()
        body = client.get(open_server.url + "/health").json()
        elapsed = time.perf_counter() - started
    assert body["status"] == "UP"
    assert body["mode"] == "redis" and body["redis"] == "up"
    assert set(body["queues"]) == {no_worker_env["QUEUE_INTERACTIVE"], no_worker_env["QUEUE_BATCH"]}
    print(f"/health answered in {elapsed * 1000:.1f} ms (machine load {os.getloadavg()[0]:.1f})")


def test_health_reports_redis_down_instead_of_hanging(start_server, base_env):
    server = start_server({**base_env, "REDIS_URL": "redis://127.0.0.1:1/0", "QUEUE_INTERACTIVE": "x",
                           "QUEUE_BATCH": "y"})
    body = httpx.get(server.url + "/health", timeout=2).json()
    assert body["redis"] == "down"
    assert_error_body(httpx.post(server.url + "/predict", json=predict_body([task(1, "http://x/y.png")])), 503)


def test_metrics_are_prometheus_text(open_server):
    httpx.get(open_server.url + "/health")
    response = httpx.get(open_server.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'evf_http_requests_total{route="/health",status="200"}' in response.text
    assert "evf_queue_depth" in response.text


def test_the_server_module_does_not_import_torch():
    """Redis-mode servers never load the model, so importing the app must stay light."""
    code = "import sys, backend.app, backend.__main__; print(sorted({'torch', 'evf_sam.loading'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_secrets_never_reach_the_server_log(guarded):
    httpx.get(guarded.url + "/health", auth=AUTH)
    httpx.get(guarded.url + "/health", auth=(AUTH[0], "wrong-" + AUTH[1]))
    httpx.post(guarded.url + "/setup", json=setup_body(), auth=AUTH)  # carries LS's access_token
    httpx.post(guarded.url + "/webhook", json={"action": "X"}, headers={"X-Webhook-Secret": SECRET})
    log = guarded.log()
    assert "backend ready" in log
    for secret in (AUTH[1], SECRET, "creator-legacy-token"):
        assert secret not in log
