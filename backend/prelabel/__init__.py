"""Bulk pre-labelling: predict a whole Label Studio project and write the predictions back through the LS API.

`python -m backend prelabel --project 3` (or `POST /jobs/prelabel`):

1. plan — read the project's label config, list its tasks (optionally filtered), skip the tasks that already carry a
   prediction of the current `model_version`, and cut the rest into chunks;
2. run — each chunk is one job on the `batch` queue (`run_chunk`; embedded mode: the same function in-process): claim
   each task for (project, model_version) in Redis, re-check LS for an existing prediction, predict the chunk's tasks
   together with `backend.jobs.predict_tasks` (one batched model call), write the chunk's predictions with one
   `import/predictions` call, release the claims;
3. report — job state (done / failed with reasons / skipped / remaining) lives in Redis (`JobState`), shown by the CLI
   progress bar and `GET /jobs/{id}`.

Rerunning resumes: finished tasks already carry a current prediction in LS and are skipped. Two overlapping runs do not
duplicate predictions: a task is predicted only by the run holding its claim, and only after re-checking LS. A write
whose answer got lost is re-checked before it is tried again.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.errors import BackendError, BadRequest
from backend.ls_client import LabelStudioAPIError, LabelStudioClient
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)

CHUNK_JOB = "backend.prelabel.run_chunk"
PLAN_JOB = "backend.prelabel.run_plan"
WRITE_ATTEMPTS = 3
STATE_TTL = 7 * 24 * 3600


@dataclass
class PrelabelRequest:
    """What to pre-label: a project, optional prompts for every task, an LS Data Manager filter or task ids."""

    project: int
    prompts: list[str] = field(default_factory=list)
    query: dict[str, Any] | None = None
    task_ids: list[int] | None = None
    chunk_size: int = 8

    @classmethod
    def from_json(cls, body: Any) -> PrelabelRequest:
        """Validate a `POST /jobs/prelabel` body (BadRequest naming the field)."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", field="body")
        project = body.get("project")
        if not isinstance(project, int) or isinstance(project, bool) or project < 1:
            raise BadRequest("project must be a positive integer (the Label Studio project id)", field="project")
        prompts = body.get("prompts") or []
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise BadRequest("prompts must be a list of non-empty strings", field="prompts")
        query = body.get("filter")
        if query is not None and not isinstance(query, dict):
            raise BadRequest('filter must be a Label Studio Data Manager query object {"filters": {...}}',
                             field="filter")
        task_ids = body.get("task_ids")
        if task_ids is not None and (not isinstance(task_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in task_ids)):
            raise BadRequest("task_ids must be a list of integers", field="task_ids")
        chunk_size = body.get("chunk_size", 8)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= 1000:
            raise BadRequest("chunk_size must be an integer from 1 to 1000", field="chunk_size")
        return cls(project, [p.strip() for p in prompts], query, task_ids, chunk_size)

    def to_json(self) -> dict[str, Any]:
        return {"project": self.project, "prompts": self.prompts, "filter": self.query, "task_ids": self.task_ids,
                "chunk_size": self.chunk_size}


# --- job state ---------------------------------------------------------------------------------------------------

class JobState:
    """Progress of prelabel jobs: Redis hashes/sets when `redis` is given, else process memory (embedded mode).

    Per job: `info` (project, model_version, planned counts, status), the set of finished task ids, failures
    (task id -> code and message) and tasks skipped while running. Recording is idempotent, so a retried chunk never
    counts a task twice; a task that failed and then succeeded counts as done.
    """

    def __init__(self, redis: Any = None, prefix: str = "evf") -> None:
        self.redis = redis
        self.prefix = prefix
        self._memory: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:prelabel:{job_id}" + (f":{part}" if part else "")

    def create(self, job_id: str, **info: Any) -> None:
        """Start a job's record (status, project, …)."""
        self.update(job_id, created_at=time.time(), **info)

    def update(self, job_id: str, **info: Any) -> None:
        """Set fields of a job's info (JSON values)."""
        info = {**info, "updated_at": time.time()}
        if self.redis is None:
            with self._lock:
                self._memory.setdefault(job_id, {"info": {}, "done": set(), "failed": {}, "skipped": {}})
                self._memory[job_id]["info"].update(info)
            return
        with self.redis.pipeline() as pipe:
            pipe.hset(self._key(job_id), mapping={k: json.dumps(v) for k, v in info.items()})
            pipe.expire(self._key(job_id), STATE_TTL)
            pipe.execute()

    def mark(self, job_id: str, task_id: int, outcome: str, code: str = "", message: str = "") -> None:
        """Record a task as "done", "failed" (with a reason) or "skipped" (with a reason)."""
        if self.redis is None:
            with self._lock:
                entry = self._memory[job_id]
                if outcome == "done":
                    entry["done"].add(task_id)
                    entry["failed"].pop(task_id, None)
                elif task_id not in entry["done"]:
                    entry[outcome][task_id] = {"code": code, "message": message}
            return
        reason = json.dumps({"code": code, "message": message})
        with self.redis.pipeline() as pipe:
            if outcome == "done":
                pipe.sadd(self._key(job_id, "done"), task_id)
                pipe.hdel(self._key(job_id, "failed"), task_id)
            else:
                pipe.hset(self._key(job_id, outcome), task_id, reason)
            for part in ("done", "failed", "skipped"):
                pipe.expire(self._key(job_id, part), STATE_TTL)
            pipe.execute()
        if outcome == "failed" and self.redis.sismember(self._key(job_id, "done"), task_id):
            self.redis.hdel(self._key(job_id, "failed"), task_id)

    def get(self, job_id: str, *, max_failures: int = 100) -> dict[str, Any] | None:
        """The job's report: counts, status and failures (None for an unknown job)."""
        if self.redis is None:
            with self._lock:
                entry = self._memory.get(job_id)
                if entry is None:
                    return None
                info, done = dict(entry["info"]), set(entry["done"])
                failed, skipped = dict(entry["failed"]), dict(entry["skipped"])
        else:
            with self.redis.pipeline() as pipe:
                pipe.hgetall(self._key(job_id))
                pipe.smembers(self._key(job_id, "done"))
                pipe.hgetall(self._key(job_id, "failed"))
                pipe.hgetall(self._key(job_id, "skipped"))
                raw, done_raw, failed_raw, skipped_raw = pipe.execute()
            if not raw:
                return None
            info = {k.decode(): json.loads(v) for k, v in raw.items()}
            done = {int(t) for t in done_raw}
            failed = {int(t): json.loads(v) for t, v in failed_raw.items()}
            skipped = {int(t): json.loads(v) for t, v in skipped_raw.items()}
        failed = {t: r for t, r in failed.items() if t not in done}
        skipped = {t: r for t, r in skipped.items() if t not in done and t not in failed}
        to_do = int(info.get("to_do", 0))
        remaining = max(0, to_do - len(done) - len(failed) - len(skipped))
        status = info.get("status", "queued")
        if status == "running" and remaining == 0:
            status = "finished"
        return {"job_id": job_id, "type": "prelabel", **info, "status": status, "done": len(done),
                "failed": len(failed), "skipped": len(skipped), "remaining": remaining,
                "failures": [{"task": t, **r} for t, r in sorted(failed.items())[:max_failures]]}


class Claims:
    """Exclusive claims on (project, model_version, task) so overlapping runs never predict a task twice.

    Redis: `SET NX` with a TTL (a crashed run's claims expire), re-entrant for the same owner (a retried chunk of the
    same job); released only by its owner. Without Redis: a process-local table.
    """

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, redis: Any = None, prefix: str = "evf", ttl: int = 600) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()

    def _key(self, project: int, model_version: str, task_id: int) -> str:
        return f"{self.prefix}:prelabel:claim:{project}:{model_version}:{task_id}"

    def claim(self, project: int, model_version: str, task_id: int, owner: str) -> bool:
        """True when `owner` now holds the task's claim."""
        key = self._key(project, model_version, task_id)
        if self.redis is None:
            with self._lock:
                if self._held.setdefault(key, owner) != owner:
                    return False
                return True
        if self.redis.set(key, owner, nx=True, ex=self.ttl):
            return True
        current = self.redis.get(key)
        if current is not None and current.decode() == owner:
            self.redis.expire(key, self.ttl)
            return True
        return False

    def release(self, project: int, model_version: str, task_id: int, owner: str) -> None:
        """Give the claim up (only if `owner` holds it)."""
        key = self._key(project, model_version, task_id)
        if self.redis is None:
            with self._lock:
                if self._held.get(key) == owner:
                    del self._held[key]
            return
        self.redis.eval(self._RELEASE, 1, key, owner)


# --- planning ----------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The tasks one run will predict (their `predict_task` payloads), and what was left out and why."""

    project: int
    model_version: str
    payloads: list[dict[str, Any]]
    listed: int
    already_predicted: int
    invalid: dict[int, BackendError]

    def chunks(self, size: int) -> list[list[dict[str, Any]]]:
        return [self.payloads[i:i + size] for i in range(0, len(self.payloads), size)]


class _LocalModel:
    """model_info() of the model loaded in this process (embedded mode), for `EvfSamBackend.model_version`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def model_info(self) -> dict[str, str]:
        from backend import jobs

        return jobs.get_runtime(self.settings).info()


def make_client(settings: Settings) -> LabelStudioClient:
    """An LS API client from LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (BadRequest naming what is missing)."""
    from backend.ls_auth import LabelStudioAuth

    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise BadRequest("pre-labelling and corrections need LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a legacy "
                         "token or a Personal Access Token) to call the Label Studio API",
                         field="LABEL_STUDIO_URL" if not settings.label_studio_url else "LABEL_STUDIO_API_KEY")
    auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())
    return LabelStudioClient(settings.label_studio_url, auth)


def _backend_for(settings: Settings, project: int, label_config: str, prompts: Sequence[str], redis: Any) -> Any:
    """H5's model class for the project, so payloads and model_version are exactly those of `/predict`.
    Prompts given for the run are part of extra_params (hence of model_version)."""
    from backend.model import EvfSamBackend, ProjectStore
    from backend.queueing import RedisDispatcher

    dispatcher = _LocalModel(settings) if redis is None else RedisDispatcher(settings)
    backend = EvfSamBackend(project, label_config, dispatcher=dispatcher,  # type: ignore[arg-type]
                            store=ProjectStore(redis, settings.redis_key_prefix), settings=settings)
    if prompts:
        backend.extra_params = {**backend.extra_params, "prelabel_prompts": list(prompts)}
    return backend


def _has_version(predictions: Iterable[Any], model_version: str) -> bool:
    return any(isinstance(p, dict) and p.get("model_version") == model_version for p in predictions)


def plan(settings: Settings, request: PrelabelRequest, client: LabelStudioClient, *, redis: Any = None,
         tasks: list[dict[str, Any]] | None = None) -> Plan:
    """List the project's tasks (or use `tasks`), drop those already predicted by the current model_version and
    build the `predict_task` payloads of the rest. Raises BackendError for a bad project or label config."""
    project = client.get_project(request.project)
    backend = _backend_for(settings, request.project, project.get("label_config") or "", request.prompts, redis)
    try:
        model_version = backend.model_version  # bad config / no model: raised here, before anything is queued
        prompt_hash = backend._prompt_hash()
    finally:
        if hasattr(backend.dispatcher, "close"):
            backend.dispatcher.close()  # only its connections: the model registry was read above
    if tasks is None:
        wanted = set(request.task_ids) if request.task_ids else None
        tasks = [t for t in client.iter_tasks(request.project, query=request.query)
                 if wanted is None or t["id"] in wanted]
    existing: set[int] | None = None
    if any(not isinstance(t.get("predictions"), list) for t in tasks):
        existing = {p["task"] for p in client.list_predictions(project=request.project)
                    if p.get("model_version") == model_version}
    payloads, invalid, already = [], {}, 0
    for index, task in enumerate(tasks):
        done = task["id"] in existing if existing is not None else _has_version(task["predictions"], model_version)
        if done:
            already += 1
            continue
        if request.prompts:
            task = {**task, "data": {**task.get("data", {}), settings.prompt_field: list(request.prompts)}}
        try:
            payloads.append(backend._payload(index, task, None, prompt_hash, settings.label_studio_url))
        except BackendError as error:
            invalid[task["id"]] = error
    return Plan(request.project, model_version, payloads, len(tasks), already, invalid)


# --- running a chunk ---------------------------------------------------------------------------------------------

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
                if _has_version(client.list_predictions(task=task_id), model_version):
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
                    if _has_version(client.list_predictions(task=task_id), pending[task_id]["model_version"]):
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


def _worker_context(settings: Settings) -> tuple[Any, LabelStudioClient]:
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
    redis, client = _worker_context(settings)
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


def enqueue(settings: Settings, redis: Any, job_id: str, the_plan: Plan, chunk_size: int) -> list[str]:
    """Put the plan's chunks on the batch queue; returns the RQ job ids."""
    from rq import Callback, Queue, Retry

    from backend.queueing import BATCH, make_queues

    queue = make_queues(settings, redis)[BATCH]
    retry = Retry(max=settings.job_retries) if settings.job_retries else None
    data = [Queue.prepare_data(CHUNK_JOB, args=({"job_id": job_id, "project": the_plan.project,
                                                 "model_version": the_plan.model_version, "tasks": chunk},),
                               timeout=settings.job_timeout, result_ttl=settings.result_ttl,
                               failure_ttl=settings.failure_ttl, retry=retry, on_failure=Callback(on_chunk_failure),
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
    redis, client = _worker_context(settings)
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


# --- webhook: TASKS_CREATED --------------------------------------------------------------------------------------

def auto_prelabel_enabled(settings: Settings, extra_params: dict[str, Any] | None) -> bool:
    """AUTO_PRELABEL=1, or `{"auto_prelabel": true}` in the project's extra_params."""
    return bool(settings.auto_prelabel or (extra_params or {}).get("auto_prelabel") is True)


def on_tasks_created(event: dict[str, Any]) -> dict[str, Any]:
    """Webhook job for TASKS_CREATED: pre-label the new tasks when auto pre-labelling is on for the project."""
    from backend.model import ProjectStore, project_key
    from backend.queueing import redis_connection

    settings = get_settings()
    project_field = event.get("project")
    project = int(project_key(project_field.get("id") if isinstance(project_field, dict) else project_field))
    redis = redis_connection(settings) if settings.redis_url else None
    extra_params = event.get("extra_params") or \
        ProjectStore(redis, settings.redis_key_prefix).get(str(project)).get("extra_params")
    if not auto_prelabel_enabled(settings, extra_params):
        return {"status": "ignored", "reason": "auto pre-labelling is off (AUTO_PRELABEL / extra_params)"}
    client = make_client(settings)
    tasks = [t if isinstance(t.get("data"), dict) else client.get_task(t["id"])
             for t in event.get("tasks") or [] if isinstance(t, dict) and "id" in t]
    for task in tasks:
        task.setdefault("predictions", [])
    job_id = f"auto-{project}-{uuid.uuid4().hex[:8]}"
    state = state_for(settings, redis)
    request = PrelabelRequest(project=project)
    the_plan = start_run(settings, request, client, state, job_id, redis=redis, tasks=tasks, queue=False)
    run_inline(settings, the_plan, job_id, state, client, request.chunk_size, redis=redis)
    return state.get(job_id) or {"job_id": job_id}



# --- command line ------------------------------------------------------------------------------------------------

def add_arguments(parser: Any) -> None:
    """Options of `python -m backend prelabel`."""
    parser.add_argument("--project", type=int, help="Label Studio project id (required unless --status)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help='prompt for every task (repeatable; "Label: text" picks a label); default: the '
                             "task's prompt field, else the labels' prompts")
    parser.add_argument("--filter", metavar="JSON",
                        help='Label Studio Data Manager query, e.g. \'{"filters": {"conjunction": "and", "items": '
                             '[{"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", '
                             '"value": 0}]}}\'')
    parser.add_argument("--tasks", metavar="IDS", help="only these task ids: 1,2,10-20")
    parser.add_argument("--chunk-size", type=int, default=8, help="tasks per queued job (default 8)")
    parser.add_argument("--no-wait", action="store_true", help="Redis mode: queue the work and exit")
    parser.add_argument("--status", metavar="JOB_ID", help="print the state of a job (Redis mode) and exit")


def _batch_workers(settings: Settings, redis: Any) -> int:
    from rq.worker_registration import WORKERS_BY_QUEUE_KEY

    return int(redis.scard(WORKERS_BY_QUEUE_KEY % settings.queue_batch))


def parse_task_ids(text: str) -> list[int]:
    """`"1,2,10-12"` -> [1, 2, 10, 11, 12] (BadRequest for anything else)."""
    ids: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            ids.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise BadRequest(f"--tasks: {text!r} is not a list of ids and ranges like 1,2,10-20", field="tasks") from None
    return ids


def run_cli(args: Any, settings: Settings) -> int:
    """`python -m backend prelabel …`; returns the exit status (0: every task done or skipped)."""
    from tqdm import tqdm

    redis = None
    if settings.redis_url is not None:
        from backend.queueing import redis_connection

        redis = redis_connection(settings)
    state = state_for(settings, redis)
    if args.status:
        report = state.get(args.status)
        print(json.dumps(report, indent=2) if report else f"no prelabel job {args.status!r}"
              + ("" if redis is not None else " (embedded mode keeps no state between runs)"))
        return 0 if report else 1
    try:
        if args.project is None:
            raise BadRequest("--project is required", field="project")
        body: dict[str, Any] = {"project": args.project, "prompts": args.prompt, "chunk_size": args.chunk_size}
        if args.filter:
            try:
                body["filter"] = json.loads(args.filter)
            except json.JSONDecodeError as error:
                raise BadRequest(f"--filter is not valid JSON: {error}", field="filter") from None
        if args.tasks:
            body["task_ids"] = parse_task_ids(args.tasks)
        request = PrelabelRequest.from_json(body)
        job_id = f"prelabel-{uuid.uuid4().hex[:12]}"
        with make_client(settings) as client:
            state.create(job_id, status="planning", project=request.project)
            the_plan = start_run(settings, request, client, state, job_id, redis=redis)
            print(f"job {job_id}: project {request.project}, model_version {the_plan.model_version}: "
                  f"{the_plan.listed} task(s) listed, {the_plan.already_predicted} already predicted, "
                  f"{len(the_plan.payloads)} to predict")
            if redis is not None and not _batch_workers(settings, redis):
                print(f"warning: no worker is listening on queue '{settings.queue_batch}'; the chunks wait until "
                      "one starts (python -m backend worker)", file=sys.stderr)
            if redis is not None and args.no_wait:
                print(f"queued; follow it with: python -m backend prelabel --status {job_id}")
                return 0
            bar = tqdm(total=len(the_plan.payloads) + len(the_plan.invalid), unit="task", desc="pre-labelling")

            def progress() -> dict[str, Any]:
                report = state.get(job_id) or {}
                bar.update(report.get("done", 0) + report.get("failed", 0) + report.get("skipped", 0) - bar.n)
                bar.set_postfix(failed=report.get("failed", 0), refresh=False)
                return report

            try:
                if redis is None:
                    run_inline(settings, the_plan, job_id, state, client, request.chunk_size,
                               on_progress=progress)
                else:
                    while progress().get("remaining", 0) > 0:
                        time.sleep(0.5)
                report = progress()
            except KeyboardInterrupt:
                bar.close()
                print(f"\ninterrupted; {'queued chunks keep running on the workers; ' if redis else ''}"
                      "run the same command again to resume (tasks already predicted are skipped)")
                return 130
            bar.close()
    except BackendError as error:
        print(f"prelabel: {error.message}", file=sys.stderr)
        return 2
    print(f"done {report['done']}, failed {report['failed']}, skipped {report['skipped']}")
    for failure in report["failures"][:20]:
        print(f"  task {failure['task']}: {failure['code']}: {failure['message']}")
    return 0 if report["failed"] == 0 else 1
