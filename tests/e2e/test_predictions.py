"""Label Studio drives our backend for real: Retrieve Predictions, interactive TextArea prompts, Basic auth, and
image downloads from LS with a Personal Access Token (queue mode: `backend serve` + `backend worker` on Redis)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from scripts.ls_harness import BackendServer, LabelStudioClient, LabelStudioError, Sample, make_samples
from tests.e2e.conftest import BASIC_AUTH, DEMO_MODEL, iou, regions_by_label

pytestmark = pytest.mark.e2e
QUALITY_BAR = 0.8  # IoU vs ground truth required of every predicted region when the demo model is good enough
MODEL_BAR = 0.85  # held-out cIoU (metrics.json) from which the demo model is held to QUALITY_BAR per region


def demo_model_quality() -> float | None:
    """The demo model's documented held-out cIoU (models/evf-demo/metrics.json), None without a demo model."""
    metrics = DEMO_MODEL / "metrics.json"
    return json.loads(metrics.read_text())["heldout"]["ciou"] if metrics.is_file() else None


@pytest.fixture(scope="module")
def direct_masks(checkpoint: Path, shapes: ShapesProject) -> dict[tuple[int, str], np.ndarray]:
    """(task, label) -> the mask the same checkpoint predicts in this process, without Label Studio or the backend."""
    import evf_sam

    predictor = evf_sam.EvfPredictor(evf_sam.load_model(checkpoint, device="cpu"))
    masks = {}
    for task, sample in shapes.samples.items():
        labels = [label for label, prompts in sample.prompts.items() for _ in prompts]
        prompts = [prompt for prompts in sample.prompts.values() for prompt in prompts]
        for label, prediction in zip(labels, predictor.predict(sample.image, prompts)):
            masks[(task, label)] = masks.get((task, label), False) | prediction.mask
    return masks


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
    assert len(by_task) == len(samples)
    connected = ls.connect_backend(project, backend.url, basic_auth=BASIC_AUTH)
    return ShapesProject(project, connected["id"], by_task)


def test_retrieve_predictions_stores_labelled_masks(ls: LabelStudioClient, shapes: ShapesProject,
                                                    backend: BackendServer,
                                                    direct_masks: dict[tuple[int, str], np.ndarray]) -> None:
    """Retrieve Predictions stores, per task, labelled brush masks equal to what the model predicts directly
    (image fetched from LS, RLE through LS's database); with a good demo model, each task's regions carry exactly its
    prompts' labels and each overlaps its ground truth with IoU >= QUALITY_BAR."""
    answer = ls.retrieve_predictions(shapes.project)
    assert answer["processed_items"] == len(shapes.samples)

    versions, regions, ious = set(), 0, {}
    labelled = {}  # task -> (predicted labels, prompted labels)
    for task, sample in shapes.samples.items():
        [prediction] = ls.predictions(task)
        versions.add(prediction["model_version"])
        masks = regions_by_label(prediction["result"], Image.open(sample.image).size)
        assert set(masks) <= set(sample.masks)  # every region carries its prompt's label
        labelled[task] = (sorted(masks), sorted(sample.masks))
        regions += len(masks)
        for label, truth in sample.masks.items():
            mask = masks.get(label, np.zeros_like(truth))
            assert iou(mask, direct_masks[(task, label)]) >= 0.98, (task, label)
            ious[(task, label)] = round(iou(mask, truth), 3)
    assert len(versions) == 1 and regions > 0
    assert "empty prediction" not in backend.log_tail(100_000), "a task failed (e.g. its image could not be fetched)"

    measured = f"IoU vs ground truth per (task, label) {ious} (mean {np.mean(list(ious.values())):.3f})"
    quality = demo_model_quality()
    if quality is None:
        pytest.skip(f"masks equal the direct predictions; {measured}; the IoU >= {QUALITY_BAR} check needs the "
                    "trained demo model (models/evf-demo is absent: a tiny random checkpoint ran)")
    if quality < MODEL_BAR:
        pytest.skip(f"masks equal the direct predictions; {measured}; the per-region IoU >= {QUALITY_BAR} check is "
                    f"off while models/evf-demo's held-out cIoU is below {MODEL_BAR} ({quality:.3f}, metrics.json)")
    assert all(predicted == prompted for predicted, prompted in labelled.values()), labelled
    assert min(ious.values()) >= QUALITY_BAR, measured


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
