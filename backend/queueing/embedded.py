"""Embedded mode (no REDIS_URL): jobs run on one worker thread of the server process, interactive first, with the
same job functions, batching and retries as the RQ workers."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue as stdlib_queue
import sys
import threading
import time
import uuid
from typing import Any

from rq.utils import import_attribute

from backend import metrics
from backend.errors import Unavailable
from backend.queueing.common import BATCH, INTERACTIVE, Outcome, failure_reason, is_permanent
from backend.settings import Settings

log = logging.getLogger(__name__)


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
