"""Bulk pre-labelling against a real Label Studio: `python -m backend prelabel --project P` over 200 tasks (local
files and uploads) plans through the LS API, queues chunks for two RQ workers, writes predictions back with the PAT,
and a second run finds nothing to do."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from scripts.ls_harness import REPO, BackendServer, LabelStudioClient, Sample, make_samples, stop_process_group
from tests.backend.conftest import RedisDB
from tests.e2e.conftest import Worker, regions_by_label

pytestmark = pytest.mark.e2e
TASKS = 200
UPLOADS = 20  # imported as file uploads (one request; each then needs a PATCH for its prompt); the rest local files


@dataclass
class BulkProject:
    project: int
    samples: dict[int, Sample]  # task id -> sample
    first_run: str  # the first prelabel run's output


def prelabel(env: dict[str, str], project: int) -> str:
    """`python -m backend prelabel --project P` (waits for the workers); returns its output."""
    result = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project),
                             "--chunk-size", "10"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def import_samples(ls: LabelStudioClient, project: int, samples: list[Sample], document_root: Path,
                   folder: str) -> dict[int, Sample]:
    """The first UPLOADS samples as uploaded files (their prompts PATCHed in), the rest as local-files tasks."""
    uploads, local = samples[:UPLOADS], samples[UPLOADS:]
    ls.add_local_storage(project, document_root / folder / "images")
    by_task = dict(zip(ls.import_tasks(project, [
        {"data": {"image": f"/data/local-files/?d={folder}/images/{sample.image.name}", "prompt": sample.prompts}}
        for sample in local]), local))
    uploaded = set(ls.upload_images(project, [sample.image for sample in uploads]))
    for task in ls.tasks(project):
        if task["id"] in uploaded:
            data = task["data"]
            assert data["image"].startswith(f"/data/upload/{project}/")
            [sample] = [sample for sample in uploads if data["image"].endswith(sample.image.name)]
            ls.call("PATCH", f"/api/tasks/{task['id']}", json={"data": {**data, "prompt": sample.prompts}})
            by_task[task["id"]] = sample
    return by_task


@pytest.fixture(scope="module")
def second_worker(backend_env: dict[str, str], redis_db: RedisDB, backend_worker: subprocess.Popen,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """Another `python -m backend worker` on the same queues, so the bulk run is shared between two processes
    (spawned here, awaited by `bulk` once the tasks are imported: it loads the model meanwhile)."""
    worker = Worker.spawn(backend_env, f"e2e-{redis_db.run_id}-bulk",
                          tmp_path_factory.mktemp("worker-bulk") / "worker.log")
    yield worker
    stop_process_group(worker.process)


@pytest.fixture(scope="module")
def bulk(ls: LabelStudioClient, label_config: str, document_root: Path, backend_env: dict[str, str],
         redis_db: RedisDB, backend_worker: subprocess.Popen, second_worker: Worker) -> BulkProject:
    """A project of TASKS small synthetic images, pre-labelled once with the CLI by two workers."""
    samples = make_samples(document_root / "bulk", count=TASKS + 10, seed=7, min_side=96, max_side=160)[:TASKS]
    assert len(samples) == TASKS
    project = ls.create_project("bulk prelabel e2e", label_config)["id"]
    by_task = import_samples(ls, project, samples, document_root, "bulk")
    assert len(by_task) == TASKS
    second_worker.wait_registered(redis_db)
    return BulkProject(project, by_task, prelabel(backend_env, project))


def current_model_version(backend: BackendServer, project: int, label_config: str) -> str:
    """What the backend answers LS's `POST /setup` for the project: the model_version of its predictions now."""
    response = httpx.post(f"{backend.url}/setup", json={"project": str(project), "schema": label_config},
                          auth=backend.auth, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_every_task_gets_one_prediction_of_the_current_model_version(
        ls: LabelStudioClient, bulk: BulkProject, backend: BackendServer, label_config: str) -> None:
    version = current_model_version(backend, bulk.project, label_config)
    assert f"model_version {version}: {TASKS} task(s) listed, 0 already predicted, {TASKS} to predict" \
        in bulk.first_run
    assert f"done {TASKS}, failed 0, skipped 0" in bulk.first_run

    tasks = ls.tasks(bulk.project)
    assert sorted(task["id"] for task in tasks) == sorted(bulk.samples)
    regions = 0
    for task in tasks:
        [prediction] = task["predictions"]
        assert prediction["model_version"] == version, task["id"]
        sample = bulk.samples[task["id"]]
        masks = regions_by_label(prediction["result"], Image.open(sample.image).size)  # decodes to the image size
        assert set(masks) <= set(sample.masks), task["id"]  # every region carries its prompt's label
        regions += len(masks)
    assert regions > 0
    assert len(ls.call("GET", "/api/predictions", params={"project": bulk.project})) == TASKS


def test_rerun_adds_no_prediction(ls: LabelStudioClient, bulk: BulkProject, backend_env: dict[str, str]) -> None:
    output = prelabel(backend_env, bulk.project)
    assert f"{TASKS} task(s) listed, {TASKS} already predicted, 0 to predict" in output
    assert "done 0, failed 0, skipped 0" in output
    assert sorted(len(task["predictions"]) for task in ls.tasks(bulk.project)) == [1] * TASKS
