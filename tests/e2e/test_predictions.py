"""Label Studio drives our backend for real: Retrieve Predictions, interactive TextArea prompts, Basic auth, and
image downloads from LS with a Personal Access Token (queue mode: `backend serve` + `backend worker` on Redis)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from scripts.ls_harness import BackendServer, LabelStudioClient, LabelStudioError, Sample, make_samples
from tests.e2e.conftest import BASIC_AUTH, DEMO_MODEL, iou, regions_by_label

pytestmark = pytest.mark.e2e
NEEDS_DEMO_MODEL = "IoU needs the trained demo model (models/evf-demo is absent: running a tiny random checkpoint)"


@dataclass
class ShapesProject:
    project: int
    backend: int  # LS's id of the connected ML backend
    samples: dict[int, Sample]  # task id -> sample


@pytest.fixture(scope="module")
def shapes(ls: LabelStudioClient, label_config: str, document_root: Path, backend: BackendServer) -> ShapesProject:
    """A project with 6 synthetic images (3 local-files tasks, 3 uploads), each prompting for one labelled shape;
    the backend connected with Basic auth and as interactive."""
    samples = make_samples(document_root / "shapes", count=6)
    project = ls.create_project("shapes e2e", label_config)["id"]
    ls.add_local_storage(project, document_root / "shapes" / "images")
    local = ls.import_tasks(project, [
        {"data": {"image": f"/data/local-files/?d=shapes/images/{sample.image.name}", "prompt": sample.prompts}}
        for sample in samples[:3]])
    by_task = dict(zip(local, samples[:3]))
    for task in ls.upload_images(project, [sample.image for sample in samples[3:]]):
        data = ls.task(task)["data"]
        assert data["image"].startswith(f"/data/upload/{project}/")
        [sample] = [sample for sample in samples[3:] if data["image"].endswith(sample.image.name)]
        ls.call("PATCH", f"/api/tasks/{task}", json={"data": {**data, "prompt": sample.prompts}})
        by_task[task] = sample
    connected = ls.connect_backend(project, backend.url, basic_auth=BASIC_AUTH)
    return ShapesProject(project, connected["id"], by_task)


def test_retrieve_predictions_stores_labelled_masks(ls: LabelStudioClient, shapes: ShapesProject,
                                                    backend: BackendServer) -> None:
    answer = ls.retrieve_predictions(shapes.project)
    assert answer["processed_items"] == len(shapes.samples)

    versions, regions, ious = set(), 0, []
    for task, sample in shapes.samples.items():
        [prediction] = ls.predictions(task)
        versions.add(prediction["model_version"])
        masks = regions_by_label(prediction["result"], Image.open(sample.image).size)
        assert set(masks) <= set(sample.masks)  # every region carries its prompt's label
        regions += len(masks)
        ious += [iou(masks.get(label, np.zeros_like(truth)), truth) for label, truth in sample.masks.items()]
    assert len(versions) == 1 and regions > 0
    assert "empty prediction" not in backend.log_tail(100_000), "a task failed (e.g. its image could not be fetched)"
    if not DEMO_MODEL.is_dir():
        pytest.skip(f"labels and mask sizes checked; {NEEDS_DEMO_MODEL}")
    assert np.mean(ious) >= 0.8, f"mean IoU {np.mean(ious):.3f} over {len(ious)} prompts: {np.round(ious, 3)}"


def test_retrieving_again_predicts_nothing_new(ls: LabelStudioClient, shapes: ShapesProject) -> None:
    ls.retrieve_predictions(shapes.project)
    before = {task: len(ls.predictions(task)) for task in shapes.samples}
    ls.retrieve_predictions(shapes.project)
    assert {task: len(ls.predictions(task)) for task in shapes.samples} == before


def test_interactive_textarea_prompt(ls: LabelStudioClient, shapes: ShapesProject) -> None:
    """A prompt typed into the TextArea gives the same mask as the same prompt in a batch, and is not stored."""
    task, sample = next(iter(shapes.samples.items()))
    ls.retrieve_predictions(shapes.project, [task])
    [prediction] = ls.predictions(task)
    size = Image.open(sample.image).size
    label, [prompt] = next(iter(sample.prompts.items()))
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": [f"{label}: {prompt}"]}}]}
    answer = ls.interactive(shapes.backend, task, context)
    assert "errors" not in answer, answer
    masks = regions_by_label(answer["data"]["result"], size)
    batch = regions_by_label(prediction["result"], size)
    assert set(masks) == set(batch) <= {label}  # "Label: text" picks the label
    if label in batch:
        assert iou(masks[label], batch[label]) >= 0.98
    assert ls.predictions(task) == [prediction]  # interactive answers go to the editor, not the database


def test_backend_requires_the_basic_auth_label_studio_sends(ls: LabelStudioClient, shapes: ShapesProject,
                                                            backend: BackendServer) -> None:
    assert httpx.get(f"{backend.url}/health").status_code == 401
    assert httpx.get(f"{backend.url}/health", auth=BASIC_AUTH).status_code == 200
    with pytest.raises(LabelStudioError):
        ls.connect_backend(shapes.project, backend.url, title="wrong password", basic_auth=(BASIC_AUTH[0], "nope"))
    [connected] = ls.backends(shapes.project)
    assert connected["auth_method"] == "BASIC_AUTH" and connected["state"] != "DI"
