"""The Label Studio ML protocol end to end on a real embedded-mode server with a tiny checkpoint:
LS-shaped /setup and /predict payloads, one prediction per task in order, brush RLE at the EXIF-transposed size."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from backend import rle
from tests.backend.ls_payloads import predict_body, setup_body, task, textarea_context

pytestmark = pytest.mark.slow

VERSION = re.compile(r"^.+-[0-9a-f]{8}-p[0-9a-f]{6}$")


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


def predict(server, body: dict, status: int = 200) -> list[dict]:
    response = httpx.post(server.url + "/predict", json=body, timeout=90)
    assert response.status_code == status, response.text
    return response.json()["results"] if status == 200 else response.json()


def test_setup_answers_a_model_version_that_follows_prompts(server):
    first = httpx.post(server.url + "/setup", json=setup_body()).json()["model_version"]
    again = httpx.post(server.url + "/setup", json=setup_body()).json()["model_version"]
    other = httpx.post(server.url + "/setup", json=setup_body(extra_params={"min_area": 5})).json()["model_version"]
    assert VERSION.match(first)
    assert first == again
    assert other != first and other.rsplit("-p", 1)[0] == first.rsplit("-p", 1)[0]
    assert first in httpx.get(server.url + "/versions").json()["versions"]


def test_batch_gives_one_prediction_per_task_in_order(server, image_server):
    httpx.post(server.url + "/setup", json=setup_body())
    tasks = [task(1, image_server.image_url("red.png"), prompt="the red square"),
             task(2, image_server.image_url("exif.jpg")),
             task(3, image_server.image_url("small.png"), prompt="a dark background")]
    results = predict(server, predict_body(tasks))
    assert len(results) == 3
    sizes = [(64, 48), (40, 60), (40, 32)]  # exif.jpg is stored 60x40 with orientation 6 -> shown 40x60
    for prediction, (width, height) in zip(results, sizes):
        assert VERSION.match(prediction["model_version"])
        assert isinstance(prediction["score"], float)
        for region in prediction["result"]:
            assert region["type"] == "brushlabels"
            assert (region["from_name"], region["to_name"]) == ("tag", "image")
            assert (region["original_width"], region["original_height"]) == (width, height)
            assert region["image_rotation"] == 0
            assert isinstance(region["id"], str) and len(region["id"]) >= 8
            assert region["value"]["format"] == "rle"
            assert region["value"]["brushlabels"][0] in ("Object", "Cat")
            mask = rle.decode(region["value"]["rle"], height, width)
            assert mask.shape == (height, width) and mask.any()
    ids = [region["id"] for prediction in results for region in prediction["result"]]
    assert len(ids) == len(set(ids))


def test_interactive_textarea_prompt_labels_every_region(server, image_server):
    body = predict_body([task(5, image_server.image_url("red.png"))], context=textarea_context("the red square"))
    body["params"]["hostname"] = "http://127.0.0.1:8090"  # newer LS sends it; unknown keys are tolerated
    body["unexpected_top_level_key"] = {"ignored": True}
    [prediction] = predict(server, body)
    assert all(region["value"]["brushlabels"] for region in prediction["result"])


def test_zero_detections_still_give_one_prediction(server, image_server):
    # A minimum component area larger than the image removes every mask: nothing found, still one entry.
    httpx.post(server.url + "/setup", json=setup_body(extra_params={"min_area": 10**9}, project="8.1"))
    body = predict_body([task(9, image_server.image_url("red.png"))], project="8.1")
    [prediction] = predict(server, body)
    assert prediction["result"] == [] and prediction["score"] == 0.0
    assert VERSION.match(prediction["model_version"])


def test_a_bad_task_in_a_batch_gets_an_empty_prediction_and_a_counted_reason(server, image_server):
    tasks = [task(1, image_server.image_url("red.png")), task(2, image_server.image_url("broken.png")),
             task(3, image_server.image_url("missing.png")), {"id": 4, "data": {"text": "no image"}}]
    results = predict(server, predict_body(tasks))
    assert len(results) == 4
    assert [r["result"] for r in results[1:]] == [[], [], []]
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'evf_task_failures_total\{reason="[a-z_]+"\} [1-9]', metrics)


def test_interactive_call_with_an_overlong_prompt_is_a_422(server, image_server):
    body = predict_body([task(5, image_server.image_url("red.png"))], context=textarea_context("x" * 5000))
    error = predict(server, body, status=422)
    assert "longer than" in error["message"] and error["field"].startswith("context.result[0]")


def test_label_config_may_come_from_setup_only(server, image_server):
    httpx.post(server.url + "/setup", json=setup_body(project="11.5"))
    body = predict_body([task(1, image_server.image_url("red.png"))], project="11.5")
    del body["label_config"]
    [prediction] = predict(server, body)
    assert VERSION.match(prediction["model_version"])


def test_unknown_label_fails_that_task_in_a_batch_and_is_a_422_interactively(server, image_server):
    httpx.post(server.url + "/setup", json=setup_body())
    tasks = [task(1, image_server.image_url("red.png"), prompt={"Dog": "a dog"}),
             task(2, image_server.image_url("red.png"), prompt={"Cat": "a cat"})]
    results = predict(server, predict_body(tasks))
    assert len(results) == 2 and results[0]["result"] == []
    assert all(region["value"]["brushlabels"] == ["Cat"] for region in results[1]["result"])
    error = predict(server, predict_body(tasks[:1], context={"result": []}), status=422)
    assert error["field"] == "data.prompt.Dog" and "Dog" in error["message"]
    bad_setup = httpx.post(server.url + "/setup", json=setup_body(extra_params={"prompts": {"Dog": "a dog"}}))
    assert bad_setup.status_code == 422 and bad_setup.json()["field"] == "extra_params.prompts.Dog"


def test_health_answers_within_ls_timeout_while_the_model_is_busy(server, image_server):
    client = httpx.Client(timeout=1)  # LS waits 1 s; one client, as creating one costs ~100 ms of TLS setup

    def health_seconds() -> float:
        started = time.perf_counter()
        assert client.get(server.url + "/health").json()["status"] == "UP"
        return time.perf_counter() - started

    idle = sorted(health_seconds() for _ in range(10))
    tasks = [task(i, image_server.image_url("red.png"), prompt=f"object number {i}") for i in range(1, 41)]
    timings = []
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, server.url + "/predict", json=predict_body(tasks), timeout=90)
        while not busy.done():
            timings.append(health_seconds())
            time.sleep(0.05)
        assert len(busy.result().json()["results"]) == 40
    client.close()
    timings.sort()
    print(f"/health idle median {idle[5] * 1000:.1f} ms; while busy (n={len(timings)}) median "
          f"{timings[len(timings) // 2] * 1000:.1f} ms, max {timings[-1] * 1000:.1f} ms")


def test_a_plain_brush_control_gets_unlabelled_brush_regions(server, image_server):
    config = """<View><Image name="img" value="$picture"/><Brush name="paint" toName="img"/>
                <TextArea name="ask" toName="img"/></View>"""
    body = predict_body([{"id": 61, "data": {"picture": image_server.image_url("small.png")}}],
                        context={"result": [{"from_name": "ask", "to_name": "img", "type": "textarea",
                                             "value": {"text": ["the square"]}}]}, label_config=config)
    [prediction] = predict(server, body)
    assert prediction["result"]
    for region in prediction["result"]:
        assert (region["type"], region["from_name"], region["to_name"]) == ("brush", "paint", "img")
        assert "brushlabels" not in region["value"]
        assert rle.decode(region["value"]["rle"], 32, 40).any()
