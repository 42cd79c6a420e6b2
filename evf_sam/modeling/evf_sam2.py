"""EvfSam2Model: BEiT-3 prompt encoder + SAM 2.0 (Hiera) from the `sam2` package, image path only.

The whole `SAM2Base` (memory attention/encoder included) is built so that the official checkpoints load strictly;
only the image encoder, prompt encoder (dense parts) and mask decoder run.
"""

from __future__ import annotations

from typing import Any

import torch

from evf_sam.config import EvfConfig
from evf_sam.modeling.common import EvfPreTrainedModel, ImageFeatures

# What `sam2.build_sam.build_sam2(apply_postprocessing=True)` adds, and what the pre-9d00853 EVF path relied on.
STABILITY_OVERRIDES = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]
_TRUNK = "model.image_encoder.trunk"
_LAYER = "model.memory_attention.layer"


def _value(value: Any) -> str:
    return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, (list, tuple)) else str(value)


def hydra_overrides(dims: dict[str, Any]) -> list[str]:
    """Hydra overrides for a SAM-2 config with other dimensions (keys as in `evf_sam.testing.TINY_SAM2`)."""
    overrides: dict[str, Any] = {}
    for key in ("embed_dim", "num_heads", "stages", "global_att_blocks", "window_spec",
                "window_pos_embed_bkg_spatial_size"):
        if key in dims:
            overrides[f"{_TRUNK}.{key}"] = dims[key]
    if "embed_dim" in dims:
        overrides["model.image_encoder.neck.backbone_channel_list"] = [dims["embed_dim"] * 2 ** i for i in (3, 2, 1, 0)]
    if "image_size" in dims:
        overrides["model.image_size"] = dims["image_size"]
        grid = [dims["image_size"] // 16] * 2
        overrides[f"{_LAYER}.self_attention.feat_sizes"] = grid
        overrides[f"{_LAYER}.cross_attention.feat_sizes"] = grid
    if "d_model" in dims:
        d = dims["d_model"]
        for key in ("model.image_encoder.neck.d_model", "model.image_encoder.neck.position_encoding.num_pos_feats",
                    "model.memory_attention.d_model", f"{_LAYER}.d_model", f"{_LAYER}.self_attention.embedding_dim",
                    f"{_LAYER}.cross_attention.embedding_dim", "model.memory_encoder.in_dim",
                    "model.memory_encoder.mask_downsampler.embed_dim", "model.memory_encoder.fuser.layer.dim"):
            overrides[key] = d
    if "mem_dim" in dims:
        for key in ("model.memory_encoder.out_dim", "model.memory_encoder.position_encoding.num_pos_feats",
                    f"{_LAYER}.cross_attention.kv_in_dim"):
            overrides[key] = dims["mem_dim"]
    if "memory_attention_layers" in dims:
        overrides["model.memory_attention.num_layers"] = dims["memory_attention_layers"]
    if "memory_ffn_dim" in dims:
        overrides[f"{_LAYER}.dim_feedforward"] = dims["memory_ffn_dim"]
    return [f"++{key}={_value(value)}" for key, value in overrides.items()]


def build_sam2(config_name: str, dims: dict[str, Any]) -> torch.nn.Module:
    """SAM2Base from a `sam2` package config (SAM 2.0) with `dims` overrides, in eval mode, without weights."""
    import sam2  # noqa: F401 - registers the package's hydra config module
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name=config_name, overrides=STABILITY_OVERRIDES + hydra_overrides(dims))
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True).eval()


class EvfSam2Model(EvfPreTrainedModel):
    """EVF-SAM2: the projected visual [CLS] of BEiT-3 is the sparse prompt of SAM-2's mask decoder.

    `generation` selects the multimask policy of the checkpoint: "legacy" (evf-sam2: single mask with SAM-2's
    stability fallback) or "head" (-multitask: best predicted IoU among masks 1..3).
    """

    family = "sam2"
    fp32_buffers = ("visual_model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",)

    def __init__(self, config: EvfConfig) -> None:
        super().__init__(config)
        config_name, dims = config.sam2_preset()
        self.visual_model = build_sam2(config_name, dims)
        if self.visual_model.hidden_dim != config.out_dim:
            raise ValueError(f"out_dim ({config.out_dim}) must equal the SAM-2 hidden dim "
                             f"({self.visual_model.hidden_dim})")
        self.post_init()

    @property
    def sam_image_size(self) -> int:
        return self.visual_model.image_size

    @property
    def generation(self) -> str:
        """"legacy" or "head": the config's `sam2_generation`, else "head" exactly for multitask tokenizers."""
        return self.config.sam2_generation_override() or ("head" if self.is_multitask else "legacy")

    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Normalised SAM input [B,3,S,S] -> embeddings [B,C,S/16,S/16] (+ no_mem_embed) and the two skip maps."""
        self._check_sam_input(pixel_values)
        model = self.visual_model
        weight = model.image_encoder.trunk.patch_embed.proj.weight
        levels = model.forward_image(pixel_values.to(device=weight.device, dtype=weight.dtype))["backbone_fpn"]
        levels = levels[-model.num_feature_levels:]
        embeddings = levels[-1] + model.no_mem_embed.reshape(1, -1, 1, 1)
        return ImageFeatures(embeddings, tuple(levels[:-1]))

    def decode_masks(self, features: ImageFeatures, prompt_tokens: torch.Tensor,
                     image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt, chosen by `generation`: low-res logits [T,1,4h,4w] and predicted IoU [T], float32."""
        model = self.visual_model
        if image_index.numel() == 0:  # the sam2 decoder cannot reshape an empty batch
            h, w = features.embeddings.shape[-2:]
            return features.embeddings.new_zeros((0, 1, 4 * h, 4 * w), dtype=torch.float32), \
                features.embeddings.new_zeros(0, dtype=torch.float32)
        selected = features.select(image_index)
        image = selected.embeddings
        t, c, h, w = image.shape
        dtype = image.dtype
        prompt = model.sam_prompt_encoder
        dense = prompt.no_mask_embed.weight.to(dtype).reshape(1, c, 1, 1).expand(t, -1, h, w)
        pos = self.dense_positional_encoding(prompt.pe_layer, (h, w), dtype)
        multimask = self.generation == "head"
        masks, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=image, image_pe=pos,
            sparse_prompt_embeddings=prompt_tokens.to(device=image.device, dtype=dtype),
            dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=False,
            high_res_features=list(selected.high_res))
        if multimask:
            best = iou.argmax(dim=1)
            rows = torch.arange(t, device=iou.device)
            masks, iou = masks[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)
        return masks.float(), iou[:, 0].float()
