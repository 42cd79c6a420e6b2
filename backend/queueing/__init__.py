"""Where jobs run: RQ workers on Redis (`RedisDispatcher`) or a thread of the server (`EmbeddedDispatcher`).

Both run the same job functions (`backend.jobs`) with the same payloads, so the two modes give identical output.
Two priorities: the `interactive` queue is always served before the `batch` queue.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue as stdlib_queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import import_attribute
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from backend import metrics
from backend.errors import BackendError, Unavailable
from backend.settings import Settings
from evf_sam.errors import CheckpointError, ImageError
from evf_sam.errors import PromptError as ModelPromptError

log = logging.getLogger(__name__)

INTERACTIVE, BATCH = "interactive", "batch"


@dataclass(frozen=True)
class Outcome:
    """What became of one job: its return value, or an error code (metrics label) and a readable message."""

    value: Any = None
    error: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class Dispatcher(Protocol):
    """What the server needs from a job transport."""

    mode: str
    redis: Redis | None

    def model_info(self) -> dict[str, str]:
        """model_name, fingerprint, device, … of the model the workers run (raises Unavailable)."""

    def run(self, func: str, payloads: list[dict[str, Any]], *, interactive: bool, timeout: float) -> list[Outcome]:
        """Run `func(payload)` for each payload; one Outcome per payload, in order, within `timeout` seconds."""

    def submit(self, func: str, payload: dict[str, Any], *, interactive: bool = False) -> str:
        """Queue `func(payload)` without waiting; returns the job id."""

    def stats(self) -> dict[str, Any]:
        """Queue lengths, workers and Redis state, answered fast (for /health and /metrics)."""

    def close(self) -> None:
        """Release threads and connections."""


def make_dispatcher(settings: Settings) -> Dispatcher:
    """Redis/RQ when REDIS_URL is set, else embedded (which loads the model now)."""
    return EmbeddedDispatcher(settings) if settings.embedded else RedisDispatcher(settings)


def failure_reason(error: BaseException | None) -> tuple[str, str]:
    """(code, message) of a job failure: the BackendError code, or a code for worker-level failures."""
    if isinstance(error, BackendError):
        return error.code, error.message
    if isinstance(error, AbandonedJobError):
        return "worker_lost", "the worker running this task stopped before finishing it"
    if isinstance(error, JobTimeoutException):
        return "job_timeout", str(error) or "the task ran longer than JOB_TIMEOUT"
    if isinstance(error, ImageError):
        return "bad_image", str(error)
    if isinstance(error, ModelPromptError):
        return "bad_prompt", str(error)
    if isinstance(error, CheckpointError):
        return "model_error", str(error)
    return "internal_error", f"{type(error).__name__}: {error}"


def is_permanent(error: BaseException | None) -> bool:
    """Bad input fails the same way every time, so it is not retried."""
    if isinstance(error, BackendError):
        return error.status < 500
    return isinstance(error, (ImageError, ModelPromptError))


def on_job_failure(job: Job, connection: Redis, exc_type: type, exc_value: BaseException, traceback: Any) -> None:
    """RQ failure callback (runs in the worker): keep the reason in job.meta and skip retries for bad input."""
    code, message = failure_reason(exc_value)
    job.meta["error"] = {"code": code, "message": message}
    if is_permanent(exc_value):
        job.retries_left = 0
    job.save_meta()


# --- embedded mode -----------------------------------------------------------------------------------------------

class EmbeddedDispatcher:
    """Jobs run on one worker thread of the server process, interactive first, from a bounded queue."""

    mode = "embedded"
    redis = None

    def __init__(self, settings: Settings) -> None:
        from backend import jobs

        self.settings = settings
        self._runtime = jobs.get_runtime(settings)  # load the weights at start, never per request
        # The model thread shares the GIL with the HTTP event loop: hand it over more often so /health stays fast.
        sys.setswitchinterval(0.001)
        self._queue: stdlib_queue.PriorityQueue = stdlib_queue.PriorityQueue()
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._waiting = {INTERACTIVE: 0, BATCH: 0}
        self._busy = False
        self._thread = threading.Thread(target=self._work, name="evf-embedded-worker", daemon=True)
        self._thread.start()

    def model_info(self) -> dict[str, str]:
        return self._runtime.info()

    def run(self, func: str, payloads: list[dict[str, Any]], *, interactive: bool, timeout: float) -> list[Outcome]:
        started = time.monotonic()
        lane = INTERACTIVE if interactive else BATCH
        futures = self._put(func, payloads, lane)
        done, _ = concurrent.futures.wait(futures, timeout=timeout)
        outcomes = []
        for future in futures:
            if future not in done:
                future.cancel()
                outcomes.append(Outcome(error="timeout", message=f"no result within {timeout:.1f} s"))
            elif future.exception() is not None:
                code, message = failure_reason(future.exception())
                outcomes.append(Outcome(error=code, message=message))
            else:
                outcomes.append(Outcome(value=future.result()))
                metrics.TASK_SECONDS.labels(queue=lane).observe(time.monotonic() - started)
        return outcomes

    def submit(self, func: str, payload: dict[str, Any], *, interactive: bool = False) -> str:
        job_id = uuid.uuid4().hex
        future = self._put(func, [payload], INTERACTIVE if interactive else BATCH)[0]
        future.add_done_callback(lambda f: f.cancelled() or f.exception() is None or log.error(
            "job %s (%s) failed: %s", job_id, func, failure_reason(f.exception())[1]))
        return job_id

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = dict(self._waiting)
            busy = self._busy
        return {"mode": self.mode, "redis": None, "workers": 1, "busy_workers": int(busy),
                "model": self._runtime.info(),
                "queues": {self.settings.queue_interactive: waiting[INTERACTIVE],
                           self.settings.queue_batch: waiting[BATCH]}}

    def close(self) -> None:
        self._queue.put((-1, -1, None))
        self._thread.join(timeout=5)

    def _put(self, func: str, payloads: list[dict[str, Any]], lane: str) -> list[concurrent.futures.Future]:
        function = import_attribute(func)
        with self._lock:
            waiting = sum(self._waiting.values())
            if waiting + len(payloads) > self.settings.embedded_queue_size:
                raise Unavailable(f"the embedded queue is full ({waiting} jobs waiting, EMBEDDED_QUEUE_SIZE="
                                  f"{self.settings.embedded_queue_size}); retry later")
            futures = []
            for payload in payloads:
                future: concurrent.futures.Future = concurrent.futures.Future()
                self._queue.put((0 if lane == INTERACTIVE else 1, next(self._sequence), (function, payload, future,
                                                                                        lane)))
                self._waiting[lane] += 1
                futures.append(future)
        return futures

    def _work(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            items = [item, *self._take_more(item)]
            with self._lock:
                for _, _, _, lane in items:
                    self._waiting[lane] -= 1
                self._busy = True
            try:
                running = [entry for entry in items if entry[2].set_running_or_notify_cancel()]
                if running:
                    self._follow_promoted_checkpoint()
                batch = [entry for entry in running if _batched_form(entry[0]) is not None]
                if batch:
                    self._run_batch(batch)
                for function, payload, future, _ in running:
                    if not future.done():
                        self._run_one(function, payload, future)
            finally:
                with self._lock:
                    self._busy = False

    def _take_more(self, first: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """After a predict job: up to WORKER_BATCH_JOBS - 1 more waiting jobs (interactive first), waiting at most
        WORKER_BATCH_WAIT_MS for them."""
        if _batched_form(first[0]) is None:
            return []
        taken: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + self.settings.worker_batch_wait_ms / 1000
        while len(taken) < self.settings.worker_batch_jobs - 1:
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except stdlib_queue.Empty:
                break
            if entry[2] is None:  # close(): hand the stop back to the loop
                self._queue.put(entry)
                break
            taken.append(entry[2])
        return taken

    def _run_batch(self, batch: list[tuple[Any, ...]]) -> None:
        """Predict jobs through one batched call; a task that failed for a transient reason is retried alone."""
        metrics.BATCH_JOBS.observe(len(batch))
        try:
            outcomes = _batched_form(batch[0][0])([payload for _, payload, _, _ in batch])
        except Exception as error:  # noqa: BLE001 - e.g. the model failed to load: every task of the batch failed
            outcomes = [error] * len(batch)
        for (function, payload, future, _), outcome in zip(batch, outcomes):
            if not isinstance(outcome, Exception):
                future.set_result(outcome)
            elif is_permanent(outcome) or not self.settings.job_retries:
                future.set_exception(outcome)
            else:
                log.warning("job failed (%s), retrying: %s", *failure_reason(outcome))
                self._run_one(function, payload, future, attempts=self.settings.job_retries)

    def _follow_promoted_checkpoint(self) -> None:
        """Switch to the checkpoint training promoted since the last job, so /setup reports its model_version."""
        from backend import jobs

        try:
            self._runtime = jobs.get_runtime(self.settings)
        except Exception as error:  # noqa: BLE001 - the job reports the same failure with its own reason
            log.error("cannot load the promoted checkpoint: %s", error)

    def _run_one(self, function: Any, payload: dict[str, Any], future: concurrent.futures.Future,
                 attempts: int | None = None) -> None:
        """Run one job, retrying transient failures: `attempts` tries (default: 1 + JOB_RETRIES)."""
        attempts = self.settings.job_retries + 1 if attempts is None else attempts
        for attempt in range(attempts):
            try:
                future.set_result(function(payload))
                return
            except Exception as error:  # noqa: BLE001 - every failure becomes the task's reported reason
                if is_permanent(error) or attempt == attempts - 1:
                    future.set_exception(error)
                    return
                log.warning("job failed (%s), retrying: %s", *failure_reason(error))


def _batched_form(function: Any) -> Any:
    """The batched form of a job function (backend.jobs.BATCHED), or None when its jobs run one by one."""
    from backend import jobs

    return jobs.BATCHED.get(f"{function.__module__}.{function.__qualname__}")


# --- Redis / RQ mode ---------------------------------------------------------------------------------------------

def model_registry_key(settings: Settings) -> str:
    """Redis hash where workers publish the model they serve (read by the server for model_version)."""
    return f"{settings.redis_key_prefix}:model"


def redis_connection(settings: Settings, *, timeout: float = 5.0) -> Redis:
    """A client for REDIS_URL whose calls fail after `timeout` seconds instead of hanging."""
    assert settings.redis_url is not None
    return Redis.from_url(settings.redis_url.get_secret_value(), socket_connect_timeout=min(timeout, 2.0),
                          socket_timeout=timeout, health_check_interval=30)


def make_queues(settings: Settings, connection: Redis) -> dict[str, Queue]:
    """The two RQ queues, served in this order."""
    return {lane: Queue(name, connection=connection, serializer=JSONSerializer, default_timeout=settings.job_timeout)
            for lane, name in ((INTERACTIVE, settings.queue_interactive), (BATCH, settings.queue_batch))}


class RedisDispatcher:
    """Jobs go to RQ queues on Redis and run in `python -m backend worker` processes (which hold the model)."""

    mode = "redis"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis_connection(settings)
        self._probe = redis_connection(settings, timeout=0.25)  # /health: never wait long on Redis
        self.queues = make_queues(settings, self.redis)
        self._info: tuple[float, dict[str, str] | None] = (0.0, None)

    def model_info(self) -> dict[str, str]:
        checked_at, info = self._info
        if info is not None and time.monotonic() - checked_at < 2.0:
            return info
        try:
            raw = self.redis.hgetall(model_registry_key(self.settings))
        except RedisError as error:
            raise Unavailable(f"Redis is unavailable: {error}") from error
        if not raw:
            raise Unavailable("no worker has registered a model yet; start one with `python -m backend worker`")
        info = {key.decode(): value.decode() for key, value in raw.items()}
        self._info = (time.monotonic(), info)
        return info

    def _enqueue_data(self, func: str, payload: dict[str, Any]) -> Any:
        retry = Retry(max=self.settings.job_retries) if self.settings.job_retries else None
        return Queue.prepare_data(func, args=(payload,), timeout=self.settings.job_timeout,
                                  result_ttl=self.settings.result_ttl, failure_ttl=self.settings.failure_ttl,
                                  retry=retry, on_failure=Callback(on_job_failure),
                                  description=f"{func.rsplit('.', 1)[-1]} task={payload.get('task_id')}")

    def run(self, func: str, payloads: list[dict[str, Any]], *, interactive: bool, timeout: float) -> list[Outcome]:
        started = time.monotonic()
        queue = self.queues[INTERACTIVE if interactive else BATCH]
        try:
            if not self.redis.scard(WORKERS_BY_QUEUE_KEY % queue.name):
                raise Unavailable(f"no worker is listening on queue '{queue.name}'; start one with "
                                  "`python -m backend worker`")
            jobs = queue.enqueue_many([self._enqueue_data(func, payload) for payload in payloads])
        except RedisError as error:
            raise Unavailable(f"Redis is unavailable, nothing was queued: {error}") from error
        return self._wait(jobs, queue.name, started + timeout, started)

    def submit(self, func: str, payload: dict[str, Any], *, interactive: bool = False) -> str:
        queue = self.queues[INTERACTIVE if interactive else BATCH]
        try:
            return queue.enqueue_many([self._enqueue_data(func, payload)])[0].id
        except RedisError as error:
            raise Unavailable(f"Redis is unavailable, nothing was queued: {error}") from error

    def _wait(self, jobs: list[Job], queue_name: str, deadline: float, started: float) -> list[Outcome]:
        """Block on the jobs' result streams (XREAD over all of them) until each has a final result or time is up."""
        outcomes: dict[str, Outcome] = {}
        last_seen = {job.id: "0-0" for job in jobs}
        while len(outcomes) < len(jobs) and (remaining := deadline - time.monotonic()) > 0:
            streams = {Result.get_key(job_id): last for job_id, last in last_seen.items() if job_id not in outcomes}
            try:
                answer = self.redis.xread(streams, block=max(1, int(min(remaining, 1.0) * 1000)))
            except RedisError as error:
                log.error("lost Redis while waiting for results: %s", error)
                break
            for key, entries in answer or []:
                job_id = key.decode().rsplit(":", 1)[-1]
                entry_id, fields = entries[-1]
                last_seen[job_id] = entry_id.decode()
                result = Result.restore(job_id, entry_id.decode(), fields, connection=self.redis,
                                        serializer=JSONSerializer)
                if result.type == Result.Type.SUCCESSFUL:
                    outcomes[job_id] = Outcome(value=result.return_value)
                    metrics.TASK_SECONDS.labels(queue=queue_name).observe(time.monotonic() - started)
                elif result.type != Result.Type.RETRIED:
                    outcomes[job_id] = self._failure(job_id, result)
        for job in jobs:
            if job.id not in outcomes:
                outcomes[job.id] = self._give_up(job, deadline - started)
        return [outcomes[job.id] for job in jobs]

    def _failure(self, job_id: str, result: Result) -> Outcome:
        try:
            error = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer).meta.get("error")
        except (NoSuchJobError, RedisError):
            error = None
        if error:
            return Outcome(error=error["code"], message=error["message"])
        last_line = (result.exc_string or "").strip().splitlines()[-1:] or ["job failed"]
        return Outcome(error="job_failed", message=last_line[0])

    def _give_up(self, job: Job, waited: float) -> Outcome:
        """A job past the deadline: cancel it if nobody started it yet (no wasted GPU time), report a timeout."""
        try:
            if job.get_status(refresh=True) == JobStatus.QUEUED:
                job.cancel()
        except (NoSuchJobError, RedisError) as error:
            log.warning("could not cancel job %s: %s", job.id, error)
        return Outcome(error="timeout", message=f"no result within {waited:.1f} s")

    def stats(self) -> dict[str, Any]:
        try:
            with self._probe.pipeline(transaction=False) as pipe:
                for queue in self.queues.values():
                    pipe.llen(queue.key)
                workers_key = {WORKERS_BY_QUEUE_KEY % queue.name for queue in self.queues.values()}
                pipe.sunion(list(workers_key))
                pipe.hgetall(model_registry_key(self.settings))
                *lengths, workers, model = pipe.execute()
        except RedisError as error:
            return {"mode": self.mode, "redis": "down", "redis_error": str(error)[:200], "workers": None,
                    "model": None, "queues": {}}
        return {"mode": self.mode, "redis": "up", "workers": len(workers),
                "model": {key.decode(): value.decode() for key, value in model.items()} or None,
                "queues": {queue.name: length for queue, length in zip(self.queues.values(), lengths)}}

    def close(self) -> None:
        self.redis.close()
        self._probe.close()


def publish_model_info(connection: Redis, settings: Settings, info: dict[str, str]) -> None:
    """Workers announce the model they serve, so the server can report model_version without loading it."""
    connection.hset(model_registry_key(settings), mapping=info)
