"""Label Studio-shaped request bodies (reference label_studio.md §4), as LS 1.23 sends them."""

from __future__ import annotations

from typing import Any

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Object"/>
    <Label value="Cat"/>
  </BrushLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""

NO_BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="choice" toName="image"><Choice value="yes"/></Choices>
</View>"""

PROJECT = "7.1795508784"


def task(task_id: int, image_url: str, **data: Any) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": image_url, **data}, "meta": {}, "created_at": "2026-11-30T10:00:00Z",
            "updated_at": "2026-11-30T10:00:00Z", "is_labeled": False, "overlap": 1, "inner_id": task_id,
            "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0, "project": 7,
            "file_upload": None, "annotations": [], "predictions": []}


def setup_body(label_config: str = LABEL_CONFIG, extra_params: Any = None, project: str = PROJECT) -> dict[str, Any]:
    return {"project": project, "schema": label_config, "hostname": "http://127.0.0.1:8090",
            "access_token": "creator-legacy-token", "extra_params": extra_params}


def predict_body(tasks: list[dict[str, Any]], context: dict[str, Any] | None = None,
                 label_config: str = LABEL_CONFIG, project: str = PROJECT) -> dict[str, Any]:
    return {"tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": context}}


def textarea_context(text: str) -> dict[str, Any]:
    """What an interactive TextArea submit sends as params.context."""
    return {"annotation_id": None, "draft_id": 0, "user_id": 1,
            "result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": [text]}}]}
