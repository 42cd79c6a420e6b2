"""Webhooks and job routes end to end: a Redis-mode `python -m backend serve`, a real worker process, the LS stand-in.

ANNOTATION_CREATED -> a correction record; ANNOTATIONS_DELETED -> gone; TASKS_CREATED with AUTO_PRELABEL -> the new
tasks get predictions; POST /jobs/prelabel + GET /jobs/{id} -> a whole project pre-labelled with progress;
START_TRAINING -> a training run in the worker whose decision /health shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from backend import rle
from evf_sam.data import layout
from tests.backend.conftest import png_bytes
from tests.backend.ls_api_standin import TOKEN, running
from tests.backend.ls_payloads import LABEL_CONFIG


def wait_for(condition: Callable[[], object], timeout: float = 90.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def stack(model_env, redis_db, start_worker, start_server, tmp_path_factory):
    with running() as ls:
        ls.files["1/red.png"] = png_bytes(64, 48)
        ls.add_project(5, LABEL_CONFIG)
        root = tmp_path_factory.mktemp("webhooks")
        env = {**model_env, **redis_db.env(), "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
               "CORRECTIONS_DIR": str(root / "corrections"), "CHECKPOINTS_DIR": str(root / "checkpoints"),
               "AUTO_PRELABEL": "1", "REDIS_KEY_PREFIX": f"evf-{redis_db.run_id}-wh",
               "QUEUE_INTERACTIVE": f"{redis_db.run_id}-wh-interactive", "QUEUE_BATCH": f"{redis_db.run_id}-wh-batch"}
        worker = start_worker(env, name=f"wh-{redis_db.run_id}")
        server = start_server(env)
        yield ls, server, root / "corrections", worker


def test_annotation_webhooks_create_and_delete_correction_records(stack) -> None:
    ls, server, corrections, worker = stack
    task = ls.add_task(5, {"image": "/data/upload/1/red.png"})
    predicted = np.zeros((48, 64), bool)
    predicted[12:36, 16:48] = True
    region = {"id": "r1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 64,
              "original_height": 48, "value": {"format": "rle", "rle": rle.encode(predicted),
                                               "brushlabels": ["Object"]}}
    prediction = ls.add_prediction(task, [region], "evf-x-p1")
    corrected = predicted.copy()
    corrected[:, 40:] = False
    annotation = ls.add_annotation(task, [{**region, "value": {**region["value"], "rle": rle.encode(corrected)}}],
                                   parent_prediction=prediction)
    event = {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": ls.tasks[task],
             "project": {"id": 5, "label_config": LABEL_CONFIG}}
    started = time.monotonic()
    assert httpx.post(server.url + "/webhook", json=event).status_code == 200
    assert time.monotonic() - started < 1.0  # acknowledged at once, captured by the worker

    def recorded() -> list[layout.Record]:
        if not (corrections / "records.jsonl").is_file():
            return []
        return [r for r in layout.read_records(corrections) if r.annotation_id == annotation["id"]]

    [record] = wait_for(recorded, what=f"the correction record\n{worker.log()[-2000:]}")
    assert record.extra["kind"] == "edited" and record.model_version == "evf-x-p1"
    assert np.array_equal(layout.load_mask(corrections / record.mask), corrected)

    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": annotation["id"]}], "project": {"id": 5}}
    assert httpx.post(server.url + "/webhook", json=deleted).status_code == 200
    wait_for(lambda: not recorded(), what="the records to go")


def test_tasks_created_webhook_prelabels_new_tasks_when_auto_prelabel_is_on(stack) -> None:
    ls, server, _, worker = stack
    tasks = [ls.add_task(5, {"image": "/data/upload/1/red.png", "prompt": "the red square"}) for _ in range(2)]
    event = {"action": "TASKS_CREATED", "tasks": [ls.tasks[t] for t in tasks], "project": {"id": 5}}
    assert httpx.post(server.url + "/webhook", json=event).status_code == 200
    wait_for(lambda: all(ls.predictions_of(t) for t in tasks), what=f"predictions\n{worker.log()[-2000:]}")
    assert all(len(ls.predictions_of(t)) == 1 for t in tasks)


def test_jobs_prelabel_route_reports_progress_until_finished(stack) -> None:
    ls, server, _, worker = stack
    ls.add_project(6, LABEL_CONFIG)
    tasks = [ls.add_task(6, {"image": "/data/upload/1/red.png", "prompt": "the red square"}) for _ in range(3)]
    broken = ls.add_task(6, {"image": "/data/upload/1/missing.png", "prompt": "x"})
    answer = httpx.post(server.url + "/jobs/prelabel", json={"project": 6, "chunk_size": 2})
    assert answer.status_code == 202, server.log()[-3000:]
    job_url = server.url + answer.json()["status_url"]
    report = wait_for(lambda: (r := httpx.get(job_url).json())["status"] == "finished" and r,
                      what=f"the job to finish\n{worker.log()[-2000:]}")
    assert (report["to_do"], report["done"], report["failed"], report["remaining"]) == (4, 3, 1, 0)
    assert report["failures"][0]["task"] == broken and report["failures"][0]["message"]
    assert all(len(ls.predictions_of(t)) == 1 for t in tasks)

    missing = httpx.get(server.url + "/jobs/prelabel-nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    bad = httpx.post(server.url + "/jobs/prelabel", json={"project": "six"})
    assert bad.status_code == 422 and bad.json()["field"] == "project"


def test_start_training_webhook_trains_in_a_worker_and_health_shows_the_decision(stack) -> None:
    from tests.backend.corrections.test_train import corrections as make_corrections

    ls, server, corrections, worker = stack
    make_corrections(corrections)  # 10 images; 9 usable records, h1 held out at the default 0.2
    event = {"action": "START_TRAINING", "project": {"id": 5}, "extra_params": {"train_steps": 2}}
    assert httpx.post(server.url + "/webhook", json=event).status_code == 200
    training = wait_for(lambda: httpx.get(server.url + "/health").json()["training"], timeout=180,
                        what=f"a training decision in /health\n{worker.log()[-3000:]}")
    last = training["last_run"]
    assert last["promoted"] == (last["after"]["giou"] > last["before"]["giou"])
    if last["promoted"]:
        assert training["active_checkpoint"].endswith("/" + last["checkpoint"].rsplit("/", 1)[-1])
    else:
        assert training["active_checkpoint"] is None
