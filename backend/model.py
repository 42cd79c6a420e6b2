"""The Label Studio model class: what to predict for a project's tasks, and how the answers are assembled.

Shaped like label-studio-ml's `LabelStudioMLBase` (`setup`, `predict(tasks, context)`, `fit(event, data)`,
`model_version`), so users of that class can read and extend it. The work itself runs as jobs
(`backend.jobs`) through a dispatcher (`backend.queueing`): RQ workers, or a thread in embedded mode.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from backend import label_config as ls_config
from backend import metrics, prompts
from backend.errors import BackendError, BadRequest, PromptError
from backend.settings import Settings, get_settings

if TYPE_CHECKING:
    from redis import Redis

    from backend.queueing import Dispatcher

log = logging.getLogger(__name__)

PREDICT_JOB = "backend.jobs.predict_task"
EVENT_JOB = "backend.jobs.record_event"
# Webhook actions queued for the corrections/training pipeline; every other action is acknowledged and ignored.
QUEUED_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
                           "START_TRAINING", "TASKS_CREATED"})


def format_model_version(model_name: str, fingerprint: str, prompt_hash: str) -> str:
    """`<model_name>-<fingerprint[:8]>-p<prompt-set hash[:6]>`: changes whenever the model or the prompts change."""
    return f"{model_name}-{fingerprint[:8]}-p{prompt_hash[:6]}"


def project_key(project: Any) -> str:
    """LS sends `"<id>.<created_at epoch>"` (or a bare id); the id part names the project."""
    if project is None or project == "":
        return "default"
    return str(project).split(".", 1)[0]


@dataclass(frozen=True)
class MaskOptions:
    """How masks become regions: settings defaults, overridable per project through `extra_params`."""

    mask_mode: str = "semantic"
    min_area: int = 0
    fill_holes_below: int = 0
    max_instances: int = 20
    semantic: bool = False

    @classmethod
    def resolve(cls, settings: Settings, extra_params: dict[str, Any] | None) -> MaskOptions:
        """Settings values, with `extra_params` keys of the same names taking precedence (validated)."""
        values: dict[str, Any] = {"mask_mode": settings.mask_mode, "min_area": settings.mask_min_area,
                                  "fill_holes_below": settings.mask_fill_holes,
                                  "max_instances": settings.max_instances, "semantic": False}
        for name, default in list(values.items()):
            if not extra_params or name not in extra_params:
                continue
            value = extra_params[name]
            if name == "mask_mode" and value not in ("semantic", "instances"):
                raise BadRequest(f'mask_mode must be "semantic" or "instances", not {value!r}',
                                 field=f"extra_params.{name}")
            if isinstance(default, bool) and not isinstance(value, bool):
                raise BadRequest(f"{name} must be true or false", field=f"extra_params.{name}")
            if isinstance(default, int) and not isinstance(default, bool) and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise BadRequest(f"{name} must be a non-negative integer", field=f"extra_params.{name}")
            values[name] = value
        return cls(**values)


class ProjectStore:
    """Per-project state (label config, extra_params, LS hostname) in Redis when available, else in memory.

    LS repeats /setup before every prediction pass, so losing this state costs nothing; interactive calls skip
    /setup and read the extra_params stored here.
    """

    def __init__(self, redis: Redis | None = None, prefix: str = "evf") -> None:
        self._redis = redis
        self._prefix = prefix
        self._memory: dict[str, dict[str, Any]] = {}
        self._versions: set[str] = set()
        self._lock = threading.Lock()

    def get(self, project: str) -> dict[str, Any]:
        """The stored state of `project` ({} when unknown)."""
        if self._redis is None:
            with self._lock:
                return dict(self._memory.get(project, {}))
        raw = self._redis.get(f"{self._prefix}:project:{project}")
        return json.loads(raw) if raw else {}

    def update(self, project: str, **fields: Any) -> None:
        """Merge `fields` into the state of `project`."""
        state = {**self.get(project), **fields, "updated_at": time.time()}
        if self._redis is None:
            with self._lock:
                self._memory[project] = state
        else:
            self._redis.set(f"{self._prefix}:project:{project}", json.dumps(state))

    def add_version(self, version: str) -> None:
        """Remember a model_version handed to LS (listed by /versions)."""
        if self._redis is None:
            with self._lock:
                self._versions.add(version)
        else:
            self._redis.sadd(f"{self._prefix}:versions", version)

    def versions(self) -> list[str]:
        """Every model_version handed out, sorted."""
        if self._redis is None:
            with self._lock:
                return sorted(self._versions)
        return sorted(v.decode() if isinstance(v, bytes) else v for v in self._redis.smembers(f"{self._prefix}:versions"))


class EvfSamBackend:
    """Text-prompted brush masks for one Label Studio project (label-studio-ml `LabelStudioMLBase` shape).

    Cheap to create: the app makes one per request; the model lives in the workers (or the embedded runtime).
    """

    def __init__(self, project_id: Any = None, label_config: str | None = None, *, dispatcher: Dispatcher,
                 store: ProjectStore, settings: Settings | None = None) -> None:
        self.project_id = project_key(project_id)
        self.settings = settings or get_settings()
        self.dispatcher = dispatcher
        self.store = store
        self.state = store.get(self.project_id)
        self.label_config = label_config or self.state.get("label_config")
        self.extra_params: dict[str, Any] = self.state.get("extra_params") or {}
        self._parsed: ls_config.LabelConfig | None = None

    # --- LabelStudioMLBase-shaped API -------------------------------------------------------------------------

    def setup(self, extra_params: dict[str, Any] | None = None, hostname: str | None = None) -> str:
        """Validate the label config, remember the project's extra_params/hostname; returns the model_version."""
        self.extra_params = extra_params or {}
        for target in self.parsed_config.targets:  # per-label prompts naming unknown labels fail here, not per task
            prompts.resolve({"data": {}}, target, extra_params=self.extra_params,
                            max_length=self.settings.max_prompt_length)
        version = self.model_version  # validates config and extra_params before anything is stored
        self.store.update(self.project_id, label_config=self.label_config, extra_params=self.extra_params,
                          hostname=hostname)
        self.store.add_version(version)
        return version

    @property
    def model_version(self) -> str:
        """Current `<model>-<weights[:8]>-p<prompts[:6]>` of this project."""
        prompt_hash = self._prompt_hash()  # bad config / extra_params are reported before model availability
        info = self.dispatcher.model_info()
        return format_model_version(info["model_name"], info["fingerprint"], prompt_hash)

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None,
                **kwargs: Any) -> list[dict[str, Any]]:
        """Exactly one LS prediction per task, in task order; a failed task gets `{"result": [], "score": 0.0, …}`.

        `context` set (interactive call): input errors raise (422) instead of yielding an empty prediction.
        kwargs: `hostname` (LS base URL sent by newer LS), anything else is ignored.
        """
        interactive = context is not None
        model_version = self.model_version
        prompt_hash = self._prompt_hash()
        hostname = kwargs.get("hostname") or self.state.get("hostname")
        payloads: list[dict[str, Any] | None] = []
        failures: dict[int, BackendError] = {}
        for index, task in enumerate(tasks):
            try:
                payloads.append(self._payload(index, task, context, prompt_hash, hostname))
            except BackendError as error:
                if interactive:
                    raise
                payloads.append(None)
                failures[index] = error

        to_run = [p for p in payloads if p is not None]
        use_interactive = interactive or len(tasks) <= self.settings.interactive_max_tasks
        outcomes = iter(self.dispatcher.run(PREDICT_JOB, to_run, interactive=use_interactive,
                                            timeout=self.settings.predict_timeout) if to_run else [])
        answers = []
        for index, (task, payload) in enumerate(zip(tasks, payloads)):
            if payload is None:
                code, message = failures[index].code, failures[index].message
            else:
                outcome = next(outcomes)
                if outcome.ok:
                    metrics.PREDICTIONS.labels(outcome="ok" if outcome.value["result"] else "empty").inc()
                    metrics.REGIONS.inc(len(outcome.value["result"]))
                    answers.append(outcome.value)
                    continue
                code, message = outcome.error, outcome.message
            log.warning("task %s: empty prediction (%s): %s", task.get("id"), code, message)
            metrics.record_failure(code)
            answers.append({"result": [], "score": 0.0, "model_version": model_version})
        return answers

    def fit(self, event: str, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Queue a webhook event (annotations, START_TRAINING, TASKS_CREATED); others are acknowledged only."""
        if event not in QUEUED_EVENTS:
            metrics.WEBHOOKS.labels(action="other", outcome="ignored").inc()
            return {"status": "ignored", "action": event}
        job_id = self.dispatcher.submit(EVENT_JOB, {**data, "action": event, "received_at": time.time()},
                                        interactive=False)
        metrics.WEBHOOKS.labels(action=event, outcome="queued").inc()
        return {"status": "queued", "action": event, "job_id": job_id}

    # --- helpers ----------------------------------------------------------------------------------------------

    @property
    def parsed_config(self) -> ls_config.LabelConfig:
        """The parsed label config (raises ConfigError naming the problem)."""
        if self._parsed is None:
            if not self.label_config:
                raise BadRequest("no label config: send it as label_config (or call /setup first)",
                                 field="label_config")
            self._parsed = ls_config.parse(self.label_config)
        return self._parsed

    def mask_options(self) -> MaskOptions:
        """Mask options of this project (settings + extra_params overrides)."""
        return MaskOptions.resolve(self.settings, self.extra_params)

    def _prompt_hash(self) -> str:
        """The prompt-set hash: targets, labels, per-label prompts, extra_params and mask options."""
        return prompts.prompt_set_hash(self.parsed_config.targets, self.extra_params,
                                       mask_options=asdict(self.mask_options()))

    def _payload(self, index: int, task: dict[str, Any], context: dict[str, Any] | None, prompt_hash: str,
                 hostname: str | None) -> dict[str, Any]:
        """The `predict_task` job payload of one task (see backend.jobs)."""
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise BadRequest("each task needs a 'data' object", field=f"tasks[{index}].data")
        groups: dict[str, dict[str, Any]] = {}
        count = 0
        for target in self.parsed_config.targets:
            url = task["data"].get(target.value_key)
            if not isinstance(url, str) or not url:
                raise BadRequest(f"task {task.get('id')} has no image URL in data.{target.value_key}",
                                 field=f"tasks[{index}].data.{target.value_key}")
            requests = prompts.resolve(task, target, context=context, extra_params=self.extra_params,
                                       prompt_field=self.settings.prompt_field,
                                       max_length=self.settings.max_prompt_length)
            group = groups.setdefault(url, {"url": url, "to_name": target.to_name, "requests": []})
            for request in requests:
                group["requests"].append({"from_name": target.from_name, "type": target.control_type,
                                          "label": request.label, "prompt": request.prompt})
                count += 1
        if count == 0:
            raise PromptError(f"task {task.get('id')}: no prompt found (no TextArea text, no data.{self.settings.prompt_field},"
                              " no labels)", field=f"tasks[{index}]")
        if count > self.settings.max_prompts_per_task:
            raise PromptError(f"task {task.get('id')} has {count} prompts, more than MAX_PROMPTS_PER_TASK="
                              f"{self.settings.max_prompts_per_task}", field=f"tasks[{index}]")
        return {"task_id": task.get("id"), "hostname": hostname, "prompt_hash": prompt_hash,
                "options": asdict(self.mask_options()),
                "images": [group for group in groups.values() if group["requests"]]}
