"""Planning a run: list the project's tasks, skip those already predicted by the current model_version and build the
`predict_task` payloads of the rest, exactly as `/predict` would."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from backend.errors import BackendError, BadRequest
from backend.ls_client import LabelStudioClient
from backend.prelabel.request import PrelabelRequest
from backend.settings import Settings


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


def has_version(predictions: Iterable[Any], model_version: str) -> bool:
    """True when one of a task's `predictions` was made by `model_version`."""
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
        done = task["id"] in existing if existing is not None else has_version(task["predictions"], model_version)
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
