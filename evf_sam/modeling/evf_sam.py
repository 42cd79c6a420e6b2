"""EvfSamModel: BEiT-3 prompt encoder + SAM-1 (ViT) image encoder and mask decoder from `segment_anything`."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from evf_sam.config import EvfConfig
from evf_sam.modeling.common import EvfPreTrainedModel, ImageFeatures

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def build_sam(dims: dict) -> Sam:
    """A SAM-1 model from the `segment_anything` classes with the given dimensions (see `EvfConfig.sam_dims`)."""
    grid = dims["image_size"] // dims["patch_size"]
    prompt_dim = dims["prompt_dim"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=dims["image_size"], patch_size=dims["patch_size"], embed_dim=dims["embed_dim"],
            depth=dims["depth"], num_heads=dims["num_heads"], mlp_ratio=4, out_chans=prompt_dim, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=dims["window_size"],
            global_attn_indexes=tuple(dims["global_attn_indexes"])),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(dims["image_size"], dims["image_size"]), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=dims["decoder_mlp_dim"],
                                          num_heads=dims["decoder_heads"]),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=dims["iou_head_hidden_dim"]),
        pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
    )


class EvfSamModel(EvfPreTrainedModel):
    """EVF-SAM: the visual [CLS] of BEiT-3 is the only sparse prompt of SAM-1's mask decoder (single-mask output)."""

    family = "sam"
    fp32_buffers = ("visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",)

    def __init__(self, config: EvfConfig) -> None:
        super().__init__(config)
        dims = config.sam_dims()
        if dims["prompt_dim"] != config.out_dim:
            raise ValueError(f"out_dim ({config.out_dim}) must equal the SAM prompt dim ({dims['prompt_dim']})")
        self.visual_model = build_sam(dims)
        self.post_init()

    @property
    def sam_image_size(self) -> int:
        return self.visual_model.image_encoder.img_size

    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Normalised, padded SAM input [B,3,S,S] -> embeddings [B,C,S/16,S/16]."""
        self._check_sam_input(pixel_values)
        weight = self.visual_model.image_encoder.patch_embed.proj.weight
        return ImageFeatures(self.visual_model.image_encoder(pixel_values.to(device=weight.device, dtype=weight.dtype)))

    def decode_masks(self, features: ImageFeatures, prompt_tokens: torch.Tensor,
                     image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt (mask token 0): low-res logits [T,1,4h,4w] float32 and predicted IoU [T] float32.

        The image embedding is gathered per prompt, so prompts of different images decode in one batch.
        """
        decoder = self.visual_model.mask_decoder
        image = features.select(image_index).embeddings
        dtype = image.dtype
        t, c, h, w = image.shape
        no_mask = self.visual_model.prompt_encoder.no_mask_embed.weight.to(dtype).reshape(1, c, 1, 1)
        pos = self.dense_positional_encoding(self.visual_model.prompt_encoder.pe_layer, (h, w), dtype)

        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).to(dtype)
        prompt_tokens = prompt_tokens.to(device=image.device, dtype=dtype)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(t, -1, -1), prompt_tokens], dim=1)
        hs, src = decoder.transformer(image + no_mask, pos, tokens)  # pos broadcasts over prompts
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(t, c, h, w))
        mask_token = hs[:, 1]  # token 0 of the mask tokens = the single-mask output
        weights = decoder.output_hypernetworks_mlps[0](mask_token)
        logits = torch.einsum("tc,tchw->thw", weights, upscaled).unsqueeze(1)
        iou = decoder.iou_prediction_head(hs[:, 0])[:, 0]
        return logits.float(), iou.float()
