"""HTTP routes of the Label Studio ML backend: parse the request, call the model class, answer JSON.

Routes: GET /health, POST /setup, POST /predict, POST /webhook, GET /versions, GET /metrics, POST /jobs/prelabel,
GET /jobs/{id}.
HTTP Basic auth guards every route but /webhook (LS sends webhooks without credentials), which checks
WEBHOOK_SECRET in its own header. Every error is JSON `{"error", "message", "field"}`, mapped in `error_response`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import metrics
from backend.errors import AuthError, BackendError, BadRequest
from backend.model import EvfSamBackend, ProjectStore
from backend.queueing import Dispatcher, make_dispatcher
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

ROUTES = ("/health", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/jobs/prelabel")


class PredictRequest(BaseModel):
    """LS `POST /predict` (batch: `params.context` null; interactive: an object). Unknown keys are ignored."""

    model_config = ConfigDict(extra="allow")
    tasks: list[dict[str, Any]] = Field(min_length=1)
    project: str | int | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class SetupRequest(BaseModel):
    """LS `POST /setup`. `access_token` (the creator's legacy token) is accepted but never used or logged."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, hide_input_in_errors=True)
    project: str | int | None = None
    label_config: str = Field(alias="schema")
    hostname: str | None = None
    extra_params: dict[str, Any] | str | None = None


def error_response(error: Exception) -> JSONResponse:
    """The one place where exceptions become HTTP answers."""
    if isinstance(error, BackendError):
        status, code, message, field = error.status, error.code, error.message, error.field
    elif isinstance(error, RequestValidationError):
        status, code, message, field = _validation_error(error.errors())
    elif isinstance(error, ValidationError):
        status, code, message, field = _validation_error(error.errors())
    elif isinstance(error, RedisError):
        status, code, message, field = 503, "redis_unavailable", f"Redis is unavailable: {error}", None
    elif isinstance(error, StarletteHTTPException) and isinstance(error.__cause__, UnicodeDecodeError):
        status, code, field = 400, "malformed_json", "body"  # FastAPI's body parser hides the cause otherwise
        message = f"request body is not UTF-8 encoded JSON: {error.__cause__}"
    elif isinstance(error, StarletteHTTPException):
        status = error.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message, field = str(error.detail), None
    else:
        log.exception("unhandled error", exc_info=error)
        status, code, message, field = 500, "internal_error", "internal error (details in the server log)", None
    return JSONResponse({"error": code, "message": message, "field": field}, status_code=status)


def _validation_error(errors: list[dict[str, Any]]) -> tuple[int, str, str, str | None]:
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return 400, "malformed_json", f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", \
            "body"
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    if first.get("type") == "missing":
        return 422, "missing_field", f"required field '{field}' is missing", field
    return 422, "invalid_field", f"{field}: {first.get('msg')}", field


def _basic_auth_ok(header: str | None, settings: Settings) -> bool:
    """Constant-time comparison of both user and password."""
    assert settings.basic_auth_user is not None and settings.basic_auth_pass is not None
    user, password = b"", b""
    if header and header[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            pass
    user_ok = hmac.compare_digest(user, settings.basic_auth_user.encode())
    pass_ok = hmac.compare_digest(password, settings.basic_auth_pass.get_secret_value().encode())
    return user_ok and pass_ok


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> FastAPI:
    """The ASGI app. Embedded mode loads the model during startup; Redis mode never loads it here."""
    settings = settings or get_settings()
    predict_slots = anyio.CapacityLimiter(64)  # /predict waits on jobs in threads: bounded, and apart from...
    control_slots = anyio.CapacityLimiter(16)  # ...the short calls that must stay fast (/health, /setup, /webhook)

    async def blocking(function: Callable[[], T], limiter: anyio.CapacityLimiter) -> T:
        return await anyio.to_thread.run_sync(function, limiter=limiter)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        app.state.dispatcher = dispatcher or await anyio.to_thread.run_sync(make_dispatcher, settings)
        app.state.store = ProjectStore(app.state.dispatcher.redis, settings.redis_key_prefix)
        log.info("backend ready: %s", settings.describe())
        yield
        app.state.dispatcher.close()

    app = FastAPI(title="EVF-SAM Label Studio ML backend", lifespan=lifespan, docs_url=None, redoc_url=None)

    def backend_for(request: Request, project: Any, label_config: str | None) -> EvfSamBackend:
        return EvfSamBackend(project, label_config, dispatcher=request.app.state.dispatcher,
                             store=request.app.state.store, settings=settings)

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        route = request.url.path if request.url.path in ROUTES else "other"
        if settings.basic_auth_user and request.url.path != "/webhook" and not _basic_auth_ok(
                request.headers.get("authorization"), settings):
            response: Response = error_response(AuthError("HTTP Basic credentials missing or wrong"))
            response.headers["WWW-Authenticate"] = 'Basic realm="evf-sam"'
        else:
            response = await call_next(request)
        metrics.REQUESTS.labels(route=route, status=str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - started)
        return response

    for exception_type in (BackendError, RequestValidationError, StarletteHTTPException, RedisError, Exception):
        app.add_exception_handler(exception_type, lambda request, error: error_response(error))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness and state; never calls the model and never waits long on Redis."""
        dispatcher: Dispatcher = request.app.state.dispatcher
        stats = dispatcher.stats() if dispatcher.redis is None else await blocking(dispatcher.stats, control_slots)
        model = stats.get("model")
        from backend.corrections.train import training_status

        return {"status": "UP", "model_class": EvfSamBackend.__name__, "training": training_status(settings),
                "model_name": model.get("model_name") if model else None,
                "model_version": f"{model['model_name']}-{model['fingerprint'][:8]}" if model else None,
                "device": model.get("device") if model else None, **stats}

    @app.post("/setup")
    async def setup(body: SetupRequest, request: Request) -> dict[str, str]:
        """Validate the label config and remember extra_params; answers the project's model_version."""
        extra = body.extra_params
        if isinstance(extra, str):
            try:
                extra = json.loads(extra) if extra.strip() else None
            except json.JSONDecodeError as error:
                raise BadRequest(f"extra_params is not valid JSON: {error}", field="extra_params") from error
            if extra is not None and not isinstance(extra, dict):
                raise BadRequest("extra_params must be a JSON object", field="extra_params")

        def run() -> str:
            backend = backend_for(request, body.project, body.label_config)
            return backend.setup(extra_params=extra, hostname=body.hostname)

        return {"model_version": await blocking(run, control_slots)}

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        """One prediction per task, in order (empty ones for tasks that failed or ran out of time)."""
        params = body.params or {}
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise BadRequest("params.context must be an object or null", field="params.context")

        def run() -> list[dict[str, Any]]:
            backend = backend_for(request, body.project, body.label_config)
            return backend.predict(body.tasks, context=context, hostname=params.get("hostname"))

        return {"results": await blocking(run, predict_slots)}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        """Acknowledge at once and queue the work; checked by WEBHOOK_SECRET instead of Basic auth."""
        if settings.webhook_secret is not None:
            given = request.headers.get(settings.webhook_secret_header, "").encode()
            if not hmac.compare_digest(given, settings.webhook_secret.get_secret_value().encode()):
                raise AuthError(f"missing or wrong {settings.webhook_secret_header} header", field="webhook_secret")
        try:
            event = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"request body is not valid JSON: {error}", status=400, code="malformed_json",
                             field="body") from error
        if not isinstance(event, dict) or not isinstance(event.get("action"), str):
            raise BadRequest("a webhook body is a JSON object with an 'action' string", field="action")
        project = event.get("project")
        project_id = project.get("id") if isinstance(project, dict) else project

        def queue_event() -> dict[str, Any]:
            return backend_for(request, project_id, None).fit(event["action"], event)

        return await blocking(queue_event, control_slots)

    @app.post("/jobs/prelabel", status_code=202)
    async def start_prelabel(request: Request) -> dict[str, Any]:
        """Start bulk pre-labelling of a project (body: project, prompts, filter, task_ids, chunk_size)."""
        from backend import prelabel

        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"request body is not valid JSON: {error}", status=400, code="malformed_json",
                             field="body") from error
        job = prelabel.PrelabelRequest.from_json(body)
        dispatcher: Dispatcher = request.app.state.dispatcher
        job_id = await blocking(lambda: prelabel.submit(settings, job, dispatcher.redis,
                                                        predict=prelabel.predict_via(dispatcher, settings)),
                                control_slots)
        return {"job_id": job_id, "status": "queued", "status_url": f"/jobs/{job_id}"}

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str, request: Request) -> dict[str, Any]:
        """Progress of a prelabel job: done / failed (with reasons) / skipped / remaining."""
        from backend import prelabel

        report = await blocking(lambda: prelabel.status(settings, job_id, request.app.state.dispatcher.redis),
                                control_slots)
        if report is None:
            raise BadRequest(f"no job {job_id!r} (job state is kept for 7 days)", status=404, code="not_found",
                             field="job_id")
        return report

    @app.get("/versions")
    async def versions(request: Request) -> dict[str, list[str]]:
        """Every model_version this backend has handed to Label Studio."""
        return {"versions": await blocking(request.app.state.store.versions, control_slots)}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        """Prometheus text format: requests, predictions, failures by reason, latencies, queue depth."""
        dispatcher: Dispatcher = request.app.state.dispatcher
        stats = await blocking(dispatcher.stats, control_slots)
        for name, length in (stats.get("queues") or {}).items():
            metrics.QUEUE_DEPTH.labels(queue=name).set(length)
        if stats.get("workers") is not None:
            metrics.WORKERS.set(stats["workers"])
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
