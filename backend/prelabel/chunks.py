"""One chunk of a run: claim its tasks, re-check LS, predict them together and write the predictions back; and the
RQ job (`run_chunk`) and failure callback (`on_chunk_failure`) that do it in a worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from backend.ls_client import LabelStudioAPIError, LabelStudioClient
from backend.prelabel.planning import has_version, make_client
from backend.prelabel.state import Claims, JobState
from backend.settings import Settings, get_settings

WRITE_ATTEMPTS = 3

Predict = Callable[[list[dict[str, Any]]], list[Any]]  # payloads -> per payload its prediction or Exception


def process_chunk(payload: dict[str, Any], *, state: JobState, claims: Claims, client: LabelStudioClient,
                  predict: Predict, retries: int = 1) -> dict[str, int]:
    """Predict and write one chunk; every task ends up done, failed (with its reason) or skipped. Returns counts.

    The chunk's tasks go through `predict` together (`backend.jobs.predict_tasks`: one batched model call); tasks
    that failed for a transient reason are tried again together, up to `retries` times."""
    from backend.queueing import failure_reason, is_permanent

    job_id, project, model_version = payload["job_id"], payload["project"], payload["model_version"]
    owner = job_id
    claimed: list[dict[str, Any]] = []
    for task_payload in payload["tasks"]:
        task_id = task_payload["task_id"]
        if claims.claim(project, model_version, task_id, owner):
            claimed.append(task_payload)
        else:
            state.mark(job_id, task_id, "skipped", "claimed_elsewhere", "another pre-labelling run is predicting it")
    try:
        pending: list[dict[str, Any]] = []
        for task_payload in claimed:
            task_id = task_payload["task_id"]
            try:
                if has_version(client.list_predictions(task=task_id), model_version):
                    state.mark(job_id, task_id, "skipped", "already_predicted",
                               f"a prediction of {model_version} appeared meanwhile")
                    continue
            except LabelStudioAPIError as error:
                state.mark(job_id, task_id, "failed", error.code, error.message)
                continue
            pending.append(task_payload)
        results: dict[int, dict[str, Any]] = {}
        for attempt in range(retries + 1):
            if not pending:
                break
            try:
                outcomes = predict(pending)
            except Exception as error:  # noqa: BLE001 - e.g. the model cannot be loaded: a failure of every task
                outcomes = [error] * len(pending)
            again = []
            for task_payload, outcome in zip(pending, outcomes):
                if not isinstance(outcome, Exception):
                    results[task_payload["task_id"]] = outcome
                elif is_permanent(outcome) or attempt == retries:
                    state.mark(job_id, task_payload["task_id"], "failed", *failure_reason(outcome))
                else:
                    again.append(task_payload)
            pending = again
        _write(project, model_version, results, client=client, state=state, job_id=job_id)
    finally:
        for task_payload in claimed:
            claims.release(project, model_version, task_payload["task_id"], owner)
    report = state.get(job_id) or {}
    return {key: report.get(key, 0) for key in ("done", "failed", "skipped", "remaining")}


def _write(project: int, model_version: str, results: dict[int, dict[str, Any]], *, client: LabelStudioClient,
           state: JobState, job_id: str) -> None:
    """One `import/predictions` call for the chunk (an LS without that route: one `POST /api/predictions` per task);
    on failure re-check LS and write only what is still missing."""
    pending = dict(results)
    error: LabelStudioAPIError | None = None
    per_item = False
    for attempt in range(WRITE_ATTEMPTS):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                for task_id in list(pending):
                    if has_version(client.list_predictions(task=task_id), pending[task_id]["model_version"]):
                        state.mark(job_id, task_id, "done")
                        del pending[task_id]
            except LabelStudioAPIError as check_error:
                error = check_error
                continue
        if not pending:
            return
        try:
            if per_item:
                for task_id in list(pending):
                    prediction = pending[task_id]
                    client.create_prediction(task_id, prediction["result"], score=prediction.get("score"),
                                             model_version=prediction.get("model_version"), retry=False)
                    state.mark(job_id, task_id, "done")
                    del pending[task_id]
            else:
                client.import_predictions(project, [{"task": task_id, **prediction}
                                                    for task_id, prediction in pending.items()], retry=False)
        except LabelStudioAPIError as write_error:
            error = write_error
            if not per_item and write_error.http_status in (404, 405):
                per_item = True
                continue
            if write_error.status < 500:  # LS rejected the data: the same call would fail again
                break
            continue
        for task_id in pending:
            state.mark(job_id, task_id, "done")
        return
    assert error is not None
    for task_id in pending:
        state.mark(job_id, task_id, "failed", "ls_write_failed",
                   f"writing the prediction to Label Studio failed: {error.message}")


# --- worker entry points -----------------------------------------------------------------------------------------

_context_lock = threading.Lock()
_contexts: dict[str, tuple[Any, LabelStudioClient]] = {}


def worker_context(settings: Settings) -> tuple[Any, LabelStudioClient]:
    """This worker's Redis connection and LS client (made once per process)."""
    from backend.queueing import redis_connection

    with _context_lock:
        key = settings.redis_key_prefix
        if key not in _contexts:
            _contexts[key] = (redis_connection(settings), make_client(settings))
        return _contexts[key]


def run_chunk(payload: dict[str, Any]) -> dict[str, int]:
    """RQ job: one chunk of a prelabel run (payload: job_id, project, model_version, tasks)."""
    from backend import jobs

    settings = get_settings()
    redis, client = worker_context(settings)
    return process_chunk(payload, state=JobState(redis, settings.redis_key_prefix),
                         claims=Claims(redis, settings.redis_key_prefix, ttl=settings.job_timeout + 60),
                         client=client, predict=jobs.predict_tasks, retries=settings.job_retries)


def on_chunk_failure(job: Any, connection: Any, exc_type: type, exc_value: BaseException, traceback: Any) -> None:
    """RQ failure callback: the chunk's unfinished tasks are reported failed (a later retry can still finish them)."""
    from backend.queueing import failure_reason, on_job_failure

    on_job_failure(job, connection, exc_type, exc_value, traceback)
    payload = job.args[0]
    state = JobState(connection, get_settings().redis_key_prefix)
    code, message = failure_reason(exc_value)
    for task_payload in payload["tasks"]:
        state.mark(payload["job_id"], task_payload["task_id"], "failed", code, message)
