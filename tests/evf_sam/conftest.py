"""Shared fixtures for the evf_sam tests: tiny random checkpoints (written once per session) and loaded models."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

TinyCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """`tiny_checkpoint(family="sam", multitask=False, seed=0)` -> directory of a tiny checkpoint (made once)."""
    from evf_sam.testing import make_tiny_checkpoint

    made: dict[tuple[str, bool, int], Path] = {}

    def get(family: str = "sam", multitask: bool = False, seed: int = 0) -> Path:
        key = (family, multitask, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}{'-multitask' if multitask else ''}-{seed}")
            made[key] = make_tiny_checkpoint(out, family=family, seed=seed, multitask=multitask)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: TinyCheckpoint) -> Callable[..., object]:
    """`tiny_model(family="sam", multitask=False, dtype="fp32")` -> a loaded tiny model on the CPU (cached)."""
    import evf_sam

    loaded: dict[tuple[str, bool, str], object] = {}

    def get(family: str = "sam", multitask: bool = False, dtype: str = "fp32") -> object:
        key = (family, multitask, dtype)
        if key not in loaded:
            loaded[key] = evf_sam.load_model(tiny_checkpoint(family, multitask), dtype=dtype)
        return loaded[key]

    return get


def shapes_image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A small uint8 RGB test picture: a noisy gradient with a red disc and a blue rectangle."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 200 // max(width, 1), ys * 200 // max(height, 1), np.full_like(xs, 90)], axis=-1)
    image = image + rng.integers(0, 40, size=image.shape)
    disc = (ys - height * 0.4) ** 2 + (xs - width * 0.3) ** 2 < (min(height, width) * 0.2) ** 2
    image[disc] = (220, 30, 30)
    image[int(height * 0.55):int(height * 0.9), int(width * 0.6):int(width * 0.9)] = (30, 40, 210)
    return np.clip(image, 0, 255).astype(np.uint8)
