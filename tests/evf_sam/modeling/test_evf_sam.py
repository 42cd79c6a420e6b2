"""EvfSamModel pieces against the `segment_anything` modules they are built from (tiny random model)."""

from __future__ import annotations

import pytest
import torch

from evf_sam.errors import ImageError, PromptError
from evf_sam.modeling import ImageFeatures
from evf_sam.modeling.evf_sam import EvfSamModel
from evf_sam.testing import tiny_config


@pytest.fixture(scope="module")
def model() -> EvfSamModel:
    torch.manual_seed(0)
    return EvfSamModel(tiny_config("sam")).eval()


def _prompts(model: EvfSamModel, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(count, 1, model.config.out_dim, generator=generator)


def test_dense_positional_encoding_matches_segment_anything(model: EvfSamModel) -> None:
    prompt_encoder = model.visual_model.prompt_encoder
    ours = model.dense_positional_encoding(prompt_encoder.pe_layer, prompt_encoder.image_embedding_size, torch.float32)
    torch.testing.assert_close(ours, prompt_encoder.get_dense_pe(), atol=1e-6, rtol=0)


def test_mixed_batch_decodes_like_one_image_at_a_time(model: EvfSamModel) -> None:
    torch.manual_seed(3)
    features = model.encode_images(torch.randn(3, 3, 128, 128))
    assert features.embeddings.shape == (3, 32, 8, 8) and features.high_res == ()
    tokens, index = _prompts(model, 4), torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        low, score = model.decode_masks(features, tokens, index)
        sam = model.visual_model
        for row, image in enumerate(index.tolist()):
            sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
            masks, iou = sam.mask_decoder(features.embeddings[image:image + 1], sam.prompt_encoder.get_dense_pe(),
                                          torch.cat([sparse, tokens[row:row + 1]], dim=1), dense, False)
            torch.testing.assert_close(low[row:row + 1], masks, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(score[row], iou[0, 0], atol=1e-5, rtol=1e-5)
    assert low.shape == (4, 1, 32, 32) and low.dtype == score.dtype == torch.float32


def test_forward_equals_the_three_pieces(model: EvfSamModel) -> None:
    torch.manual_seed(4)
    pixels, beit = torch.randn(2, 3, 128, 128), torch.randn(3, 3, 224, 224)
    ids = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1], [0, 9, 9, 2]])
    mask, index = (ids != 1).long(), torch.tensor([0, 1, 1])
    with torch.no_grad():
        tokens = model.encode_prompts(beit, ids, mask)
        expected = model.decode_masks(model.encode_images(pixels), tokens, index)
        actual = model(pixels, beit, ids, mask, index)
    assert tokens.shape == (3, 1, 32)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


def test_bfloat16_keeps_the_positional_encoding_in_float32(model: EvfSamModel) -> None:
    half = EvfSamModel(tiny_config("sam")).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    matrix = half.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert matrix.dtype == torch.float32
    assert torch.equal(matrix, model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
    with torch.no_grad():
        low, score = half.decode_masks(half.encode_images(torch.randn(1, 3, 128, 128)), _prompts(half, 2),
                                       torch.tensor([0, 0]))
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and torch.isfinite(score).all()


def test_image_features_select_cat_to() -> None:
    features = ImageFeatures(torch.arange(3.0).reshape(3, 1, 1, 1), (torch.arange(6.0).reshape(3, 2, 1, 1),))
    picked = features.select(torch.tensor([2, 2, 0]))
    assert picked.embeddings.flatten().tolist() == [2.0, 2.0, 0.0]
    assert picked.high_res[0][:, 1].flatten().tolist() == [5.0, 5.0, 1.0]
    joined = ImageFeatures.cat([features, picked])
    assert len(joined) == 6 and joined.high_res[0].shape == (6, 2, 1, 1)
    assert joined.to(dtype=torch.float16).embeddings.dtype == torch.float16


def test_bad_inputs_raise_clear_errors(model: EvfSamModel) -> None:
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ImageError, match=r"SAM input must be \[B,3,128,128\], got \[1, 3, 64, 64\]"):
        model.encode_images(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ImageError, match=r"BEiT-3 input must be \[T,3,224,224\]"):
        model.encode_prompts(torch.zeros(1, 3, 100, 100), ids, torch.ones_like(ids))
    too_long = torch.zeros(1, model.max_text_tokens + 1, dtype=torch.long)
    with pytest.raises(PromptError, match=f"exceeds the model's limit of {model.max_text_tokens} tokens"):
        model.encode_prompts(torch.zeros(1, 3, 224, 224), too_long, torch.ones_like(too_long))
    with pytest.raises(PromptError, match="shapes disagree"):
        model.encode_prompts(torch.zeros(2, 3, 224, 224), ids, torch.ones_like(ids))


def test_no_prompts_give_empty_results(model: EvfSamModel) -> None:
    features = model.encode_images(torch.zeros(1, 3, 128, 128))
    low, score = model.decode_masks(features, torch.zeros(0, 1, 32), torch.zeros(0, dtype=torch.long))
    assert low.shape == (0, 1, 32, 32) and score.shape == (0,)
