"""The corrections loop end to end, as corrections arise in one project: the demo model pre-labels a project whose
images have their own look and whose prompts are its label names (`simulate_corrections_loop.py --scenario project`),
ground-truth masks come back as corrections, training from them with the settings' recipe promotes a model that is
clearly better on the project's held-out images, and the backend then serves it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from backend import jobs
from backend.corrections.train import decisions
from evf_sam.data import layout

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "models" / "evf-demo"
# Measured gains (docs/MODELS.md, "Training from corrections"): gIoU +0.12, cIoU +0.16 on 56 held-out pairs, the
# same with 1 and 2 threads; +0.12..+0.17 for data seeds 7 and 99. The margin is half the smallest gain.
MARGIN = 0.06


def _script():
    spec = importlib.util.spec_from_file_location("simulate_corrections_loop",
                                                  REPO / "scripts" / "simulate_corrections_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="the shipped demo model is missing")
def test_training_on_a_projects_corrections_promotes_a_clearly_better_model_that_is_then_served(tmp_path) -> None:
    result = _script().simulate(DEMO, tmp_path, scenario="project", images=60, seed=4242, holdout=0.4, epochs=6,
                                lr=3e-4, progress=False)
    capture, decision, settings = result["capture"], result["decision"], result["settings"]

    records = layout.read_records(settings.corrections_dir)
    assert len(records) == capture["records"] > 80
    assert {r.prompt for r in records} == {"bolt", "washer", "bracket"}
    assert all(r.predicted_mask and r.iou is not None and r.model_version == capture["model_version"]
               and r.extra["kind"] in ("accepted", "edited") for r in records)
    assert decision["recipe"]["epochs"] == 6 and decision["recipe"]["lr"] == 3e-4
    assert decision["steps"] == 6 * -(-decision["records"]["train"] // 8)
    assert decision["before"]["pairs"] == decision["after"]["pairs"] == decision["records"]["val"] >= 40

    before, after = decision["before"], decision["after"]
    assert after["giou"] >= before["giou"] + MARGIN, (before, after)
    assert after["ciou"] >= before["ciou"] + MARGIN, (before, after)
    assert decision["promoted"] and decisions(settings)["active"] == str(Path(decision["checkpoint"]).resolve())

    runtime = jobs.get_runtime(settings)
    assert Path(runtime.checkpoint).resolve() == Path(decision["checkpoint"]).resolve()
    assert runtime.fingerprint[:8] not in capture["model_version"]  # new weights, new model_version
