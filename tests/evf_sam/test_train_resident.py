"""Training on resident tensors lowers the loss and leaves a model that still predicts."""

from __future__ import annotations

import torch

from evf_sam.data.resident import build_synthetic
from evf_sam.train_resident import ResidentRecipe, grid_targets, train_resident


def test_a_short_resident_run_lowers_the_loss_and_validates(tiny_checkpoint):
    import evf_sam

    model = evf_sam.load_model(tiny_checkpoint("sam"))
    data = build_synthetic(3, "train", 4, model.sam_image_size, model.beit_image_size, workers=1, progress=False)
    recipe = ResidentRecipe(steps=30, batch_size=8, lr=2e-3, warmup=3, seed=1)
    calls = []
    history = train_resident(model, data, recipe, validate=lambda m: calls.append(m.training) or {"ciou": 0.5},
                             val_every=15, log_every=5, progress=False)
    losses = [entry["loss"] for entry in history.train]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert {"bce", "dice", "iou_mse", "aux"} <= set(history.train[-1])
    assert [v["step"] for v in history.val] == [15, 30] and calls == [False, False]
    assert not model.training
    hooks = model.mm_extractor.beit3.encoder.layers[-2]._forward_hooks
    assert not hooks  # the auxiliary head is detached after training


def test_grid_targets_average_the_mask_over_the_stretched_image():
    data = build_synthetic(3, "train", 2, 64, 32, workers=1, progress=False)
    rows = torch.arange(len(data))
    images = data.image_of.long()
    grid = grid_targets(data, rows, images, 4)
    assert grid.shape == (len(data), 4, 4) and grid.min() >= 0 and grid.max() <= 1
    coverage = data.mask_targets(rows).flatten(1).sum(1) / (data.shapes[images, 0] * data.shapes[images, 1]).float()
    assert torch.allclose(grid.flatten(1).mean(1), coverage, atol=0.05)
