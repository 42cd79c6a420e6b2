"""Auto pre-labelling: the TASKS_CREATED webhook job pre-labels new tasks when the project asks for it."""

from __future__ import annotations

import uuid
from typing import Any

from backend.prelabel.planning import make_client
from backend.prelabel.request import PrelabelRequest
from backend.prelabel.run import run_inline, start_run, state_for
from backend.settings import Settings, get_settings


def auto_prelabel_enabled(settings: Settings, extra_params: dict[str, Any] | None) -> bool:
    """AUTO_PRELABEL=1, or `{"auto_prelabel": true}` in the project's extra_params."""
    return bool(settings.auto_prelabel or (extra_params or {}).get("auto_prelabel") is True)


def on_tasks_created(event: dict[str, Any]) -> dict[str, Any]:
    """Webhook job for TASKS_CREATED: pre-label the new tasks when auto pre-labelling is on for the project."""
    from backend.model import ProjectStore, project_key
    from backend.queueing import redis_connection

    settings = get_settings()
    project_field = event.get("project")
    project = int(project_key(project_field.get("id") if isinstance(project_field, dict) else project_field))
    redis = redis_connection(settings) if settings.redis_url else None
    extra_params = event.get("extra_params") or \
        ProjectStore(redis, settings.redis_key_prefix).get(str(project)).get("extra_params")
    if not auto_prelabel_enabled(settings, extra_params):
        return {"status": "ignored", "reason": "auto pre-labelling is off (AUTO_PRELABEL / extra_params)"}
    client = make_client(settings)
    tasks = [t if isinstance(t.get("data"), dict) else client.get_task(t["id"])
             for t in event.get("tasks") or [] if isinstance(t, dict) and "id" in t]
    for task in tasks:
        task.setdefault("predictions", [])
    job_id = f"auto-{project}-{uuid.uuid4().hex[:8]}"
    state = state_for(settings, redis)
    request = PrelabelRequest(project=project)
    the_plan = start_run(settings, request, client, state, job_id, redis=redis, tasks=tasks, queue=False)
    run_inline(settings, the_plan, job_id, state, client, request.chunk_size, redis=redis)
    return state.get(job_id) or {"job_id": job_id}
