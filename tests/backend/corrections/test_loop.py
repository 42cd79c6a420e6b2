"""The corrections loop end to end at small scale: the demo model predicts synthetic expressions, ground-truth masks
come back as corrections, training from them promotes a model that is better on the held-out corrections, and the
backend then serves it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from backend import jobs
from backend.corrections.train import decisions
from evf_sam.data import layout

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "models" / "evf-demo"


def _script():
    spec = importlib.util.spec_from_file_location("simulate_corrections_loop",
                                                  REPO / "scripts" / "simulate_corrections_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="the shipped demo model is missing")
def test_training_on_simulated_corrections_promotes_a_better_model_that_is_then_served(tmp_path) -> None:
    result = _script().simulate(DEMO, tmp_path, images=10, seed=4242, steps=10, batch_size=8, holdout=0.3,
                                max_side=192, progress=False)
    capture, decision, settings = result["capture"], result["decision"], result["settings"]

    records = layout.read_records(settings.corrections_dir)
    assert len(records) == capture["records"] > 10
    assert all(r.predicted_mask and r.iou is not None and r.model_version == capture["model_version"]
               and r.extra["kind"] in ("accepted", "edited") for r in records)
    assert decision["records"]["val"] > 0 and decision["before"]["pairs"] == decision["after"]["pairs"] > 0

    assert decision["after"]["giou"] > decision["before"]["giou"]
    assert decision["after"]["ciou"] > decision["before"]["ciou"]
    assert decision["promoted"] and decisions(settings)["active"] == str(Path(decision["checkpoint"]).resolve())

    runtime = jobs.get_runtime(settings)
    assert Path(runtime.checkpoint).resolve() == Path(decision["checkpoint"]).resolve()
    assert runtime.fingerprint[:8] not in capture["model_version"]  # new weights, new model_version
