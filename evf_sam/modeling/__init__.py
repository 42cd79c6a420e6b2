"""EVF model modules: BEiT-3 (`beit3`), shared pieces (`common`), EvfSamModel (`evf_sam`), EvfSam2Model (`evf_sam2`)."""

from evf_sam.modeling.common import EvfPreTrainedModel, ImageFeatures

__all__ = ["EvfPreTrainedModel", "ImageFeatures"]
