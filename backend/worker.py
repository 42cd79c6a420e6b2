"""`python -m backend worker`: an RQ worker process that holds the model and serves `interactive` before `batch`.

One worker per GPU (`--gpu N` or CUDA_VISIBLE_DEVICES). Jobs run in the worker process itself (no fork after CUDA
init). Dynamic batching: after taking a predict job the worker takes up to WORKER_BATCH_JOBS - 1 more ready ones
(interactive first), waiting at most WORKER_BATCH_WAIT_MS while fewer are ready; their tasks go through one batched
model call (`backend.jobs.PredictBatch`) and each job is completed with its own result or failure through RQ's own
success/failure handling.

The main thread only takes jobs and calls the model; everything per image runs on the WORKER_THREADS pool:
fetching, decoding, hashing and preprocessing a batch's images, and afterwards the brush RLE, the result's
serialisation and RQ's completion of each job. Batches overlap: when a batch is prepared, the worker takes the jobs
that are ready by then (without waiting) and starts preparing them while the model runs on the first.

While busy, the worker heartbeats every WORKER_HEARTBEAT_INTERVAL seconds for every job it holds; a worker that dies
mid-batch stops heartbeating, the jobs' StartedJobRegistry entries expire after WORKER_ABANDONED_AFTER seconds, and
the next registry maintenance of any worker (RQ's abandoned-job handling) puts them back on their queues while they
have retries left. A job is marked STARTED right after its registry entry is written; should a worker die between
the two, the next maintenance puts the job back at the front of its queue (RQ's own cleanup would drop it).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from redis.exceptions import RedisError
from rq import worker_registration
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty, JobTimeoutException, TimerDeathPenalty, UnixSignalDeathPenalty
from rq.utils import as_text, current_timestamp
from rq.worker import SimpleWorker, WorkerStatus

from backend.queueing import make_queues, publish_model_info, redis_connection
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)
BATCH_POLL_SECONDS = 0.001


class EvfWorker(SimpleWorker):
    """A non-forking RQ worker that runs predict jobs in batches and whose running jobs are declared abandoned soon
    after the worker dies."""

    abandoned_after = 20
    heartbeat_interval = 5.0
    batch_jobs = 1  # predict jobs run through the model together (WORKER_BATCH_JOBS)
    batch_wait = 0.0  # seconds to wait for more of them (WORKER_BATCH_WAIT_MS)
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
        self._requeue_half_started()
        super().run_maintenance_tasks()

    def _requeue_half_started(self) -> None:
        """Put back on its queue (at the front) every job whose StartedJobRegistry entry expired while its status is
        still QUEUED: its worker died between registering and starting it. RQ's cleanup would drop such an entry and
        the job would never run. The worker whose ZREM removes the entry requeues it, so it is requeued once."""
        for queue in self.queues:
            registry = queue.started_job_registry
            for entry in self.connection.zrangebyscore(registry.key, 0, current_timestamp()):
                job = self.job_class.fetch_many([registry.parse_job_id(as_text(entry))], connection=self.connection,
                                                serializer=self.serializer)[0]
                if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                    continue
                if self.connection.zrem(registry.key, entry):
                    self.log.warning("worker %s: job %s was taken by a worker that died before starting it; "
                                     "queued again", self.name, job.id)
                    queue.push_job_id(job.id, at_front=True)

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: also remember the request. RQ raises StopRequested from inside the signal handler; when the
        signal lands in a logging call, the logging module swallows that exception and the worker would go on."""
        self._stop_requested = True
        super().request_stop(signum, frame)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long the job's StartedJobRegistry entry lives without a new heartbeat."""
        return self.abandoned_after

    @property
    def death_penalty_class(self) -> type[BaseDeathPenalty]:  # type: ignore[override]
        """SIGALRM timeouts on the main thread; elsewhere (jobs completed on the pool run their failure callbacks
        there) a timer, since signals reach only the main thread."""
        if threading.current_thread() is threading.main_thread():
            return UnixSignalDeathPenalty
        return TimerDeathPenalty

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job`; a predict job first gathers up to `batch_jobs` - 1 more ready jobs (interactive first, waiting
        at most `batch_wait` seconds) and all of them go through the model together, then batches go on while jobs
        are ready (`_run_batches`). Every job taken is in RQ's StartedJobRegistry from the moment it is taken, so a
        worker that dies mid-batch leaves them all to be retried.
        """
        if self.before_job is not None:
            self.before_job()
        self._held: dict[str, tuple[Job, Queue, Any]] = {}
        self._held_lock = threading.Lock()
        taken = [self._take(job, queue)]
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat_while_busy, args=(done,), name="evf-heartbeat", daemon=True)
        beat.start()
        try:
            if _batched_form(job) is not None:
                self._take_more(taken, self.batch_wait)
            batch = [entry for entry in taken if _batched_form(entry[0]) is not None]
            others = [entry for entry in taken if entry not in batch]
            if batch:
                self._run_batches(batch, others)
            for entry in others:
                self.perform_job(*entry)
                self._release(entry[0])
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _take(self, job: Job, queue: Queue) -> tuple[Job, Queue, Any]:
        """Start a job just taken from `queue`: its StartedJobRegistry entry, then at once its STARTED status (RQ's
        abandoned-job handling retries only STARTED jobs; `_requeue_half_started` covers a death in between), and
        heartbeats for it from now until `_release`."""
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        with self._held_lock:
            self._held[job.id] = (job, queue, execution)
        return job, queue, execution

    def _release(self, job: Job) -> None:
        with self._held_lock:
            self._held.pop(job.id, None)

    def _take_more(self, taken: list[tuple[Job, Queue, Any]], wait: float) -> None:
        """Add jobs to `taken` until it holds `batch_jobs`, from the queues in priority order, each started at once
        (so it cannot be lost); polls until `wait` seconds have passed while fewer are ready."""
        deadline = time.monotonic() + wait
        while len(taken) < self.batch_jobs and not self._stop_requested:
            try:
                found = self.queue_class.dequeue_any(self._ordered_queues, None, connection=self.connection,
                                                     job_class=self.job_class, serializer=self.serializer,
                                                     death_penalty_class=self.death_penalty_class)
            except RedisError as error:
                self.log.warning("worker %s: stopped gathering a batch: %s", self.name, error)
                return
            if found is not None:
                taken.append(self._take(*found))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, BATCH_POLL_SECONDS))

    def _run_batches(self, batch: list[tuple[Job, Queue, Any]], others: list[tuple[Job, Queue, Any]]) -> None:
        """Predict `batch`, and the batches that are ready each time the previous one is prepared, until none is
        ready, a non-predict job was taken (it goes to `others`), a stop is requested or maintenance is due. The
        next batch is prepared on the pool while the model runs; jobs are completed on the pool; all are completed
        on return."""
        completions: list[Future[None]] = []
        current: _Batch | None = self._start_batch(batch)
        while current is not None:
            following = None
            try:
                with self.death_penalty_class(current.timeout, _BatchTimeout, job_id=current.entries[0][0].id):
                    if current.run is not None:
                        current.run.wait_prepared()
                    following = self._start_next(others)
                    if current.run is not None:
                        current.run.predict()
            except _BatchTimeout:
                current.failure = JobTimeoutException(f"the batch of {len(current.entries)} task(s) ran longer than "
                                                      f"{current.timeout} s (JOB_TIMEOUT)")
            except Exception as error:  # noqa: BLE001 - the batch isolates tasks; this is a failure of all
                current.failure = error
            self.log.info("worker %s: batch %s of %d job(s) predicted in %.0f ms", self.name, current.id,
                          len(current.entries), (time.perf_counter() - current.started) * 1000)
            pool = _pool()
            completions += [pool.submit(self._complete, current, index) for index in range(len(current.entries))]
            current = following
        for completion in completions:
            completion.result()

    def _start_next(self, others: list[tuple[Job, Queue, Any]]) -> _Batch | None:
        """Take the jobs ready now (no waiting) and start preparing the predict jobs among them; None when there are
        none, a non-predict job waits in `others`, a stop was requested or maintenance is due."""
        if others or self._stop_requested or self.should_run_maintenance_tasks:
            return None
        taken: list[tuple[Job, Queue, Any]] = []
        self._take_more(taken, 0.0)
        others += [entry for entry in taken if _batched_form(entry[0]) is None]
        batch = [entry for entry in taken if _batched_form(entry[0]) is not None]
        if not batch:
            return None
        if self.before_job is not None:
            self.before_job()
        try:
            return self._start_batch(batch)
        except RedisError as error:  # its jobs stay started without heartbeat: abandoned, then retried
            self.log.warning("worker %s: could not start the next batch: %s", self.name, error)
            for job, _, _ in batch:
                self._release(job)
            return None

    def _start_batch(self, batch: list[tuple[Job, Queue, Any]]) -> _Batch:
        """Record the (started) jobs' batch in job.meta and queue their preparation on the pool."""
        jobs = [job for job, _, _ in batch]
        started = _Batch(batch, uuid.uuid4().hex[:12], min(job.timeout or self.queue_class.DEFAULT_TIMEOUT
                                                             for job in jobs))
        with self.connection.pipeline() as pipeline:
            for position, job in enumerate(jobs):
                job.meta["batch"] = {"id": started.id, "size": len(jobs), "position": position}
                pipeline.hset(job.key, "meta", job.serializer.dumps(job.meta))
            pipeline.execute()
        try:
            started.run = _batched_form(jobs[0])([job.args[0] for job in jobs])
        except Exception as error:  # noqa: BLE001 - e.g. the model cannot be loaded: every job fails with it
            started.failure = error
        return started

    def _complete(self, batch: _Batch, index: int) -> None:
        """Finish job `index` of `batch` (its LS prediction, on this pool thread) and complete it exactly as RQ's
        perform_job does (success/failure registries, callbacks, retries)."""
        job, queue, execution = batch.entries[index]
        self._release(job)
        try:
            outcome = batch.failure or batch.run.finish(index)  # type: ignore[union-attr]
            if isinstance(outcome, BaseException):
                raise outcome
            self._finalize_success(job, queue, execution, outcome)
        except Exception:  # noqa: BLE001 - as RQ's perform_job: any failure is the job's failure
            self._finalize_failure(job, queue, execution, sys.exc_info())

    def _heartbeat_while_busy(self, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_interval):
            with self._held_lock:  # a job being completed is released first, so no beat revives it
                for job, _, execution in list(self._held.values()):
                    try:
                        self.maintain_heartbeats(job, execution)
                    except RedisError as error:
                        self.log.warning("heartbeat for job %s failed: %s", job.id, error)
                        break


class _Batch:
    """Predict jobs going through one model call: their RQ entries, the staged prediction (`run`) or the failure
    that hit all of them."""

    def __init__(self, entries: list[tuple[Job, Queue, Any]], batch_id: str, timeout: int) -> None:
        self.entries = entries
        self.id = batch_id
        self.timeout = timeout
        self.run: Any = None  # backend.jobs.PredictBatch
        self.failure: BaseException | None = None
        self.started = time.perf_counter()


class _BatchTimeout(BaseException):
    """A batch ran past its JOB_TIMEOUT (a BaseException, so no per-task error handling swallows it)."""


def _batched_form(job: Job) -> Callable[[list[dict[str, Any]]], Any] | None:
    """The staged batched form of a job's function (jobs.PIPELINED) when the job can join a batch, else None."""
    from backend import jobs

    if job.kwargs or len(job.args) != 1:
        return None
    return jobs.PIPELINED.get(job.func_name or "")


def _pool() -> Any:
    """The process's per-image thread pool (backend.jobs.get_pool)."""
    from backend import jobs

    return jobs.get_pool(get_settings())


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
        worker.batch_jobs = settings.worker_batch_jobs
        worker.batch_wait = settings.worker_batch_wait_ms / 1000
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
