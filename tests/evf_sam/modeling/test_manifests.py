"""Full-size models have exactly the official state-dict keys and shapes.

Built with parameters on the meta device (as `load_model` does), so no weights are allocated. Hiera's constructor
calls `.item()` on a tensor, so `accelerate.init_empty_weights` is used instead of a `torch.device("meta")` context.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from evf_sam.config import EvfConfig
from evf_sam.loading import checkpoint_state_dict
from evf_sam.modeling.evf_sam import EvfSamModel
from evf_sam.modeling.evf_sam2 import EvfSam2Model

MANIFESTS = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference" / "checkpoint_keys"
OFFICIAL = {
    "evf_sam.tsv": (EvfSamModel, {"architectures": ["EvfSamModel"], "hidden_size": 1024, "out_dim": 256,
                                  "mm_extractor_scale": "large", "sam_scale": "huge"}, 1569, 1_315_105_328),
    "evf_sam2.tsv": (EvfSam2Model, {"architectures": ["EvfSam2Model"], "hidden_size": 1024, "out_dim": 256,
                                    "mm_extractor_scale": "large", "sam_scale": "large"}, 1875, 898_444_850),
}


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    path = MANIFESTS / name
    if not path.is_file():
        pytest.skip(f"reference manifest {path} is absent (it lives outside the repository, in ../shared/reference)")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: tuple(ast.literal_eval(shape)) for key, shape in rows}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_full_size_model_matches_official_manifest(name: str) -> None:
    cls, values, entries, total = OFFICIAL[name]
    expected = _manifest(name)
    with init_empty_weights(include_buffers=False):
        model = cls(EvfConfig(**values))
    ours = {key: tuple(t.shape) for key, t in checkpoint_state_dict(model).items()}
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert len(ours) == entries
    assert sum(t.numel() for t in checkpoint_state_dict(model).values()) == total
    assert sum(p.numel() for p in model.mm_extractor.parameters()) == 672_702_464
