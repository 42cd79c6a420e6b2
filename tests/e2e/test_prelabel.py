"""Bulk pre-labelling against a real Label Studio: `python -m backend prelabel --project P` plans through the LS API,
queues chunks for the RQ worker, writes predictions back with the PAT, and a second run finds nothing to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from scripts.ls_harness import REPO, LabelStudioClient, make_samples
from tests.e2e.conftest import regions_by_label

pytestmark = pytest.mark.e2e


def prelabel(env: dict[str, str], project: int) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project),
                             "--chunk-size", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_prelabel_cli_writes_predictions_once(ls: LabelStudioClient, label_config: str, document_root: Path,
                                              backend_env: dict[str, str], backend_worker: subprocess.Popen) -> None:
    samples = make_samples(document_root / "bulk", count=3, seed=7)
    project = ls.create_project("bulk prelabel e2e", label_config)["id"]
    ls.add_local_storage(project, document_root / "bulk" / "images")
    tasks = ls.import_tasks(project, [
        {"data": {"image": f"/data/local-files/?d=bulk/images/{sample.image.name}", "prompt": sample.prompts}}
        for sample in samples])

    prelabel(backend_env, project)
    versions = set()
    for task, sample in zip(tasks, samples):
        [prediction] = ls.predictions(task)
        versions.add(prediction["model_version"])
        masks = regions_by_label(prediction["result"], Image.open(sample.image).size)
        assert set(masks) <= set(sample.masks)
    assert len(versions) == 1

    prelabel(backend_env, project)
    assert [len(ls.predictions(task)) for task in tasks] == [1, 1, 1]
