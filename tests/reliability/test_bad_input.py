"""Bad input against a real `python -m backend serve` (embedded mode, tiny checkpoint) and, for bursts, a Redis-mode
server with a real worker process.

A bad request is a 4xx with a JSON body naming the problem; a bad task inside a batch gets an empty prediction (its
reason logged and counted in /metrics) while the other tasks are answered. Cases already covered elsewhere are
listed in docs/RELIABILITY.md with the test that proves them (malformed JSON, missing fields, configs without
BrushLabels, unknown labels: tests/backend/test_app.py and test_protocol.py).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from backend import rle
from tests.backend.conftest import free_port
from tests.backend.ls_payloads import LABEL_CONFIG, predict_body, setup_body, task, textarea_context

pytestmark = pytest.mark.slow

AUTH = ("ls-user", "ls-pass-123")
SECRET = "hook-secret-xyz"
MEDIA_TIMEOUT = 2.0
W, H = 48, 40


@pytest.fixture(scope="module")
def corrections_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corrections")


@pytest.fixture(scope="module")
def server(start_server, model_env, corrections_dir):
    """Embedded server with Basic auth, a webhook secret, a short media timeout and a corrections dataset."""
    return start_server({**model_env, "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1],
                         "WEBHOOK_SECRET": SECRET, "MEDIA_TIMEOUT": str(MEDIA_TIMEOUT),
                         "CORRECTIONS_DIR": str(corrections_dir)})


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=90) as http:
        assert http.post("/setup", json=setup_body()).status_code == 200
        yield http


def assert_error(response: httpx.Response, status: int | tuple[int, ...], *words: str) -> dict:
    """A JSON error body {"error", "message", "field"} whose message contains `words` (no traceback)."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text
    body = response.json()
    assert set(body) == {"error", "message", "field"}, body
    assert body["message"] and "Traceback" not in body["message"]
    for word in words:
        assert word.lower() in (body["message"] + " " + str(body["field"])).lower(), body
    return body


def failure_reasons(text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'evf_task_failures_total\{reason="([a-z_]+)"\} ([0-9.e+]+)', text)}


# (task id, data, expected failure code or None for "answered", words the logged reason must contain)
def batch_cases(media_host) -> list[tuple[int, dict, str | None, str]]:
    closed = f"http://127.0.0.1:{free_port()}/gone.png"
    return [
        (101, {"image": media_host.url("good.png")}, None, ""),
        (102, {"image": media_host.url("corrupt.png")}, "bad_image", "corrupt"),
        (103, {"image": media_host.url("truncated.png")}, "bad_image", "truncated"),
        (104, {"image": media_host.url("huge.png")}, "image_too_large", "too large"),
        (105, {"image": media_host.url("empty.png")}, "bad_image", "0 bytes"),
        (106, {"image": media_host.url("cmyk.jpg")}, None, ""),
        (107, {"image": media_host.url("gray16.png")}, None, ""),
        (108, {"image": media_host.url("palette.png")}, None, ""),
        (109, {"image": media_host.url("animated.gif")}, None, ""),
        (110, {"image": closed}, "media_unreachable", "cannot download"),
        (111, {"image": media_host.url("slow/3/good.png")}, "media_timeout", f"timed out after {MEDIA_TIMEOUT:g} s"),
        (112, {"image": media_host.url("page.html")}, "bad_image", "not an image"),
        (113, {"image": media_host.url("png-as-text")}, None, ""),
        (114, {"image": media_host.url("good.png"), "prompt": "x" * 10_000}, "bad_prompt", "longer than"),
        (115, {"image": media_host.url("good.png"), "prompt": {"Dog": "a dog"}}, "bad_prompt", "Dog"),
        (116, {"text": "no image at all"}, "bad_request", "no image URL"),
        (117, {"image": 12345}, "bad_request", "no image URL"),
        (118, {"image": "ftp://127.0.0.1/x.png"}, "bad_image", "unsupported image URL"),
        (119, {"image": media_host.url("good.png"), "prompt": "the square"}, None, ""),
        (120, {"image": media_host.url("large.png")}, "image_too_large", "MAX_IMAGE_PIXELS"),
    ]


def test_a_batch_of_bad_and_odd_images_answers_every_task_and_logs_each_reason(client, server, media_host):
    cases = batch_cases(media_host)
    before = failure_reasons(client.get("/metrics").text)
    tasks = [{**task(task_id, "unused"), "data": data} for task_id, data, _, _ in cases]
    started = time.monotonic()
    response = client.post("/predict", json=predict_body(tasks))
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(cases)
    assert elapsed < 30  # the slow image cost MEDIA_TIMEOUT, not its full 3 s sleep, and nothing hung
    log = server.log()
    for (task_id, _, code, words), prediction in zip(cases, results):
        assert prediction["model_version"] and isinstance(prediction["score"], float)
        failure = re.search(rf"task {task_id}: empty prediction \(([a-z_]+)\): (.*)", log)
        if code is None:
            assert failure is None, failure.group(0)
            assert re.search(rf"task {task_id}: \d+ region\(s\)", log), f"task {task_id} was not predicted"
            for region in prediction["result"]:
                assert (region["original_width"], region["original_height"]) == (W, H)
                assert rle.decode(region["value"]["rle"], H, W).shape == (H, W)
        else:
            assert prediction["result"] == [] and prediction["score"] == 0.0
            assert failure is not None, f"task {task_id}: no reason logged"
            assert failure.group(1) == code, failure.group(0)
            assert words.lower() in failure.group(2).lower(), failure.group(0)
            assert "Traceback" not in failure.group(2)
    after = failure_reasons(client.get("/metrics").text)
    for code in {code for _, _, code, _ in cases if code}:
        expected = sum(1 for _, _, c, _ in cases if c == code)
        assert after.get(code, 0) - before.get(code, 0) == expected, code


def test_interactive_call_on_a_broken_image_answers_one_empty_prediction(client, server, media_host):
    body = predict_body([task(131, media_host.url("corrupt.png"))], context=textarea_context("the square"))
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    [prediction] = response.json()["results"]
    assert prediction["result"] == []
    assert re.search(r"task 131: empty prediction \(bad_image\)", server.log())


@pytest.mark.parametrize("body, status, words", [
    ({"tasks": "not a list"}, 422, ["tasks"]),
    ({"tasks": [1, 2]}, 422, ["tasks"]),
    ({"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": "<View><Image"}, 422, ["label config"]),
    ({"tasks": [{"id": 1, "data": {"image": "x"}}], "params": {"context": [1]}}, (400, 422), ["params.context"]),
    ([1, 2, 3], 422, []),
    ("just a string", 422, []),
])
def test_wrongly_shaped_predict_bodies_are_4xx_naming_the_problem(client, body, status, words):
    assert_error(client.post("/predict", json=body), status, *words)


def test_non_utf8_bytes_in_the_body_are_a_400_not_a_crash(client, media_host):
    raw = json.dumps(predict_body([task(141, media_host.url("good.png"), prompt="PROMPT")])).encode()
    raw = raw.replace(b"PROMPT", b"caf\xe9 \xff\xfe")
    for path in ("/predict", "/setup", "/webhook"):
        headers = {"content-type": "application/json"}
        if path == "/webhook":
            headers["X-Webhook-Secret"] = SECRET
        assert_error(client.post(path, content=raw, headers=headers), 400, "UTF-8")
    assert client.get("/health").json()["status"] == "UP"


def test_unicode_and_control_characters_in_prompts_are_answered(client, media_host):
    prompts = ["猫 🐈 кот", "tab\tand\nnewline", "\u200b zero width", "quote \" and \\ backslash"]
    tasks = [task(150 + i, media_host.url("good.png"), prompt=prompt) for i, prompt in enumerate(prompts)]
    results = client.post("/predict", json=predict_body(tasks)).json()["results"]
    assert len(results) == len(prompts)


@pytest.mark.parametrize("header", [None, "Basic " + "bHMtdXNlcjp3cm9uZw==", "Basic !!!not-base64!!!",
                                    "Basic bm8tY29sb24=", "Bearer ls-pass-123", "basic"])
def test_wrong_basic_auth_is_401_on_predict(server, header):
    headers = {"authorization": header} if header else {}
    response = httpx.post(server.url + "/predict", json=predict_body([task(1, "x")]), headers=headers)
    assert_error(response, 401, "credentials")
    assert response.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET + "x", SECRET.upper()])
def test_webhook_without_the_right_secret_is_401_and_queues_nothing(server, secret, corrections_dir):
    headers = {"X-Webhook-Secret": secret} if secret is not None else {}
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 999, "task": 1, "result": []}, "task": {"id": 1},
             "project": {"id": 7}}
    assert_error(httpx.post(server.url + "/webhook", json=event, headers=headers), 401, "X-Webhook-Secret")


def _region(mask: np.ndarray) -> dict:
    return {"id": "r1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": W,
            "original_height": H, "image_rotation": 0,
            "value": {"format": "rle", "rle": rle.encode(mask), "brushlabels": ["Object"]}}


def _box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:bottom, left:right] = True
    return mask


def test_duplicate_and_out_of_order_webhooks_leave_the_newest_correction_once(client, media_host, corrections_dir):
    """Through /webhook (embedded queue) into the corrections dataset: idempotent by annotation id + updated_at."""
    image = media_host.url("good.png")

    def event(action: str, annotation_id: int, mask: np.ndarray, updated_at: str) -> dict:
        annotation = {"id": annotation_id, "task": 77, "result": [_region(mask)], "was_cancelled": False,
                      "created_at": "2026-11-30T10:00:00Z", "updated_at": updated_at, "parent_prediction": None}
        return {"action": action, "annotation": annotation, "task": {"id": 77, "data": {"image": image}},
                "project": {"id": 7, "label_config": LABEL_CONFIG}}

    first, newest, stale = _box(2, 2, 10, 10), _box(5, 5, 30, 40), _box(0, 0, 3, 3)
    sequence = [event("ANNOTATION_CREATED", 501, first, "2026-11-30T10:00:00Z"),
                event("ANNOTATION_CREATED", 501, first, "2026-11-30T10:00:00Z"),   # duplicate delivery
                event("ANNOTATION_UPDATED", 501, newest, "2026-11-30T10:05:00Z"),
                event("ANNOTATION_UPDATED", 501, stale, "2026-11-30T10:01:00Z"),   # arrives late, is older
                event("ANNOTATION_UPDATED", 501, newest, "2026-11-30T10:05:00Z"),  # duplicate of the newest
                event("ANNOTATION_CREATED", 502, first, "2026-11-30T11:00:00Z")]   # sentinel: queue drained
    headers = {"X-Webhook-Secret": SECRET}
    for item in sequence:
        started = time.monotonic()
        response = client.post("/webhook", json=item, headers=headers)
        assert response.status_code == 200 and response.json()["status"] == "queued", response.text
        assert time.monotonic() - started < 1.0  # LS's webhook timeout
    records_path = corrections_dir / "records.jsonl"
    deadline = time.monotonic() + 60
    records: list[dict] = []
    while time.monotonic() < deadline:
        if records_path.exists():
            records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
            if any(r["annotation_id"] == 502 for r in records):
                break
        time.sleep(0.2)
    assert not any(r["annotation_id"] == 999 for r in records)  # refused webhooks (wrong secret) queued nothing
    mine = [r for r in records if r["annotation_id"] == 501]
    assert len(mine) == 1, records
    assert mine[0]["updated_at"] == "2026-11-30T10:05:00Z"
    from evf_sam.data import layout
    assert np.array_equal(layout.load_mask(corrections_dir / mine[0]["mask"]), newest)


def test_twenty_concurrent_clients_each_get_every_task_answered_exactly_once(rq_stack, image_server):
    """20 LS-shaped clients at once against a Redis-mode server with a real worker: one prediction per task, in
    order, and the worker ran each task exactly once."""
    url = rq_stack.server.url
    assert httpx.post(url + "/setup", json=setup_body()).status_code == 200
    clients, per_client = 20, 3

    def one_client(number: int) -> list[dict]:
        tasks = [task(5000 + number * 10 + k, image_server.image_url("small.png" if k % 2 else "red.png"),
                      prompt=f"client {number} object {k}") for k in range(per_client)]
        response = httpx.post(url + "/predict", json=predict_body(tasks), timeout=90)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one_client, range(clients)))
    assert all(len(results) == per_client for results in answers)
    assert all(r["model_version"] for results in answers for r in results)
    ran = re.findall(r"task (50\d\d|5[1-9]\d\d): \d+ region\(s\)", rq_stack.worker.log())
    expected = {str(5000 + n * 10 + k) for n in range(clients) for k in range(per_client)}
    assert sorted(ran) == sorted(expected), "a task ran twice or not at all"
    # regions are labelled by task: each client's answers carry its own widths (red.png 64, small.png 40)
    for results in answers:
        for k, prediction in enumerate(results):
            for region in prediction["result"]:
                assert region["original_width"] == (40 if k % 2 else 64)
