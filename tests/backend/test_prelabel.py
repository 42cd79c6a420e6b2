"""Bulk pre-labelling against a loopback LS API stand-in, real Redis and real worker processes.

Covers: skipping tasks that carry a current-version prediction, resuming on rerun, no duplicates when two runs
overlap (claims + re-check), write retries that re-check LS first, failures reported with reasons, job state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from backend.errors import BackendError
from backend.ls_auth import LabelStudioAuth
from backend.ls_client import LabelStudioClient
from backend.prelabel import Claims, JobState, PrelabelRequest, parse_task_ids, process_chunk
from tests.backend.conftest import REPO, png_bytes
from tests.backend.ls_api_standin import TOKEN, LabelStudioStandIn, running
from tests.backend.ls_payloads import LABEL_CONFIG


def run_cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", "prelabel", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def ls():
    with running() as state:
        state.files["1/red.png"] = png_bytes(64, 48)
        state.files["1/small.png"] = png_bytes(40, 32, (30, 200, 30))
        state.files["1/broken.png"] = b"\x89PNG\r\n\x1a\n not an image"
        yield state


def add_tasks(ls: LabelStudioStandIn, project: int, count: int) -> list[int]:
    ls.add_project(project, LABEL_CONFIG)
    return [ls.add_task(project, {"image": f"/data/upload/1/{'red' if n % 2 else 'small'}.png",
                                  "prompt": "the coloured square"}) for n in range(count)]


def versions_per_task(ls: LabelStudioStandIn, tasks: list[int]) -> dict[int, list[str]]:
    return {task: sorted(p["model_version"] for p in ls.predictions_of(task)) for task in tasks}


def test_embedded_run_predicts_every_task_once_then_rerun_only_does_the_new_ones(ls, model_env) -> None:
    env = {**model_env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN}
    tasks = add_tasks(ls, 1, 3)
    first = run_cli(env, "--project", "1", "--chunk-size", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 task(s) listed, 0 already predicted, 3 to predict" in first.stdout
    assert "task/s" in first.stderr or "s/task" in first.stderr  # tqdm bar with its rate
    found = versions_per_task(ls, tasks)
    version = found[tasks[0]][0]
    assert all(v == [version] for v in found.values())
    prediction = ls.predictions_of(tasks[0])[0]
    assert prediction["result"] and prediction["result"][0]["value"]["brushlabels"] in (["Object"], ["Cat"])
    assert prediction["result"][0]["original_width"] == 40

    tasks += add_tasks(ls, 1, 2)  # new tasks arrive; an interrupted run looks the same: some done, some not
    second = run_cli(env, "--project", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "5 task(s) listed, 3 already predicted, 2 to predict" in second.stdout
    assert all(v == [version] for v in versions_per_task(ls, tasks).values())

    third = run_cli(env, "--project", "1", "--prompt", "Cat: a green square")  # new prompt -> new model_version
    assert third.returncode == 0, third.stderr[-3000:]
    assert all(len(v) == 2 and version in v for v in versions_per_task(ls, tasks).values())


def test_interrupted_run_resumes_without_duplicates(ls, model_env) -> None:
    import signal

    env = {**model_env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN}
    tasks = add_tasks(ls, 7, 6)
    ls.write_delay = 0.4
    run = subprocess.Popen([sys.executable, "-m", "backend", "prelabel", "--project", "7", "--chunk-size", "1"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while sum(bool(ls.predictions_of(t)) for t in tasks) < 2:
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    stdout, _ = run.communicate(timeout=60)
    assert run.returncode == 130 and "run the same command again to resume" in stdout
    time.sleep(1.0)  # a write the run had sent before the signal may still be landing (write_delay)
    finished = sum(bool(ls.predictions_of(t)) for t in tasks)
    assert 2 <= finished < 6

    ls.write_delay = 0.0
    again = run_cli(env, "--project", "7")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"6 task(s) listed, {finished} already predicted, {6 - finished} to predict" in again.stdout
    assert all(len(v) == 1 for v in versions_per_task(ls, tasks).values())


def test_rq_overlapping_runs_and_a_lost_write_leave_one_prediction_per_task(ls, model_env, redis_db,
                                                                             start_worker) -> None:
    # Own queues: a session-wide worker without LS credentials (the rq_stack fixture) must not take these chunks.
    env = {**model_env, **redis_db.env(), "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "REDIS_KEY_PREFIX": f"evf-{redis_db.run_id}-pre", "QUEUE_INTERACTIVE": f"{redis_db.run_id}-pre-interactive",
           "QUEUE_BATCH": f"{redis_db.run_id}-pre-batch"}
    tasks = add_tasks(ls, 2, 8)
    broken = ls.add_task(2, {"image": "/data/upload/1/broken.png", "prompt": "x"})
    for name in ("a", "b"):
        start_worker(env, name=f"pre-{name}-{redis_db.run_id}")
    ls.write_delay = 0.3
    ls.fail_after_storing("/api/projects/2/import/predictions", 500, times=1)  # stored, but the answer says 500
    ls.fail("/api/projects/2/import/predictions", 503, times=1)  # not stored

    runs = [subprocess.Popen([sys.executable, "-m", "backend", "prelabel", "--project", "2", "--chunk-size", "3"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=240) for run in runs]
    # The broken image fails in the run that claimed it (exit 1); the other run skipped it as claimed elsewhere.
    failing = [stdout for (stdout, _), run in zip(outputs, runs) if run.returncode == 1]
    assert failing and all(run.returncode in (0, 1) for run in runs), outputs
    assert f"task {broken}: bad_image" in failing[0]
    versions = versions_per_task(ls, tasks)
    assert all(v == [versions[tasks[0]][0]] for v in versions.values()), versions
    assert ls.predictions_of(broken) == []

    job_id = failing[0].split()[1].rstrip(":")
    status = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--status", job_id], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    report = json.loads(status.stdout)
    assert report["status"] == "finished" and report["remaining"] == 0 and report["to_do"] == 9
    assert report["done"] + report["skipped"] == 8 and report["failed"] == 1
    assert report["failures"][0]["task"] == broken and report["failures"][0]["code"] == "bad_image"


def test_concurrent_chunks_of_two_runs_claim_each_task_once(ls, redis_db) -> None:
    ls.add_project(3, LABEL_CONFIG)
    tasks = [ls.add_task(3, {"image": "x.png"}) for _ in range(6)]
    redis = redis_db.client()
    prefix = f"evf-{uuid.uuid4().hex[:6]}"
    state, claims = JobState(redis, prefix), Claims(redis, prefix, ttl=60)
    predicted: list[int] = []

    def predict(payloads: list[dict]) -> list[dict]:
        predicted.extend(payload["task_id"] for payload in payloads)
        time.sleep(0.05)
        return [{"result": [], "score": 0.0, "model_version": "mv-1"} for _ in payloads]

    def one_run(job_id: str) -> None:
        state.create(job_id, status="running", to_do=len(tasks))
        with LabelStudioClient(ls.url, LabelStudioAuth(ls.url, TOKEN), backoff=0.01) as client:
            process_chunk({"job_id": job_id, "project": 3, "model_version": "mv-1",
                           "tasks": [{"task_id": t} for t in tasks]},
                          state=state, claims=claims, client=client, predict=predict)

    threads = [threading.Thread(target=one_run, args=(f"job-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(predicted) == tasks
    assert all(len(ls.predictions_of(t, "mv-1")) == 1 for t in tasks)
    reports = [state.get(f"job-{n}") for n in range(3)]
    assert sum(r["done"] for r in reports) == len(tasks)
    assert all(r["remaining"] == 0 and r["failed"] == 0 for r in reports)
    assert not list(redis.scan_iter(f"{prefix}:prelabel:claim:*"))  # every claim released


def test_without_the_bulk_import_route_predictions_are_written_one_by_one(ls, redis_db) -> None:
    ls.add_project(8, LABEL_CONFIG)
    tasks = [ls.add_task(8, {"image": "x.png"}) for _ in range(3)]
    ls.fail("/api/projects/8/import/predictions", 404, times=99)  # an older LS
    state = JobState()
    state.create("j", status="running", to_do=3)
    with LabelStudioClient(ls.url, LabelStudioAuth(ls.url, TOKEN), backoff=0.01) as client:
        process_chunk({"job_id": "j", "project": 8, "model_version": "mv", "tasks": [{"task_id": t} for t in tasks]},
                      state=state, claims=Claims(), client=client,
                      predict=lambda payloads: [{"result": [], "score": 0.1, "model_version": "mv"}] * len(payloads))
    assert state.get("j")["done"] == 3 and all(len(ls.predictions_of(t, "mv")) == 1 for t in tasks)
    assert ls.count("POST", "/api/predictions") == 3


def test_job_state_counts_each_task_once_and_done_beats_an_earlier_failure(redis_db) -> None:
    for state in (JobState(redis_db.client(), f"evf-{uuid.uuid4().hex[:6]}"), JobState()):
        state.create("j", status="running", to_do=3)
        state.mark("j", 1, "done")
        state.mark("j", 1, "done")
        state.mark("j", 2, "failed", "worker_lost", "gone")
        assert state.get("j")["remaining"] == 1 and state.get("j")["failed"] == 1
        state.mark("j", 2, "done")
        state.mark("j", 2, "failed", "late", "callback after success")
        state.mark("j", 3, "skipped", "already_predicted", "x")
        report = state.get("j")
        assert (report["done"], report["failed"], report["skipped"], report["remaining"]) == (2, 0, 1, 0)
        assert report["status"] == "finished"
        assert state.get("unknown") is None


def test_request_validation_and_task_id_ranges_name_the_field() -> None:
    from backend.errors import BadRequest

    assert parse_task_ids("1,3-5, 9") == [1, 3, 4, 5, 9]
    with pytest.raises(BadRequest, match="--tasks"):
        parse_task_ids("1,a")
    for body, field in (({"project": "x"}, "project"), ({"project": 1, "prompts": [""]}, "prompts"),
                        ({"project": 1, "filter": []}, "filter"), ({"project": 1, "chunk_size": 0}, "chunk_size")):
        with pytest.raises(BadRequest) as raised:
            PrelabelRequest.from_json(body)
        assert raised.value.field == field


def test_missing_label_studio_settings_are_explained(base_env) -> None:
    result = run_cli(base_env, "--project", "1", timeout=60)
    assert result.returncode == 2 and "LABEL_STUDIO_URL" in result.stderr and "Traceback" not in result.stderr


def test_embedded_server_prelabels_through_its_own_dispatcher(ls, model_env, start_server) -> None:
    import httpx

    tasks = add_tasks(ls, 4, 3)
    server = start_server({**model_env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN})
    answer = httpx.post(server.url + "/jobs/prelabel", json={"project": 4, "chunk_size": 2})
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 120
    while (report := httpx.get(server.url + answer.json()["status_url"]).json())["status"] != "finished":
        assert time.monotonic() < deadline, report
        time.sleep(0.3)
    assert (report["done"], report["failed"], report["remaining"]) == (3, 0, 0)
    assert all(len(v) == 1 for v in versions_per_task(ls, tasks).values())
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "UP" and "training" in health


def test_a_chunk_is_predicted_in_one_batched_call_and_transient_failures_are_retried_together(ls) -> None:
    ls.add_project(9, LABEL_CONFIG)
    tasks = [ls.add_task(9, {"image": "x.png"}) for _ in range(4)]
    calls: list[list[int]] = []

    def predict(payloads: list[dict]) -> list:
        calls.append([payload["task_id"] for payload in payloads])
        outcomes: list = []
        for payload in payloads:
            if payload["task_id"] == tasks[1]:
                outcomes.append(BackendError("no such image", status=422, code="bad_image"))  # permanent
            elif payload["task_id"] == tasks[2] and len(calls) == 1:
                outcomes.append(RuntimeError("GPU hiccup"))  # transient: tried again
            else:
                outcomes.append({"result": [], "score": 0.5, "model_version": "mv"})
        return outcomes

    state = JobState()
    state.create("j", status="running", to_do=4)
    with LabelStudioClient(ls.url, LabelStudioAuth(ls.url, TOKEN), backoff=0.01) as client:
        process_chunk({"job_id": "j", "project": 9, "model_version": "mv", "tasks": [{"task_id": t} for t in tasks]},
                      state=state, claims=Claims(), client=client, predict=predict, retries=1)
    assert calls == [tasks, [tasks[2]]]
    report = state.get("j")
    assert (report["done"], report["failed"], report["remaining"]) == (3, 1, 0)
    assert report["failures"] == [{"task": tasks[1], "code": "bad_image", "message": "no such image"}]
    assert [len(ls.predictions_of(t, "mv")) for t in tasks] == [1, 0, 1, 1]
