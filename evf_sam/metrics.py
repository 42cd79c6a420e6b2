"""Referring-segmentation metrics as in the EVF-SAM evaluation (reference §10).

Per (image, expression) pair: intersection I and union U of the foreground.
- cIoU (overall IoU) = ΣI / ΣU over all pairs.
- gIoU (mean IoU)    = mean over pairs of I / U; a pair with an empty union (both masks empty) counts 1.0.
Both are fractions in [0, 1]. Inputs are boolean or integer masks (nonzero = foreground), numpy arrays or torch
tensors, one (H, W) pair or a batch (..., H, W). Float inputs are refused: threshold logits first (mask = logits > 0).
torch is never imported here, so the backend can use this module without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _check(x: Any, name: str) -> None:
    dtype = str(x.dtype)
    if "float" in dtype or "complex" in dtype:
        raise ValueError(f"{name} has dtype {dtype}; pass a boolean mask (threshold logits first: logits > 0)")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")


def intersection_union(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair foreground intersection and union pixel counts.

    pred, target: (..., H, W) masks of the same shape (numpy or torch; torch stays on its device until the
    reduction). Returns two int64 numpy arrays of shape `pred.shape[:-2]` (0-d for a single pair).
    """
    _check(pred, "pred")
    _check(target, "target")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if _is_torch(pred) or _is_torch(target):
        import torch

        p, t = torch.as_tensor(pred) != 0, torch.as_tensor(target) != 0
        p = p.to(t.device)
        inter = (p & t).sum(dim=(-2, -1)).cpu().numpy()
        union = (p | t).sum(dim=(-2, -1)).cpu().numpy()
    else:
        p, t = np.asarray(pred) != 0, np.asarray(target) != 0
        inter = np.count_nonzero(p & t, axis=(-2, -1))
        union = np.count_nonzero(p | t, axis=(-2, -1))
    return np.asarray(inter, dtype=np.int64), np.asarray(union, dtype=np.int64)


def pair_iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """I / U per pair as float64; 1.0 where the union is empty."""
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    return np.divide(intersection, union, out=np.ones_like(union), where=union > 0)


class IoUAccumulator:
    """Accumulates I and U over pairs; `ciou`, `giou` and `result()` read the totals so far."""

    def __init__(self) -> None:
        self.intersection = 0
        self.union = 0
        self.iou_sum = 0.0
        self.pairs = 0

    def update(self, pred: Any, target: Any) -> np.ndarray:
        """Add one pair or a batch of pairs (see `intersection_union`); returns their per-pair IoU."""
        inter, union = intersection_union(pred, target)
        return self.add(inter, union)

    def add(self, intersection: Any, union: Any) -> np.ndarray:
        """Add precomputed per-pair intersection/union counts; returns their per-pair IoU."""
        inter = np.atleast_1d(np.asarray(intersection, dtype=np.int64)).ravel()
        uni = np.atleast_1d(np.asarray(union, dtype=np.int64)).ravel()
        if inter.shape != uni.shape or np.any(inter > uni) or np.any(inter < 0):
            raise ValueError("intersection and union must have the same shape with 0 <= intersection <= union")
        iou = pair_iou(inter, uni)
        self.intersection += int(inter.sum())
        self.union += int(uni.sum())
        self.iou_sum += float(iou.sum())
        self.pairs += int(inter.size)
        return iou

    @property
    def ciou(self) -> float:
        """ΣI / ΣU (1.0 when every union so far was empty; NaN before any pair)."""
        if self.pairs == 0:
            return float("nan")
        return self.intersection / self.union if self.union else 1.0

    @property
    def giou(self) -> float:
        """Mean per-pair IoU (NaN before any pair)."""
        return self.iou_sum / self.pairs if self.pairs else float("nan")

    def result(self) -> dict[str, float | int]:
        """{"ciou", "giou", "pairs", "intersection", "union"}."""
        return {
            "ciou": self.ciou,
            "giou": self.giou,
            "pairs": self.pairs,
            "intersection": self.intersection,
            "union": self.union,
        }


class SplitMetrics:
    """One IoUAccumulator per split name (e.g. "refcoco|unc|val", "synthetic-val"), created on first use."""

    def __init__(self) -> None:
        self.splits: dict[str, IoUAccumulator] = {}

    def __getitem__(self, split: str) -> IoUAccumulator:
        return self.splits.setdefault(split, IoUAccumulator())

    def update(self, split: str, pred: Any, target: Any) -> np.ndarray:
        """Add pairs to `split`; returns their per-pair IoU."""
        return self[split].update(pred, target)

    def results(self) -> dict[str, dict[str, float | int]]:
        """{split: accumulator.result()} in insertion order."""
        return {name: acc.result() for name, acc in self.splits.items()}


def to_json(results: Mapping[str, Mapping[str, Any]], **extra: Any) -> str:
    """Render per-split results (plus any extra top-level keys, e.g. checkpoint) as indented JSON."""
    return json.dumps({**extra, "splits": dict(results)}, indent=2, sort_keys=False)


def to_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Render per-split results as a Markdown table (cIoU / gIoU in percent, two decimals)."""
    lines = ["| split | pairs | cIoU | gIoU |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        cell = str(name).replace("|", "\\|")  # split names like "refcoco|unc|val" contain pipes
        lines.append(f"| {cell} | {r['pairs']} | {100 * r['ciou']:.2f} | {100 * r['giou']:.2f} |")
    return "\n".join(lines) + "\n"
