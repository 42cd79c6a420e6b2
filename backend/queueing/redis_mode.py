"""RQ mode (REDIS_URL set): jobs go to the two RQ queues on Redis and run in `python -m backend worker` processes,
which hold the model and announce it in Redis; the server waits on the jobs' result streams."""

from __future__ import annotations

import logging
import time
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from backend import metrics
from backend.errors import Unavailable
from backend.queueing.common import BATCH, INTERACTIVE, Outcome, on_job_failure
from backend.settings import Settings

log = logging.getLogger(__name__)


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
