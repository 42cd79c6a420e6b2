"""What both job transports share: the two lanes, a job's `Outcome`, the `Dispatcher` protocol the server uses, and
how a failure is named, classified (permanent or worth a retry) and recorded (`on_job_failure`, RQ's callback)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from backend.errors import BackendError
from evf_sam.errors import CheckpointError, ImageError
from evf_sam.errors import PromptError as ModelPromptError

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
