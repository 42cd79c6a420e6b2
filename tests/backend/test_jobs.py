"""Job functions run in-process exactly as workers run them: tiny checkpoint, images from the loopback server."""

from __future__ import annotations

import numpy as np
import pytest

from backend import jobs, rle
from backend.errors import BackendError
from backend.settings import get_settings


@pytest.fixture
def job_env(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("EVF_SAM_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("EVF_SAM_DEVICE", "cpu")
    monkeypatch.setenv("MEDIA_ALLOWED_HOSTS", "127.0.0.1")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def payload(url: str, **options) -> dict:
    return {"task_id": 1, "hostname": None, "prompt_hash": "abcdef123456",
            "options": {"mask_mode": "semantic", "min_area": 0, "fill_holes_below": 0, "max_instances": 20,
                        "semantic": False, **options},
            "images": [{"url": url, "to_name": "image",
                        "requests": [{"from_name": "tag", "type": "brushlabels", "label": "Cat", "prompt": "a cat"},
                                     {"from_name": "tag", "type": "brushlabels", "label": "Object",
                                      "prompt": "the square"}]}]}


def test_predict_task_answers_an_ls_prediction_at_the_exif_transposed_size(job_env, image_server):
    prediction = jobs.predict_task(payload(image_server.image_url("exif.jpg")))
    assert set(prediction) == {"result", "score", "model_version"}
    assert prediction["model_version"].endswith("-pabcdef")
    for region in prediction["result"]:
        assert (region["original_width"], region["original_height"]) == (40, 60)
        assert region["value"]["brushlabels"] in (["Cat"], ["Object"])
        assert rle.decode(region["value"]["rle"], 60, 40).any()


def test_the_same_payload_gives_the_same_answer(job_env, image_server):
    body = payload(image_server.image_url("red.png"))
    assert jobs.predict_task(body) == jobs.predict_task(body)


def test_the_model_is_loaded_once_per_process(job_env):
    assert jobs.get_runtime() is jobs.get_runtime()


def test_instances_are_parts_of_the_semantic_mask(job_env, image_server):
    semantic = jobs.predict_task(payload(image_server.image_url("red.png")))
    instances = jobs.predict_task(payload(image_server.image_url("red.png"), mask_mode="instances"))
    union = {label: np.zeros((48, 64), bool) for label in ("Cat", "Object")}
    for region in instances["result"]:
        union[region["value"]["brushlabels"][0]] |= rle.decode(region["value"]["rle"], 48, 64)
    for region in semantic["result"]:
        mask = rle.decode(region["value"]["rle"], 48, 64)
        assert not (union[region["value"]["brushlabels"][0]] & ~mask).any()


def test_a_broken_image_raises_a_backend_error(job_env, image_server):
    with pytest.raises(BackendError):
        jobs.predict_task(payload(image_server.image_url("broken.png")))


def test_record_event_summarises_a_webhook():
    summary = jobs.record_event({"action": "ANNOTATION_UPDATED", "annotation": {"id": 5}, "task": {"id": 2},
                                 "project": {"id": 7}, "received_at": 1.0})
    outcome = summary.pop("outcome")
    assert summary == {"action": "ANNOTATION_UPDATED", "project": 7, "task": 2, "annotation": 5, "received_at": 1.0}
    assert outcome["annotations"][0]["status"] == "nothing to record"  # no brush regions, no prediction


def test_a_promoted_checkpoint_is_served_from_the_next_job_on(job_env, image_server, tmp_path, monkeypatch):
    """Training from corrections promotes a checkpoint (CHECKPOINTS_DIR/training.json); no restart is needed."""
    import json

    from evf_sam.testing import make_tiny_checkpoint

    monkeypatch.setenv("CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))
    get_settings.cache_clear()
    body = payload(image_server.image_url("red.png"))
    before = jobs.predict_task(body)["model_version"]

    promoted = make_tiny_checkpoint(tmp_path / "promoted", family="sam", seed=7)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "training.json").write_text(json.dumps({"active": str(promoted), "runs": []}))
    after = jobs.predict_task(body)["model_version"]

    assert after != before
    assert jobs.get_runtime().checkpoint == str(promoted)
    assert after.split("-p")[-1] == before.split("-p")[-1]  # same prompts, new weights


def test_scores_are_confidences_in_the_unit_interval(job_env, image_server):
    """Label Studio drops predictions with negative scores; the random tiny model predicts IoUs outside [0, 1]."""
    prediction = jobs.predict_task(payload(image_server.image_url("red.png")))
    assert 0.0 <= prediction["score"] <= 1.0
    assert all(0.0 <= region["score"] <= 1.0 for region in prediction["result"])


def test_predict_tasks_answers_each_task_as_predict_task_does(job_env, image_server):
    bodies = [payload(image_server.image_url(name)) for name in ("red.png", "exif.jpg", "small.png")]
    for number, body in enumerate(bodies):
        body["task_id"] = number
    assert jobs.predict_tasks(bodies) == [jobs.predict_task(body) for body in bodies]


def test_a_bad_task_in_a_batch_fails_alone_with_its_reason(job_env, image_server):
    good, broken = payload(image_server.image_url("red.png")), payload(image_server.image_url("broken.png"))
    blank = payload(image_server.image_url("small.png"))
    blank["images"][0]["requests"][0]["prompt"] = "  "
    outcomes = jobs.predict_tasks([good, broken, blank])
    assert outcomes[0] == jobs.predict_task(good)
    assert isinstance(outcomes[1], BackendError) and "corrupt" in outcomes[1].message
    assert "prompt 0 is empty" in str(outcomes[2])


def test_when_the_batched_call_fails_only_the_tasks_that_fail_alone_fail(job_env, image_server):
    """The tiny checkpoint is not multitask, so the model refuses semantic=True: those tasks fail, one by one."""
    plain = payload(image_server.image_url("red.png"))
    semantic = [payload(image_server.image_url(name), semantic=True) for name in ("red.png", "small.png")]
    outcomes = jobs.predict_tasks([semantic[0], plain, semantic[1]])
    assert outcomes[1] == jobs.predict_task(plain)
    for outcome in (outcomes[0], outcomes[2]):
        assert isinstance(outcome, Exception) and "multitask" in str(outcome)


def test_predict_batch_stages_run_on_any_thread_and_answer_as_predict_task(job_env, image_server):
    """The worker's split: preparation queued on the pool at creation, the model on the caller's thread, each task
    finished on another thread; a bad task fails alone."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [payload(image_server.image_url(name)) for name in ("red.png", "broken.png", "exif.jpg")]
    for number, body in enumerate(bodies):
        body["task_id"] = number
    batch = jobs.PredictBatch(bodies)
    with pytest.raises(RuntimeError, match="before predict"):
        batch.finish(0)
    batch.wait_prepared()
    batch.predict()
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(batch.finish, range(3)))
    assert outcomes[0] == jobs.predict_task(bodies[0]) and outcomes[2] == jobs.predict_task(bodies[2])
    assert isinstance(outcomes[1], BackendError) and outcomes[1].code == "bad_image"
    assert jobs.PIPELINED.keys() == jobs.BATCHED.keys()
