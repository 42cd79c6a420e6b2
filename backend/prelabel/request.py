"""The request of a pre-labelling run (`POST /jobs/prelabel`, `python -m backend prelabel`) and its validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.errors import BadRequest


@dataclass
class PrelabelRequest:
    """What to pre-label: a project, optional prompts for every task, an LS Data Manager filter or task ids."""

    project: int
    prompts: list[str] = field(default_factory=list)
    query: dict[str, Any] | None = None
    task_ids: list[int] | None = None
    chunk_size: int = 8

    @classmethod
    def from_json(cls, body: Any) -> PrelabelRequest:
        """Validate a `POST /jobs/prelabel` body (BadRequest naming the field)."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", field="body")
        project = body.get("project")
        if not isinstance(project, int) or isinstance(project, bool) or project < 1:
            raise BadRequest("project must be a positive integer (the Label Studio project id)", field="project")
        prompts = body.get("prompts") or []
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise BadRequest("prompts must be a list of non-empty strings", field="prompts")
        query = body.get("filter")
        if query is not None and not isinstance(query, dict):
            raise BadRequest('filter must be a Label Studio Data Manager query object {"filters": {...}}',
                             field="filter")
        task_ids = body.get("task_ids")
        if task_ids is not None and (not isinstance(task_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in task_ids)):
            raise BadRequest("task_ids must be a list of integers", field="task_ids")
        chunk_size = body.get("chunk_size", 8)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= 1000:
            raise BadRequest("chunk_size must be an integer from 1 to 1000", field="chunk_size")
        return cls(project, [p.strip() for p in prompts], query, task_ids, chunk_size)

    def to_json(self) -> dict[str, Any]:
        return {"project": self.project, "prompts": self.prompts, "filter": self.query, "task_ids": self.task_ids,
                "chunk_size": self.chunk_size}
