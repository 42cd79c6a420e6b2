"""`python -m backend worker`: an RQ worker process that holds the model and serves `interactive` before `batch`.

One worker per GPU. Jobs run in the worker process itself (no fork after CUDA init). While busy, the worker
heartbeats every WORKER_HEARTBEAT_INTERVAL seconds; a worker that dies mid-job stops heartbeating, its job's
StartedJobRegistry entry expires after WORKER_ABANDONED_AFTER seconds, and the next registry maintenance of any
worker (RQ's abandoned-job handling) puts the job back on its queue while it has retries left.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError
from rq import worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from backend.queueing import make_queues, publish_model_info, redis_connection
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)


class EvfWorker(SimpleWorker):
    """A non-forking RQ worker whose running jobs are declared abandoned soon after the worker dies."""

    abandoned_after = 20
    heartbeat_interval = 5.0
    announce: Callable[[], None] | None = None  # re-publishes the model info (set by run_worker)
    before_job: Callable[[], None] | None = None  # switches to a newly promoted checkpoint (set by run_worker)

    def run_maintenance_tasks(self) -> None:
        """RQ's registry cleaning, and re-registering this worker and its model when Redis lost them (a restart
        without persistence): without that the server would answer 503 "no worker" until the worker restarts."""
        if not self.connection.sismember(self.redis_workers_keys, self.key):
            self.log.warning("worker %s: missing from Redis (restarted?), registering again", self.name)
            with self.connection.pipeline() as pipeline:
                pipeline.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, pipeline)
                pipeline.expire(self.key, self.worker_ttl + 60)
                pipeline.execute()
            if self.announce is not None:
                self.announce()
        super().run_maintenance_tasks()

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: also remember the request. RQ raises StopRequested from inside the signal handler; when the
        signal lands in a logging call, the logging module swallows that exception and the worker would go on."""
        self._stop_requested = True
        super().request_stop(signum, frame)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long the job's StartedJobRegistry entry lives without a new heartbeat."""
        return self.abandoned_after

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self.before_job is not None:
            self.before_job()
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat_while_busy, args=(job, execution, done),
                                name="evf-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _heartbeat_while_busy(self, job: Job, execution: Any, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as error:
                self.log.warning("heartbeat for job %s failed: %s", job.id, error)


def run_worker(settings: Settings | None = None, *, burst: bool = False, name: str | None = None) -> int:
    """Load the model, announce it, then take jobs until stopped (SIGTERM: finish the current job, then exit)."""
    from backend import jobs

    settings = settings or get_settings()
    name = name or f"evf-{socket.gethostname()}-{os.getpid()}"
    connection = redis_connection(settings, timeout=settings.worker_poll_seconds + 10)
    try:
        connection.ping()
    except RedisError as error:
        log.error("cannot reach Redis (%s): %s", settings.describe()["redis"], error)
        return 1
    runtime = jobs.get_runtime(settings)  # before the first job
    served = {"fingerprint": runtime.fingerprint}

    def announce() -> None:
        publish_model_info(connection, settings, {**jobs.get_runtime(settings).info(), "worker": name})

    def switch_to_promoted_checkpoint() -> None:
        """Load the checkpoint training promoted since the last job, and tell the server (new model_version)."""
        try:
            current = jobs.get_runtime(settings)
        except Exception as error:  # noqa: BLE001 - the job reports the same failure with its own reason
            log.error("cannot load the promoted checkpoint: %s", error)
            return
        if current.fingerprint != served["fingerprint"]:
            log.info("worker %s now serves %s (%s)", name, current.checkpoint, current.fingerprint)
            served["fingerprint"] = current.fingerprint
            announce()

    def make_worker() -> EvfWorker:
        worker = EvfWorker(list(make_queues(settings, connection).values()), name=name, connection=connection,
                           serializer=JSONSerializer, worker_ttl=settings.worker_poll_seconds + 15,
                           maintenance_interval=settings.worker_maintenance_interval,
                           default_result_ttl=settings.result_ttl)
        worker.abandoned_after = settings.worker_abandoned_after
        worker.heartbeat_interval = settings.worker_heartbeat_interval
        worker.announce = announce
        worker.before_job = switch_to_promoted_checkpoint
        return worker

    announce()
    while True:
        worker = make_worker()
        log.info("worker %s serving %s with %s on %s", name, worker.queue_names(), runtime.model_name,
                 runtime.device)
        try:
            worker.work(burst=burst, logging_level=settings.log_level)
        except RedisError as error:  # RQ's shutdown bookkeeping itself can fail while Redis is away
            log.warning("worker %s: Redis error while stopping: %s", name, error)
        # RQ's loop ends on a stop request (SIGTERM/SIGINT), in burst mode when the queues are empty, and on any
        # error - a lost Redis connection included. Only the last one is worth outliving: wait for Redis, go on.
        if burst or _stop_requested(worker) or _redis_answers(connection):
            return 0
        if not _wait_for_redis(connection, worker, name):
            return 0
        announce()


def _stop_requested(worker: EvfWorker) -> bool:
    """Whether SIGTERM/SIGINT reached RQ's handlers (which stay installed after its loop ended)."""
    return worker._stop_requested or worker._shutdown_requested_date is not None


def _redis_answers(connection: Any) -> bool:
    try:
        return bool(connection.ping())
    except RedisError:
        return False


def _wait_for_redis(connection: Any, worker: EvfWorker, name: str) -> bool:
    """Ping Redis every second until it answers (True) or the worker is asked to stop (False)."""
    log.warning("worker %s: lost its Redis connection; waiting for Redis to come back", name)
    while not _stop_requested(worker):
        try:
            connection.ping()
            log.info("worker %s: Redis is back, serving again", name)
            return True
        except RedisError:
            time.sleep(1.0)
    return False
