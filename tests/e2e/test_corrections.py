"""Corrections from a real Label Studio: an annotator's brush annotation reaches the backend through the webhook LS
registered when the model was connected, and the worker records it (paired with the prediction it started from)
in CORRECTIONS_DIR; deleting the annotation removes its records."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import rle
from evf_sam.data.layout import Record, read_records
from scripts.ls_harness import BackendServer, LabelStudioClient, make_samples
from tests.e2e.conftest import BASIC_AUTH

pytestmark = pytest.mark.e2e


def wait_for(condition: Callable[[], list[Record]], what: str, timeout: float = 60.0) -> list[Record]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def records_of(corrections_dir: Path, annotation: int) -> list[Record]:
    if not (corrections_dir / "records.jsonl").is_file():
        return []
    return [record for record in read_records(corrections_dir) if record.annotation_id == annotation]


def test_annotation_is_captured_with_its_prediction(ls: LabelStudioClient, label_config: str, document_root: Path,
                                                    backend: BackendServer, corrections_dir: Path) -> None:
    [sample] = make_samples(document_root / "corrections", count=1, seed=11)
    project = ls.create_project("corrections e2e", label_config)["id"]
    ls.add_local_storage(project, document_root / "corrections" / "images")
    [task] = ls.import_tasks(project, [{"data": {
        "image": f"/data/local-files/?d=corrections/images/{sample.image.name}", "prompt": sample.prompts}}])
    ls.connect_backend(project, backend.url, basic_auth=BASIC_AUTH)
    ls.retrieve_predictions(project)
    [prediction] = ls.predictions(task)

    label, truth = next(iter(sample.masks.items()))
    width, height = Image.open(sample.image).size
    predicted = [r for r in prediction["result"] if r["value"]["brushlabels"] == [label]]
    # the annotator redraws the predicted region (same region id) as the ground truth
    region = {"id": predicted[0]["id"] if predicted else "redrawn-0001", "from_name": "tag", "to_name": "image",
              "type": "brushlabels", "original_width": width, "original_height": height, "image_rotation": 0,
              "value": {"format": "rle", "rle": rle.encode(truth), "brushlabels": [label]}}
    annotation = ls.call("POST", f"/api/tasks/{task}/annotations",
                         json={"result": [region], "lead_time": 3.0, "parent_prediction": prediction["id"]})

    [record] = wait_for(lambda: records_of(corrections_dir, annotation["id"]), "the correction record")
    assert (record.task_id, record.label, record.prompt) == (task, label, sample.prompts[label][0])
    corrected = np.asarray(Image.open(corrections_dir / record.mask)) > 127
    assert corrected.shape == (height, width) and (corrected == truth).all()
    if predicted:  # paired with the prediction it started from
        assert record.model_version == prediction["model_version"]
        assert record.predicted_mask and 0.0 <= record.iou <= 1.0
    else:
        assert record.extra["kind"] == "added"

    ls.call("DELETE", f"/api/annotations/{annotation['id']}")
    deadline = time.monotonic() + 60
    while records_of(corrections_dir, annotation["id"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert records_of(corrections_dir, annotation["id"]) == []
