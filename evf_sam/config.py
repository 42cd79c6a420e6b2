"""`EvfConfig`: the configuration of EVF-SAM / EVF-SAM2 checkpoints.

Reads the official `config.json` files unchanged (`hidden_size`, `out_dim`, `mm_extractor_scale`, `sam_scale`,
`architectures`, ...). Small models, which official checkpoints never are, add optional dictionaries that override the
named presets: `beit3_config` (BEiT-3 dimensions) and `sam_config` (SAM-1 ViT or SAM-2 Hiera dimensions).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

BEIT3_PRESETS: dict[str, dict[str, int]] = {
    "base": {"embed_dim": 768, "layers": 12, "heads": 12, "ffn_dim": 3072},
    "large": {"embed_dim": 1024, "layers": 24, "heads": 16, "ffn_dim": 4096},
}
BEIT3_COMMON: dict[str, int] = {"vocab_size": 64010, "img_size": 224, "patch_size": 16, "max_text_positions": 1024}

SAM_PRESETS: dict[str, dict[str, Any]] = {
    "huge": {"image_size": 1024, "patch_size": 16, "embed_dim": 1280, "depth": 32, "num_heads": 16,
             "global_attn_indexes": [7, 15, 23, 31], "window_size": 14, "prompt_dim": 256,
             "decoder_mlp_dim": 2048, "decoder_heads": 8, "iou_head_hidden_dim": 256},
}
# SAM-2 presets are the SAM 2.0 hydra configs shipped with the `sam2` package; `sam_config` keys override them.
SAM2_PRESETS: dict[str, str] = {"large": "configs/sam2/sam2_hiera_l.yaml", "tiny": "configs/sam2/sam2_hiera_t.yaml"}
SAM2_GENERATIONS = ("legacy", "head")
FAMILY_BY_ARCHITECTURE = {"EvfSamModel": "sam", "EvfSam2Model": "sam2"}


class EvfConfig(PretrainedConfig):
    """Configuration of an EVF model; `family` ("sam" | "sam2") picks the model class.

    `sam2_generation` ("legacy" | "head" | None) overrides the SAM-2 multimask policy; None means "decided by the
    tokenizer": a tokenizer that knows "[semantic]" (the -multitask checkpoints) gets "head", others "legacy".
    """

    model_type = "evf"

    def __init__(self, hidden_size: int = 768, out_dim: int = 256, pad_token_id: int = 1, bos_token_id: int = 0,
                 eos_token_id: int = 2, tie_word_embeddings: bool = False, **kwargs: Any) -> None:
        self.hidden_size = hidden_size
        self.out_dim = out_dim
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def family(self) -> str:
        """"sam" (SAM-1 ViT) or "sam2" (SAM-2 Hiera), from `architectures`, else from `sam_scale`."""
        architectures = self.architectures or []
        for name in architectures:
            if name in FAMILY_BY_ARCHITECTURE:
                return FAMILY_BY_ARCHITECTURE[name]
        if architectures:
            raise ValueError(f"unsupported architectures {architectures!r}; supported: {sorted(FAMILY_BY_ARCHITECTURE)}")
        scale = getattr(self, "sam_scale", None)
        if scale in SAM_PRESETS:
            return "sam"
        if scale in SAM2_PRESETS:
            return "sam2"
        raise ValueError(f"cannot tell the model family: architectures={self.architectures!r}, sam_scale={scale!r}; "
                         f"expected architectures EvfSamModel/EvfSam2Model or sam_scale in "
                         f"{sorted(SAM_PRESETS) + sorted(SAM2_PRESETS)}")

    def beit3_dims(self) -> dict[str, int]:
        """BEiT-3 dimensions: the `mm_extractor_scale` preset updated by `beit3_config`; checks `hidden_size`."""
        scale = getattr(self, "mm_extractor_scale", None) or "base"
        if scale not in BEIT3_PRESETS:
            raise ValueError(f"mm_extractor_scale must be one of {sorted(BEIT3_PRESETS)}, got {scale!r}")
        dims = {**BEIT3_PRESETS[scale], **BEIT3_COMMON, **(getattr(self, "beit3_config", None) or {})}
        if dims["embed_dim"] != self.hidden_size:
            raise ValueError(f"hidden_size ({self.hidden_size}) must equal the BEiT-3 embed_dim ({dims['embed_dim']})")
        return dims

    def sam_dims(self) -> dict[str, Any]:
        """SAM-1 ViT + decoder dimensions: the `sam_scale` preset updated by `sam_config`."""
        scale = getattr(self, "sam_scale", None) or "huge"
        if scale not in SAM_PRESETS:
            raise ValueError(f"sam_scale for EvfSamModel must be one of {sorted(SAM_PRESETS)}, got {scale!r}")
        return {**SAM_PRESETS[scale], **(getattr(self, "sam_config", None) or {})}

    def sam2_preset(self) -> tuple[str, dict[str, Any]]:
        """SAM-2 hydra config name for `sam_scale` and the `sam_config` overrides to apply to it."""
        scale = getattr(self, "sam_scale", None) or "large"
        if scale not in SAM2_PRESETS:
            raise ValueError(f"sam_scale for EvfSam2Model must be one of {sorted(SAM2_PRESETS)}, got {scale!r}")
        return SAM2_PRESETS[scale], dict(getattr(self, "sam_config", None) or {})

    def sam2_generation_override(self) -> str | None:
        """The explicit `sam2_generation` field, validated, or None."""
        generation = getattr(self, "sam2_generation", None)
        if generation is not None and generation not in SAM2_GENERATIONS:
            raise ValueError(f"sam2_generation must be one of {SAM2_GENERATIONS} or null, got {generation!r}")
        return generation
