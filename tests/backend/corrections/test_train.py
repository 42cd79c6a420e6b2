"""Training from corrections with a tiny checkpoint on CPU: held-out slice, before/after numbers, promotion rules."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from backend.corrections.train import (TrainingBusy, _training_lock, active_checkpoint, active_key, decisions,
                                       in_holdout, promoted_checkpoint, snapshot, train_from_corrections)
from backend.errors import BadRequest
from backend.settings import Settings
from evf_sam.data import layout

HOLDOUT = 0.3


def corrections(root, images: int = 10) -> None:
    records = []
    rng = np.random.default_rng(0)
    for n in range(images):
        image = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), bool)
        mask[8 + n:30 + n, 10:40] = True
        image[mask] = (220, 40, 40)
        layout.save_image(root / f"images/h{n}.png", image)
        layout.save_mask(root / f"masks/{n}.png", mask)
        kind = "deleted" if n == 0 else "edited"
        records.append(layout.Record(image=f"images/h{n}.png", mask=f"masks/{n}.png", prompt="red square",
                                     label="Object", image_hash=f"h{n}", annotation_id=n, task_id=n,
                                     iou=0.5, extra={"kind": kind}))
    layout.write_records(root, records)


@pytest.fixture()
def settings(tmp_path, tiny_checkpoint) -> Settings:
    return Settings(evf_sam_checkpoint=str(tiny_checkpoint), evf_sam_device="cpu", corrections_dir=tmp_path / "c",
                    checkpoints_dir=tmp_path / "ckpt", redis_key_prefix=f"evf-{uuid.uuid4().hex[:6]}")


def test_held_out_slice_is_deterministic_by_image_and_skips_deleted_regions(tmp_path) -> None:
    corrections(tmp_path / "c")
    counts = snapshot(tmp_path / "c", tmp_path / "s1", HOLDOUT)
    assert snapshot(tmp_path / "c", tmp_path / "s2", HOLDOUT) == counts
    assert counts["train"] + counts["val"] == 9 and counts["train"] and counts["val"]
    records = layout.read_records(tmp_path / "s1")
    assert all(r.split == ("val" if in_holdout(r.image_hash, HOLDOUT) else "train") for r in records)
    assert layout.LayoutDataset(tmp_path / "s1", "val").load_mask(records[0]).any()


def test_train_evaluates_before_and_after_and_promotes_only_if_better(settings, redis_db) -> None:
    corrections(settings.corrections_dir)
    redis = redis_db.client()
    decision = train_from_corrections(settings, steps=2, holdout=HOLDOUT, min_records=4, batch_size=4, redis=redis)
    assert decision["base"] == settings.checkpoint and decision["steps"] == 2
    assert set(decision["before"]) == {"ciou", "giou", "pairs"} and decision["before"]["pairs"] > 0
    assert decision["promoted"] == (decision["after"]["giou"] > decision["before"]["giou"])
    log = decisions(settings)
    assert log["runs"] == [decision]
    assert json.loads((settings.checkpoints_dir / "training.json").read_text()) == log
    if decision["promoted"]:
        import evf_sam

        assert active_checkpoint(settings) == log["active"] == redis.get(active_key(settings)).decode()
        assert promoted_checkpoint(settings, redis) == promoted_checkpoint(settings) == log["active"]
        assert evf_sam.load_model(log["active"]).fingerprint  # loadable, new weights
    else:
        assert log["active"] is None and active_checkpoint(settings) == settings.checkpoint
        assert redis.get(active_key(settings)) is None and promoted_checkpoint(settings, redis) is None
    assert not (settings.checkpoints_dir / "runs").exists() or not any((settings.checkpoints_dir / "runs").iterdir())


def test_too_few_corrections_and_a_running_training_are_clear_errors(settings) -> None:
    corrections(settings.corrections_dir, images=3)
    with pytest.raises(BadRequest) as raised:
        train_from_corrections(settings, steps=1, min_records=8)
    assert raised.value.code == "not_enough_corrections" and "need 8" in raised.value.message
    with _training_lock(settings.checkpoints_dir), pytest.raises(TrainingBusy):
        train_from_corrections(settings, steps=1)


def test_cli_explains_when_there_is_too_little_to_train_on(tmp_path, base_env) -> None:
    import subprocess
    import sys

    from tests.backend.conftest import REPO

    corrections(tmp_path / "c", images=2)
    result = subprocess.run([sys.executable, "-m", "backend", "corrections", "train", "--dir", str(tmp_path / "c")],
                            cwd=REPO, env={**base_env, "CHECKPOINTS_DIR": str(tmp_path / "k")}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "not enough corrections to train" in result.stderr
    assert "Traceback" not in result.stderr
