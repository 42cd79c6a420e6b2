"""Queueing with real parts: RQ on the real Redis, `python -m backend worker` subprocesses, real servers.

Slow image downloads (the image server's `?delay=`) keep real predict jobs busy for a known time.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.backend.ls_payloads import predict_body, setup_body, task, textarea_context

pytestmark = pytest.mark.slow


def timed_post(url: str, body: dict) -> tuple[float, httpx.Response]:
    response = httpx.post(url, json=body, timeout=90)
    return time.monotonic(), response


def test_health_in_redis_mode_reports_the_workers_model(rq_stack, tiny_checkpoint):
    body = httpx.get(rq_stack.server.url + "/health").json()
    assert body["mode"] == "redis" and body["redis"] == "up"
    assert body["workers"] >= 1
    assert body["model_name"] == tiny_checkpoint.name and body["device"] == "cpu"


@pytest.mark.parametrize("mode", ["redis", "embedded"])
def test_interactive_jobs_overtake_a_full_batch_queue(mode, own_queues, model_env, start_server, start_worker,
                                                      image_server, redis_db):
    """One job at a time (WORKER_BATCH_JOBS=1, as before batching): the next job taken is the interactive one.
    With batching, the next batch starts with it (tests/backend/test_worker_batching.py)."""
    one_at_a_time = {"WORKER_BATCH_JOBS": "1"}
    if mode == "redis":  # one worker on queues of its own: no other test's worker can take these jobs
        env = {**own_queues, **one_at_a_time}
        processes = [start_worker(env, name=f"overtake-{own_queues['QUEUE_BATCH']}"), start_server(env)]
    else:
        processes = [start_server({**model_env, **one_at_a_time})]
    url = processes[-1].url
    assert httpx.post(url + "/setup", json=setup_body()).status_code == 200
    delay = 0.6
    batch = [task(i, image_server.image_url("red.png", delay=delay)) for i in range(1, 9)]  # 8 > 4: batch queue
    first_hit = len(image_server.hits)
    with ThreadPoolExecutor(1) as pool:
        batch_call = pool.submit(timed_post, url + "/predict", predict_body(batch))
        time.sleep(2 * delay)  # the single worker is now busy with the batch
        _, interactive = timed_post(
            url + "/predict", predict_body([task(100, image_server.image_url("small.png"))],
                                           context=textarea_context("the square")))
        _, batch_response = batch_call.result()
    assert interactive.status_code == 200 and batch_response.status_code == 200
    assert len(batch_response.json()["results"]) == 8
    # The interactive job ran as soon as the worker finished its current batch job, ahead of the waiting ones:
    # the image server saw most batch downloads after the interactive one (order of requests, not wall time).
    hits = image_server.hits[first_hit:]
    assert hits.count("/red.png") >= 8
    assert hits[hits.index("/small.png") + 1:].count("/red.png") >= 4
    if mode == "redis":  # every job ran alone
        ids = [job_id for lane in ("QUEUE_INTERACTIVE", "QUEUE_BATCH")
               for job_id in FinishedJobRegistry(own_queues[lane], connection=redis_db.client()).get_job_ids()]
        jobs = Job.fetch_many(ids, connection=redis_db.client(), serializer=JSONSerializer)
        assert len(jobs) == 9 and {job.meta["batch"]["size"] for job in jobs} == {1}
    for process in processes:
        process.stop()


def test_embedded_mode_output_equals_rq_mode(rq_stack, embedded_server, image_server):
    tasks = [task(1, image_server.image_url("red.png"), prompt="the red square"),
             task(2, image_server.image_url("exif.jpg"))]
    answers = []
    for server in (embedded_server, rq_stack.server):
        httpx.post(server.url + "/setup", json=setup_body(extra_params={"mask_mode": "instances"}, project="21.1"))
        response = httpx.post(server.url + "/predict", json=predict_body(tasks, project="21.1"), timeout=90)
        assert response.status_code == 200
        answers.append(response.json())
    assert answers[0] == answers[1]


def test_bad_input_fails_once_with_its_reason_kept(rq_stack, image_server, redis_db):
    queue = rq_stack.env["QUEUE_INTERACTIVE"]
    failed_before = set(FailedJobRegistry(queue, connection=redis_db.client()).get_job_ids())
    hits_before = image_server.hits.count("/broken.png")
    body = predict_body([task(31, image_server.image_url("broken.png"))])
    [prediction] = httpx.post(rq_stack.server.url + "/predict", json=body, timeout=90).json()["results"]
    assert prediction["result"] == [] and prediction["score"] == 0.0
    [job_id] = set(FailedJobRegistry(queue, connection=redis_db.client()).get_job_ids()) - failed_before
    job = Job.fetch(job_id, connection=redis_db.client(), serializer=JSONSerializer)
    assert job.meta["error"]["code"] and job.meta["error"]["message"]
    assert image_server.hits.count("/broken.png") == hits_before + 1  # bad input is not retried


@pytest.fixture
def own_queues(model_env, redis_db):
    """Queues of their own, so the shared stack's worker cannot take these jobs."""
    suffix = f"{redis_db.run_id}-{time.monotonic_ns() % 10**6}"
    return {**model_env, **redis_db.env(), "QUEUE_INTERACTIVE": f"int-{suffix}", "QUEUE_BATCH": f"bat-{suffix}"}


def test_a_job_of_a_killed_worker_completes_on_another_worker_which_stops_cleanly(own_queues, start_server, start_worker,
                                                              image_server, redis_db):
    workers = start_worker(own_queues, names=["killed-or-kept-a", "killed-or-kept-b"])
    server = start_server(own_queues)
    httpx.post(server.url + "/setup", json=setup_body())
    registry = StartedJobRegistry(own_queues["QUEUE_INTERACTIVE"], connection=redis_db.client())
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(timed_post, server.url + "/predict",
                           predict_body([task(41, image_server.image_url("red.png", delay=5))]))
        deadline = time.monotonic() + 30
        while not registry.get_job_ids() and time.monotonic() < deadline:
            time.sleep(0.1)
        [job_id] = registry.get_job_ids()
        job = Job.fetch(job_id, connection=redis_db.client(), serializer=JSONSerializer)
        victim = job.worker_name
        workers[victim].stop(signal.SIGKILL)
        killed_at = time.monotonic()
        answered_at, response = call.result()
    print(f"job of the SIGKILLed worker answered {answered_at - killed_at:.1f} s after the kill "
          f"(abandoned after {own_queues['WORKER_ABANDONED_AFTER']} s + a 5 s image download)")
    assert response.status_code == 200
    [survivor] = set(workers) - {victim}
    result = Job.fetch(job_id, connection=redis_db.client(), serializer=JSONSerializer).latest_result()
    assert result.type == result.Type.SUCCESSFUL
    assert result.worker_name == survivor
    assert response.json()["results"][0] == result.return_value
    # SIGTERM on the idle survivor: a clean exit that leaves no registered worker behind.
    assert workers[survivor].stop(signal.SIGTERM, timeout=20) == 0
    assert not redis_db.client().sismember(f"rq:workers:{own_queues['QUEUE_INTERACTIVE']}", f"rq:worker:{survivor}")


def test_burst_worker_drains_queued_webhook_events_and_exits(own_queues, start_server, start_worker, redis_db):
    server = start_server(own_queues)
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 12}, "task": {"id": 3}, "project": {"id": 7}}
    job_id = httpx.post(server.url + "/webhook", json=event).json()["job_id"]
    worker = start_worker(own_queues, name="burst", extra_args=("--burst",))
    assert worker.popen.wait(60) == 0
    job = Job.fetch(job_id, connection=redis_db.client(), serializer=JSONSerializer)
    assert job.get_status() == "finished"
    assert job.return_value()["annotation"] == 12 and job.return_value()["action"] == "ANNOTATION_CREATED"


def test_tasks_past_the_deadline_get_empty_predictions_and_queued_ones_are_cancelled(own_queues, start_server,
                                                                                     start_worker, image_server,
                                                                                     redis_db):
    # the only worker on these queues; batches of 2, so the third task waits in the queue
    worker = start_worker({**own_queues, "WORKER_BATCH_JOBS": "2"}, name=f"deadline-{own_queues['QUEUE_BATCH']}")
    server = start_server({**own_queues, "PREDICT_TIMEOUT": "2"})
    httpx.post(server.url + "/setup", json=setup_body())
    slow = [task(i, image_server.image_url("red.png", delay=3)) for i in (51, 52, 53)]
    started = time.monotonic()
    results = httpx.post(server.url + "/predict", json=predict_body(slow), timeout=30).json()["results"]
    assert time.monotonic() - started < 10
    assert [r["result"] for r in results] == [[], [], []] and all(r["model_version"] for r in results)
    assert 'evf_task_failures_total{reason="timeout"} 3.0' in httpx.get(server.url + "/metrics").text
    canceled = redis_db.client().zcard(f"rq:canceled:{own_queues['QUEUE_INTERACTIVE']}")
    assert canceled >= 1  # the third task never started: cancelled, not left for a worker
    worker.stop()
    server.stop()
