"""Faults of the parts around the backend, produced for real: a private `redis-server` stopped and restarted under a
running server + worker, and a Label Studio API that keeps answering 500 to prediction write-back.

A worker SIGKILLed mid-job is covered by tests/backend/test_queueing.py
(test_a_job_of_a_killed_worker_completes_on_another_worker_which_stops_cleanly) and by benchmarks/soak.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.backend.conftest import REPO, png_bytes
from tests.backend.ls_api_standin import TOKEN, running
from tests.backend.ls_payloads import LABEL_CONFIG, predict_body, setup_body, task
from tests.reliability.conftest import spawn_worker

pytestmark = pytest.mark.slow


def answered(response: httpx.Response) -> bool:
    return response.status_code == 200 and len(response.json()["results"]) == 1


def wait_for_predict(client: httpx.Client, body: dict, seconds: float = 60) -> tuple[httpx.Response, float]:
    """POST /predict until it is no longer 503 (or time is up); returns the last answer and the time it took."""
    started = time.monotonic()
    while True:
        response = client.post("/predict", json=body)
        if response.status_code != 503 or time.monotonic() - started > seconds:
            return response, time.monotonic() - started
        time.sleep(0.5)


@pytest.fixture
def redis_stack(private_redis, model_env, start_server, tmp_path):
    """Server + one worker on the private Redis; yields (server, worker, env)."""
    env = {**model_env, **private_redis.env("faults"), "PREDICT_TIMEOUT": "20"}
    worker = spawn_worker(env, "fault-worker", tmp_path, redis.Redis(port=private_redis.port))
    try:
        yield start_server(env), worker, env
    finally:
        worker.stop(signal.SIGKILL)


def test_redis_down_is_reported_503_and_work_resumes_after_a_restart(redis_stack, private_redis, image_server):
    server, worker, _ = redis_stack
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/setup", json=setup_body()).status_code == 200
        body = predict_body([task(1, image_server.image_url("red.png"), prompt="the red square")])
        assert answered(client.post("/predict", json=body))

        private_redis.stop()
        started = time.monotonic()
        health = client.get("/health", timeout=2)
        assert time.monotonic() - started < 1.0  # within LS's /health timeout
        assert health.status_code == 200 and health.json()["redis"] == "down", health.text
        time.sleep(2.1)  # past the server's 2 s model-info cache
        for path, payload in (("/predict", body), ("/setup", setup_body())):
            refused = client.post(path, json=payload)
            assert refused.status_code == 503, refused.text
            error = refused.json()
            assert error["error"] in ("unavailable", "redis_unavailable") and "Redis" in error["message"], error

        private_redis.start()  # same port, empty: "Redis may lose everything"
        response, waited = wait_for_predict(client, body)
        print(f"/predict answered again {waited:.1f} s after Redis came back (empty)")
        assert response.status_code == 200, response.text
        assert answered(response) and response.json()["results"][0]["result"], "task not predicted"
        assert client.get("/health").json()["redis"] == "up"
        assert worker.popen.poll() is None, "the worker died with Redis"


def test_a_worker_busy_while_redis_restarts_keeps_serving(redis_stack, private_redis, image_server):
    server, worker, _ = redis_stack
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/setup", json=setup_body()).status_code == 200
        slow = predict_body([task(2, image_server.image_url("red.png", delay=3))])
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.post, "/predict", json=slow)
            time.sleep(1.0)
            private_redis.stop()
            response = in_flight.result(timeout=60)
        # The call in flight is still answered: one (empty) prediction, its reason logged.
        assert response.status_code == 200 and response.json()["results"][0]["result"] == [], response.text
        assert re.search(r"task 2: empty prediction \(", server.log())
        time.sleep(3)  # the job finished during the outage
        private_redis.start()
        body = predict_body([task(3, image_server.image_url("red.png"), prompt="the red square")])
        deadline = time.monotonic() + 30
        response = None
        while worker.popen.poll() is None and time.monotonic() < deadline:  # a dead worker fails at once
            response = client.post("/predict", json=body)
            if response.status_code == 200:
                break
            time.sleep(0.5)
        assert worker.popen.poll() is None, "the worker quit while Redis was down"
        assert response is not None and answered(response), response and response.text


def test_label_studio_500s_on_write_back_are_retried_then_reported_failed(model_env):
    """Bulk pre-labelling (H8) writing predictions to an LS that answers 500: retried with backoff, then the run
    reports each task failed with the LS error (nothing silently lost). Transient 5xx/lost writes that recover are
    covered by tests/backend/test_prelabel.py and tests/backend/test_ls_client.py."""
    with running() as ls:
        ls.files["1/red.png"] = png_bytes(64, 48)
        ls.add_project(3, LABEL_CONFIG)
        tasks = [ls.add_task(3, {"image": "/data/upload/1/red.png", "prompt": "the red square"}) for _ in range(3)]
        ls.fail("/api/projects/3/import/predictions", 500, times=1000, method="POST")
        ls.fail("/api/predictions", 500, times=1000, method="POST")
        env = {**model_env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN}
        run = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", "3"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=240)
        output = run.stdout + run.stderr
        assert run.returncode != 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        for task_id in tasks:
            assert re.search(rf"task {task_id}: ls_write_failed: .*HTTP 500", run.stdout), output[-3000:]
        assert "done 0, failed 3" in run.stdout
        assert "500" in output
        assert all(ls.predictions_of(task_id) == [] for task_id in tasks)
        writes = ls.count("POST", "/api/projects/3/import/predictions") + ls.count("POST", "/api/predictions")
        assert writes >= 2, "the write was not retried"
