"""The shipped demo model (`models/evf-demo`): loads, fits the size budget, and is scored on fresh held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "models" / "evf-demo"
HELDOUT_SEED = 4242  # neither the training seeds (20261130 + k, 20262130 + k) nor the documented held-out seed 777
TARGET_CIOU = 0.85

pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(),
                                reason="models/evf-demo does not exist yet (made by scripts/train_demo.py)")


@pytest.fixture(scope="module")
def heldout_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from evf_sam.data.synthetic import generate_dataset
    from evf_sam.evaluate import evaluate

    root = tmp_path_factory.mktemp("demo-heldout")
    generate_dataset(root, 12, seed=HELDOUT_SEED, split="test", progress=False)
    return evaluate(DEMO, root, split="test", images_per_batch=4, progress=False)["splits"]["test"]


def test_demo_checkpoint_is_complete_and_small():
    import evf_sam

    assert (DEMO / "model.safetensors").stat().st_size <= 40 * 2**20
    model = evf_sam.load_model(DEMO)
    assert model.model_name == "evf-demo" and model.family == "sam" and not model.is_multitask
    documented = json.loads((DEMO / "metrics.json").read_text())["heldout"]
    assert documented["pairs"] >= 1000 and 0 < documented["ciou"] <= 1


def test_demo_model_keeps_its_documented_quality(heldout_result):
    """Regression guard: docs/MODELS.md reports cIoU 0.64 on 1200 held-out expressions; 48 fresh ones vary more."""
    assert heldout_result["pairs"] >= 40
    assert heldout_result["ciou"] >= 0.5


@pytest.mark.xfail(strict=True, reason="target not reached: the shipped demo model scores cIoU 0.64 on the held-out "
                                       "split (docs/MODELS.md)")
def test_demo_model_reaches_the_target(heldout_result):
    assert heldout_result["ciou"] >= TARGET_CIOU
