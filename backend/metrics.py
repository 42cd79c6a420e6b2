"""Prometheus metrics of the HTTP server (served as text at `GET /metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("evf_http_requests_total", "HTTP requests answered", ["route", "status"])
REQUEST_SECONDS = Histogram("evf_http_request_seconds", "HTTP request latency", ["route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100))
PREDICTIONS = Counter("evf_predictions_total", "Predictions returned, one per task", ["outcome"])
TASK_FAILURES = Counter("evf_task_failures_total", "Tasks answered with an empty prediction, by reason", ["reason"])
TASK_SECONDS = Histogram("evf_task_seconds", "Seconds from enqueue to result per task", ["queue"],
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90))
REGIONS = Counter("evf_regions_total", "Brush regions returned")
WEBHOOKS = Counter("evf_webhooks_total", "Webhook events received", ["action", "outcome"])
QUEUE_DEPTH = Gauge("evf_queue_depth", "Jobs waiting per queue (sampled at scrape)", ["queue"])
BATCH_JOBS = Histogram("evf_batch_jobs", "Predict jobs per batched model call in this process (embedded mode; RQ "
                       "workers record it in each job's meta)", buckets=(1, 2, 4, 8, 16, 32, 64))
WORKERS = Gauge("evf_workers", "Workers listening (sampled at scrape)")


def record_failure(reason: str) -> None:
    """Count one task that got an empty prediction because of `reason` (an error code)."""
    TASK_FAILURES.labels(reason=reason).inc()
    PREDICTIONS.labels(outcome="failed").inc()
