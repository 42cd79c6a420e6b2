"""Training from corrections with a tiny checkpoint on CPU: held-out slice, before/after numbers, promotion rules,
and the fine-tuning recipe from the settings (CORRECTIONS_TRAIN_*) with per-run overrides."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from typing import get_args

from pydantic import ValidationError

from backend.corrections.train import (TrainingBusy, _training_lock, active_checkpoint, active_key, decisions,
                                       in_holdout, promoted_checkpoint, recipe, snapshot, train_from_corrections)
from backend.errors import BadRequest
from backend.settings import Settings, TrainablePart
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


def test_the_recipe_comes_from_the_settings_and_runs_override_it(tmp_path) -> None:
    from evf_sam.train import PARTS

    assert get_args(TrainablePart) == PARTS
    base = Settings(corrections_train_epochs=3, corrections_train_lr=2e-4, corrections_train_batch_size=4,
                    corrections_train_warmup=0.25, corrections_train_parts="beit3, projector",
                    corrections_holdout=0.3, corrections_min_records=5)
    plan = recipe(base)
    assert (plan.epochs, plan.lr, plan.batch_size, plan.warmup, plan.parts, plan.holdout, plan.min_records) == (
        3, 2e-4, 4, 0.25, ["beit3", "projector"], 0.3, 5)
    assert plan.total_steps(10) == 9 and plan.warmup_steps(9) == 2  # 3 epochs x ceil(10 / 4) batches
    assert recipe(base, steps=7).total_steps(10) == 7  # a step count alone replaces the epochs
    assert recipe(base, lr=None, parts="mask_decoder").parts == ["mask_decoder"]
    assert recipe(Settings()).model_dump() == {"steps": 200, "epochs": 0, "lr": 1e-4, "batch_size": 8,
                                               "warmup": 0.1, "parts": [], "holdout": 0.2, "min_records": 8}


@pytest.mark.parametrize(("override", "field"), [({"lr": -1}, "lr"), ({"steps": 0}, "steps"),
                                                 ({"warmup": 0.9}, "warmup"), ({"parts": "beit4"}, "parts"),
                                                 ({"batch_size": "eight"}, "batch_size"), ({"holdout": 1}, "holdout")])
def test_bad_recipe_values_are_clear_errors(override, field) -> None:
    with pytest.raises(BadRequest) as raised:
        recipe(Settings(), **override)
    assert raised.value.field == field and field in raised.value.message


@pytest.mark.parametrize(("name", "value"), [("CORRECTIONS_TRAIN_LR", "0"), ("CORRECTIONS_TRAIN_PARTS", "decoder"),
                                             ("CORRECTIONS_TRAIN_EPOCHS", "-1"), ("CORRECTIONS_HOLDOUT", "1.5")])
def test_bad_recipe_settings_name_the_variable(monkeypatch, name, value) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_a_run_trains_with_the_settings_recipe(settings) -> None:
    corrections(settings.corrections_dir)
    settings = settings.model_copy(update={"corrections_train_epochs": 1, "corrections_train_batch_size": 2,
                                           "corrections_train_parts": ["mask_decoder"],
                                           "corrections_holdout": HOLDOUT, "corrections_min_records": 4})
    decision = train_from_corrections(settings)
    train_records = decision["records"]["train"]
    assert decision["steps"] == -(-train_records // 2)
    assert decision["recipe"] == {"steps": 200, "epochs": 1, "lr": 1e-4, "batch_size": 2, "warmup": 0.1,
                                  "parts": ["mask_decoder"], "holdout": HOLDOUT, "min_records": 4}


def test_cli_rejects_a_bad_recipe_value_without_a_traceback(tmp_path, base_env) -> None:
    import subprocess
    import sys

    from tests.backend.conftest import REPO

    corrections(tmp_path / "c", images=2)
    result = subprocess.run([sys.executable, "-m", "backend", "corrections", "train", "--dir", str(tmp_path / "c"),
                             "--lr", "-0.1"], cwd=REPO, env={**base_env, "CHECKPOINTS_DIR": str(tmp_path / "k")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "training lr: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "k" / "runs").exists()


def test_start_training_checks_the_projects_recipe_overrides_before_queueing(monkeypatch) -> None:
    from backend.corrections import train as training

    monkeypatch.setattr(training, "get_settings", lambda: Settings())
    with pytest.raises(BadRequest) as raised:
        training.on_start_training({"action": "START_TRAINING", "extra_params": {"train_lr": "fast"}})
    assert raised.value.field == "lr"
