"""Running a plan: queue its chunks (Redis) or run them in this process (embedded), and the HTTP-facing API behind
`POST /jobs/prelabel` (`submit`) and `GET /jobs/{id}` (`status`)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from backend.errors import BackendError
from backend.ls_client import LabelStudioClient
from backend.prelabel.chunks import Predict, process_chunk, worker_context
from backend.prelabel.planning import Plan, make_client, plan
from backend.prelabel.request import PrelabelRequest
from backend.prelabel.state import Claims, JobState
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)

# What queued jobs name (stored in Redis): package-level paths, re-exported by `backend.prelabel`, so jobs already
# queued stay resolvable whichever module the functions live in.
CHUNK_JOB = "backend.prelabel.run_chunk"
CHUNK_FAILURE = "backend.prelabel.on_chunk_failure"
PLAN_JOB = "backend.prelabel.run_plan"


def enqueue(settings: Settings, redis: Any, job_id: str, the_plan: Plan, chunk_size: int) -> list[str]:
    """Put the plan's chunks on the batch queue; returns the RQ job ids."""
    from rq import Callback, Queue, Retry

    from backend.queueing import BATCH, make_queues

    queue = make_queues(settings, redis)[BATCH]
    retry = Retry(max=settings.job_retries) if settings.job_retries else None
    data = [Queue.prepare_data(CHUNK_JOB, args=({"job_id": job_id, "project": the_plan.project,
                                                 "model_version": the_plan.model_version, "tasks": chunk},),
                               timeout=settings.job_timeout, result_ttl=settings.result_ttl,
                               failure_ttl=settings.failure_ttl, retry=retry, on_failure=Callback(CHUNK_FAILURE),
                               description=f"prelabel {job_id} project={the_plan.project} tasks={len(chunk)}")
            for chunk in the_plan.chunks(chunk_size)]
    return [job.id for job in queue.enqueue_many(data)] if data else []


def start_run(settings: Settings, request: PrelabelRequest, client: LabelStudioClient, state: JobState,
              job_id: str, *, redis: Any = None, tasks: list[dict[str, Any]] | None = None,
              queue: bool = True) -> Plan:
    """Plan and record a run; with Redis (and `queue`) its chunks are queued, else the caller runs them
    (`run_inline`)."""
    state.update(job_id, status="planning", project=request.project, request=request.to_json())
    try:
        the_plan = plan(settings, request, client, redis=redis, tasks=tasks)
    except BackendError as error:
        state.update(job_id, status="failed", error={"code": error.code, "message": error.message})
        raise
    state.update(job_id, status="running", model_version=the_plan.model_version, listed=the_plan.listed,
                 already_predicted=the_plan.already_predicted,
                 to_do=len(the_plan.payloads) + len(the_plan.invalid))
    for task_id, error in the_plan.invalid.items():
        state.mark(job_id, task_id, "failed", error.code, error.message)
    if redis is not None and queue:
        chunk_ids = enqueue(settings, redis, job_id, the_plan, request.chunk_size)
        state.update(job_id, chunks=len(chunk_ids))
    return the_plan


def run_inline(settings: Settings, the_plan: Plan, job_id: str, state: JobState, client: LabelStudioClient,
               chunk_size: int, *, redis: Any = None, on_progress: Callable[[], None] = lambda: None,
               predict: Predict | None = None) -> None:
    """Run the plan's chunks one after another in this process (embedded mode, or a webhook job in a worker, where
    `redis` makes the claims visible to other runs). `predict` defaults to `backend.jobs.predict_tasks`."""
    from backend import jobs

    claims = Claims(redis, settings.redis_key_prefix, ttl=settings.job_timeout + 60)
    for chunk in the_plan.chunks(chunk_size):
        process_chunk({"job_id": job_id, "project": the_plan.project, "model_version": the_plan.model_version,
                       "tasks": chunk}, state=state, claims=claims, client=client,
                      predict=predict or jobs.predict_tasks, retries=0 if predict else settings.job_retries)
        on_progress()


def predict_via(dispatcher: Any, settings: Settings) -> Predict | None:
    """Embedded server: predict through its dispatcher (one model user at a time, a chunk's tasks batched together,
    retries included); None with Redis, where chunks go to the workers."""
    if dispatcher.redis is not None:
        return None
    from backend.model import PREDICT_JOB

    def predict(payloads: list[dict[str, Any]]) -> list[Any]:
        outcomes = dispatcher.run(PREDICT_JOB, payloads, interactive=False, timeout=settings.job_timeout)
        return [outcome.value if outcome.ok else BackendError(outcome.message, status=422, code=outcome.error)
                for outcome in outcomes]

    return predict


def run_plan(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job behind `POST /jobs/prelabel` in Redis mode: plan in the worker, queue the chunks."""
    settings = get_settings()
    redis, client = worker_context(settings)
    state = JobState(redis, settings.redis_key_prefix)
    request = PrelabelRequest.from_json(payload["request"])
    the_plan = start_run(settings, request, client, state, payload["job_id"], redis=redis)
    return {"job_id": payload["job_id"], "to_do": len(the_plan.payloads)}


# --- HTTP-facing API (`POST /jobs/prelabel`, `GET /jobs/{id}`) ---------------------------------------------------

_embedded_state = JobState()


def state_for(settings: Settings, redis: Any) -> JobState:
    """Where job state lives: Redis, or this process's memory in embedded mode."""
    return _embedded_state if redis is None else JobState(redis, settings.redis_key_prefix)


def submit(settings: Settings, request: PrelabelRequest, redis: Any, *, predict: Predict | None = None) -> str:
    """Start a prelabel job in the background (Redis: planned by a worker; embedded: a thread predicting with
    `predict`); returns its id at once."""
    job_id = f"prelabel-{uuid.uuid4().hex[:12]}"
    state = state_for(settings, redis)
    state.create(job_id, status="queued", project=request.project, request=request.to_json())
    if redis is not None:
        from rq import Callback, Queue

        from backend.queueing import BATCH, make_queues, on_job_failure

        make_queues(settings, redis)[BATCH].enqueue_many([Queue.prepare_data(
            PLAN_JOB, args=({"job_id": job_id, "request": request.to_json()},), timeout=settings.job_timeout,
            result_ttl=settings.result_ttl, failure_ttl=settings.failure_ttl, on_failure=Callback(on_job_failure),
            description=f"prelabel plan {job_id} project={request.project}")])
        return job_id

    def work() -> None:
        try:
            with make_client(settings) as client:
                the_plan = start_run(settings, request, client, state, job_id)
                run_inline(settings, the_plan, job_id, state, client, request.chunk_size, predict=predict)
        except BackendError as error:
            log.error("prelabel %s failed: %s", job_id, error.message)
        except Exception as error:  # noqa: BLE001 - reported in the job state, never lost in a thread
            log.exception("prelabel %s failed", job_id)
            state.update(job_id, status="failed", error={"code": "internal_error", "message": repr(error)})

    threading.Thread(target=work, name=f"prelabel-{job_id}", daemon=True).start()
    return job_id


def status(settings: Settings, job_id: str, redis: Any) -> dict[str, Any] | None:
    """The job's report for `GET /jobs/{id}` (None when unknown)."""
    return state_for(settings, redis).get(job_id)
