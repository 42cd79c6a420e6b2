"""Training on resident tensors lowers the loss and leaves a model that still predicts."""

from __future__ import annotations

import pytest
import torch

from evf_sam.data.resident import build_synthetic
from evf_sam.train_resident import ResidentRecipe, grid_targets, train_resident


def test_a_short_resident_run_lowers_the_loss_and_validates(tiny_checkpoint):
    import evf_sam

    model = evf_sam.load_model(tiny_checkpoint("sam"))
    data = build_synthetic(3, "train", 4, model.sam_image_size, model.beit_image_size, workers=1, progress=False)
    recipe = ResidentRecipe(steps=30, batch_size=8, lr=2e-3, warmup=3, seed=1, prompt_grid_weight=0.5)
    calls = []
    history = train_resident(model, data, recipe, validate=lambda m: calls.append(m.training) or {"ciou": 0.5},
                             val_every=15, log_every=5, progress=False)
    losses = [entry["loss"] for entry in history.train]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert {"bce", "dice", "iou_mse", "aux", "aux_iou", "prompt_grid", "prompt_grid_iou"} <= set(history.train[-1])
    assert [v["step"] for v in history.val] == [15, 30] and calls == [False, False]
    assert not model.training


def test_grounding_only_trains_beit3_and_leaves_sam_untouched(tiny_checkpoint):
    import evf_sam

    model = evf_sam.load_model(tiny_checkpoint("sam"))
    data = build_synthetic(3, "train", 4, model.sam_image_size, model.beit_image_size, workers=1, progress=False)
    sam_before = {k: v.clone() for k, v in model.visual_model.state_dict().items()}
    beit_before = model.mm_extractor.beit3.text_embed.weight.clone()
    recipe = ResidentRecipe(steps=20, batch_size=8, lr=2e-3, warmup=2, seed=1, grounding_only=True,
                            prompt_grid_weight=1.0)
    history = train_resident(model, data, recipe, log_every=5, progress=False)
    assert "bce" not in history.train[-1] and history.train[-1]["loss"] < history.train[0]["loss"]
    assert all(torch.equal(v, model.visual_model.state_dict()[k]) for k, v in sam_before.items())
    assert not torch.equal(beit_before, model.mm_extractor.beit3.text_embed.weight)


def test_the_curriculum_samples_only_its_kinds_first(tiny_checkpoint, monkeypatch):
    import evf_sam
    from evf_sam import train_resident as module

    model = evf_sam.load_model(tiny_checkpoint("sam"))
    data = build_synthetic(3, "train", 6, model.sam_image_size, model.beit_image_size, workers=1, progress=False)
    seen = []
    real = module.step_losses
    monkeypatch.setattr(module, "step_losses", lambda m, d, i, a, rows, *rest: seen.append(rows.tolist())
                        or real(m, d, i, a, rows, *rest))
    recipe = ResidentRecipe(steps=6, batch_size=8, lr=1e-3, warmup=1, curriculum=0.5,
                            curriculum_kinds=("attribute",), aux_weight=0)
    train_resident(model, data, recipe, progress=False)
    early = {data.kinds[r] for rows in seen[:3] for r in rows}
    assert early == {"attribute"} and len(seen) == 6
    with pytest.raises(ValueError, match="curriculum kinds"):
        train_resident(model, data, ResidentRecipe(steps=1, curriculum=0.5, curriculum_kinds=("nothing",)),
                       progress=False)


def test_grid_targets_average_the_mask_over_the_stretched_image():
    data = build_synthetic(3, "train", 2, 64, 32, workers=1, progress=False)
    rows = torch.arange(len(data))
    images = data.image_of.long()
    grid = grid_targets(data, rows, images, 4)
    assert grid.shape == (len(data), 4, 4) and grid.min() >= 0 and grid.max() <= 1
    coverage = data.mask_targets(rows).flatten(1).sum(1) / (data.shapes[images, 0] * data.shapes[images, 1]).float()
    assert torch.allclose(grid.flatten(1).mean(1), coverage, atol=0.05)


def test_a_time_filled_run_decays_the_learning_rate_by_elapsed_time(tiny_checkpoint):
    import evf_sam

    model = evf_sam.load_model(tiny_checkpoint("sam"))
    data = build_synthetic(3, "train", 4, model.sam_image_size, model.beit_image_size, workers=1, progress=False)
    recipe = ResidentRecipe(steps=0, batch_size=4, lr=1e-3, warmup=1, aux_weight=0, min_lr_ratio=0.1)
    history = train_resident(model, data, recipe, time_limit_s=6.0, log_every=1, progress=False)
    assert history.train[-1]["elapsed_s"] >= 6.0 and len(history.train) >= 2
    assert history.train[0]["lr"] == 1e-3 and 1e-4 <= history.train[-1]["lr"] < 1e-3
    with pytest.raises(ValueError, match="time_limit_s"):
        train_resident(model, data, recipe, progress=False)
