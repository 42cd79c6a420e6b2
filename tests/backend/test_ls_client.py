"""LabelStudioClient against a real loopback LS API stand-in: pagination, writes, deletes, retries, errors."""

from __future__ import annotations

import json
import time

import pytest

from backend.ls_auth import LabelStudioAuth
from backend.ls_client import LabelStudioAPIError, LabelStudioClient
from tests.backend.ls_api_standin import TOKEN, LabelStudioStandIn, running

CONFIG = '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">' \
         '<Label value="Cat"/></BrushLabels></View>'


@pytest.fixture()
def ls():
    with running() as state:
        state.add_project(1, CONFIG)
        state.add_project(2, CONFIG)
        yield state


def client_for(ls: LabelStudioStandIn, **kwargs) -> LabelStudioClient:
    return LabelStudioClient(ls.url, LabelStudioAuth(ls.url, TOKEN), backoff=0.01, **kwargs)


def test_iter_tasks_walks_every_page_of_the_project_only(ls: LabelStudioStandIn) -> None:
    ids = [ls.add_task(1, {"image": f"/data/upload/1/{n}.png"}) for n in range(23)]
    ls.add_task(2, {"image": "/data/upload/2/other.png"})
    with client_for(ls) as client:
        tasks = list(client.iter_tasks(1, page_size=10))
    assert [task["id"] for task in tasks] == ids
    assert [c.query["page"] for c in ls.calls if c.path == "/api/tasks"] == [["1"], ["2"], ["3"]]


def test_iter_tasks_stops_on_the_404_past_the_last_page_and_sends_the_query(ls: LabelStudioStandIn) -> None:
    for n in range(20):
        ls.add_task(1, {"image": f"{n}.png"})
    query = {"filters": {"conjunction": "and", "items": [{"filter": "filter:tasks:completed_at",
                                                         "operator": "empty", "type": "Datetime", "value": True}]}}
    with client_for(ls) as client:
        assert len(list(client.iter_tasks(1, page_size=10, query=query))) == 20
    sent = [c for c in ls.calls if c.path == "/api/tasks"]
    assert json.loads(sent[0].query["query"][0]) == query


def test_predictions_write_list_and_delete(ls: LabelStudioStandIn) -> None:
    first, second = ls.add_task(1, {"image": "a.png"}), ls.add_task(1, {"image": "b.png"})
    with client_for(ls) as client:
        created = client.create_prediction(first, [], score=0.5, model_version="m-1")
        client.import_predictions(1, [{"task": second, "result": [], "score": 0.1, "model_version": "m-1"},
                                      {"task": first, "result": [], "score": 0.2, "model_version": "m-2"}])
        assert {p["model_version"] for p in client.list_predictions(task=first)} == {"m-1", "m-2"}
        assert len(client.list_predictions(project=1)) == 3
        assert client.get_prediction(created["id"])["task"] == first
        client.delete_prediction(created["id"])
        client.delete_prediction(created["id"])  # already gone: still fine
        assert [p["model_version"] for p in client.list_predictions(task=first)] == ["m-2"]


def test_5xx_and_dropped_connections_are_retried_with_backoff(ls: LabelStudioStandIn) -> None:
    task = ls.add_task(1, {"image": "a.png"})
    ls.fail("/api/tasks/", 503, times=2)
    ls.drop("/api/tasks/", times=1)
    with client_for(ls) as client:
        started = time.monotonic()
        assert client.get_task(task)["id"] == task
        # backoff 0.01, 0.02, 0.04 s before attempts 2..4
        assert time.monotonic() - started >= 0.07
    assert ls.count("GET", f"/api/tasks/{task}") == 4


def test_after_the_last_try_a_clear_error_names_call_status_and_attempts(ls: LabelStudioStandIn) -> None:
    ls.fail("/api/projects/1", 502, times=10)
    with client_for(ls, retries=2) as client, pytest.raises(LabelStudioAPIError) as raised:
        client.get_project(1)
    error = raised.value
    assert error.http_status == 502 and error.status == 503 and error.code == "ls_unavailable"
    assert "GET /api/projects/1 failed after 3 attempt(s): HTTP 502" in error.message
    assert ls.count("GET", "/api/projects/1") == 3


def test_unreachable_label_studio_is_reported_after_retries() -> None:
    with running() as ls:
        url = ls.url
    with LabelStudioClient(url, LabelStudioAuth(url, TOKEN), retries=1, backoff=0.01) as client, \
            pytest.raises(LabelStudioAPIError, match=r"failed after 2 attempt\(s\): ConnectError"):
        client.get_project(1)


def test_writes_without_retry_make_exactly_one_attempt(ls: LabelStudioStandIn) -> None:
    task = ls.add_task(1, {"image": "a.png"})
    ls.fail("/api/predictions", 500, times=1, method="POST")
    with client_for(ls) as client, pytest.raises(LabelStudioAPIError):
        client.create_prediction(task, [], model_version="m", retry=False)
    assert ls.count("POST", "/api/predictions") == 1 and not ls.predictions


def test_4xx_is_not_retried_and_names_the_problem(ls: LabelStudioStandIn) -> None:
    with client_for(ls) as client:
        with pytest.raises(LabelStudioAPIError) as missing:
            client.get_project(99)
        assert missing.value.code == "ls_not_found" and missing.value.status == 404
        with pytest.raises(LabelStudioAPIError) as rejected:
            client.import_predictions(1, [{"task": 12345, "result": []}])
        assert rejected.value.code == "ls_rejected" and "unknown task" in rejected.value.message
    assert ls.count("GET", "/api/projects/99") == 1


def test_wrong_token_is_an_auth_error_and_credentials_only_go_to_ls(ls: LabelStudioStandIn) -> None:
    with LabelStudioClient(ls.url, LabelStudioAuth(ls.url, "wrong-token"), backoff=0.01) as client, \
            pytest.raises(LabelStudioAPIError) as raised:
        client.get_project(1)
    assert raised.value.code == "ls_auth_failed" and "LABEL_STUDIO_API_KEY" in raised.value.message
    assert "wrong-token" not in raised.value.message
    with client_for(ls) as client:
        client.get_project(1)
    assert ls.calls[-1].authorization == f"Token {TOKEN}"
