"""Training losses on mask logits (the paper's recipe): BCE-with-logits + Dice."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over masks of 1 - (2 Σ p t + eps) / (Σ p + Σ t + eps), p = sigmoid(logits); [N,H,W] inputs."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    numerator = 2 * (prob * target).sum(1) + eps
    return (1 - numerator / (prob.sum(1) + target.sum(1) + eps)).mean()


def mask_losses(low_res: torch.Tensor, batch: dict[str, Any], sam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) of low-res logits [T,1,h,w] against the full-size masks, upsampled as at inference.

    Prompts are grouped by (original size, resize shape) so each group is upsampled in one call; each loss is the
    mean over prompts (BCE: mean over pixels first).
    """
    from evf_sam.transforms import postprocess_logits

    groups: dict[tuple, list[int]] = {}
    for row, key in enumerate(zip(batch["original_size"], batch["resize_shape"])):
        groups.setdefault(key, []).append(row)
    bce = low_res.new_zeros(())
    dice = low_res.new_zeros(())
    for (size, resize), rows in groups.items():
        index = torch.tensor(rows, device=low_res.device)
        logits = postprocess_logits(low_res.index_select(0, index), size, sam_size, resize)
        target = torch.stack([batch["masks"][r] for r in rows]).to(logits.device, torch.float32)
        bce = bce + F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2)).sum()
        dice = dice + dice_loss(logits, target) * len(rows)
    count = low_res.shape[0]
    return bce / count, dice / count
