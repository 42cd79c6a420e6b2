"""Fused relative-position attention computes what segment-anything's attention computes."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT

from evf_sam.acceleration import accelerate
from evf_sam.modeling.fused_attention import FusedAttention, enable_fused_attention, relative_table


def test_fused_encoder_equals_the_original_with_windows_padding_and_global_blocks():
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=96, depth=3, num_heads=2,
                              global_attn_indexes=[1], window_size=3, use_rel_pos=True, out_chans=32).eval()
    for name, param in encoder.named_parameters():
        if "rel_pos" in name:
            param.data.normal_(0, 0.5)  # zero-initialised in SAM; make the relative terms matter
    pixels = torch.randn(2, 3, 128, 128)
    fused = copy.deepcopy(encoder)
    assert enable_fused_attention(fused) == 3
    assert all(type(m) is FusedAttention for m in fused.modules() if "Attention" in type(m).__name__)
    assert fused.state_dict().keys() == encoder.state_dict().keys()
    with torch.no_grad():
        assert torch.allclose(fused(pixels), encoder(pixels), atol=2e-5)


def test_relative_table_rejects_a_table_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not fit"):
        relative_table(torch.zeros(5, 4), 4)


def test_accelerate_on_a_tiny_model_keeps_its_predictions(tiny_model):
    import evf_sam

    from tests.evf_sam.conftest import shapes_image

    model = tiny_model("sam")
    image = shapes_image()
    before = evf_sam.EvfPredictor(model, cache_size=0).predict(image, ["the red circle"])[0]
    fast = copy.deepcopy(model)
    fast.tokenizer = model.tokenizer
    assert accelerate(fast)["fused_attention_modules"] > 0
    after = evf_sam.EvfPredictor(fast, cache_size=0).predict(image, ["the red circle"])[0]
    assert abs(after.logits - before.logits).max() < 1e-4
    assert accelerate(tiny_model("sam2"), fused_attention=True)["fused_attention_modules"] == 0
