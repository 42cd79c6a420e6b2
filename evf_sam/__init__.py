"""EVF-SAM and EVF-SAM2: text-prompted segmentation that loads the official Hugging Face checkpoints.

Public API (imported lazily so that `evf_sam.data` and friends stay light):
`EvfConfig`, `EvfSamModel`, `EvfSam2Model`, `EvfPredictor`, `Prediction`, `load_model`.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "EvfConfig": "evf_sam.config",
    "EvfSamModel": "evf_sam.modeling.evf_sam",
    "EvfSam2Model": "evf_sam.modeling.evf_sam2",
    "EvfPredictor": "evf_sam.predictor",
    "Prediction": "evf_sam.predictor",
    "load_model": "evf_sam.loading",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'evf_sam' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
