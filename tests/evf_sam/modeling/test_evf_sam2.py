"""EvfSam2Model pieces against the `sam2` modules they are built from (tiny random model)."""

from __future__ import annotations

import pytest
import torch

from evf_sam.modeling.evf_sam2 import EvfSam2Model
from evf_sam.loading import attach_tokenizer
from evf_sam.testing import TINY_CORPUS, tiny_config, train_tokenizer


@pytest.fixture(scope="module")
def model() -> EvfSam2Model:
    torch.manual_seed(0)
    return EvfSam2Model(tiny_config("sam2")).eval()


@pytest.fixture(scope="module")
def features(model: EvfSam2Model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.encode_images(torch.randn(2, 3, 128, 128))


def _tokens(count: int) -> torch.Tensor:
    return torch.randn(count, 1, 32, generator=torch.Generator().manual_seed(2))


def test_image_features_are_the_sam2_image_path(model: EvfSam2Model, features) -> None:
    assert features.embeddings.shape == (2, 32, 8, 8)
    assert [tuple(t.shape) for t in features.high_res] == [(2, 4, 32, 32), (2, 8, 16, 16)]
    torch.manual_seed(1)
    with torch.no_grad():
        levels = model.visual_model.forward_image(torch.randn(2, 3, 128, 128))["backbone_fpn"]
    no_mem = model.visual_model.no_mem_embed.reshape(1, -1, 1, 1)
    torch.testing.assert_close(features.embeddings, levels[-1] + no_mem)
    torch.testing.assert_close(features.high_res[0], levels[0])


def _reference(model: EvfSam2Model, features, tokens, index, multimask: bool):
    sam = model.visual_model
    rows = []
    for row, image in enumerate(index.tolist()):
        sparse, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
        rows.append(sam.sam_mask_decoder(
            image_embeddings=features.embeddings[image:image + 1], image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.cat([sparse, tokens[row:row + 1]], dim=1), dense_prompt_embeddings=dense,
            multimask_output=multimask, repeat_image=True,
            high_res_features=[t[image:image + 1] for t in features.high_res])[:2])
    return rows


def test_legacy_generation_is_single_mask_with_stability_fallback(model: EvfSam2Model, features) -> None:
    assert model.generation == "legacy" and model.visual_model.sam_mask_decoder.dynamic_multimask_via_stability
    tokens, index = _tokens(3), torch.tensor([1, 0, 1])
    with torch.no_grad():
        low, score = model.decode_masks(features, tokens, index)
        expected = _reference(model, features, tokens, index, multimask=False)
    for row, (masks, iou) in enumerate(expected):
        torch.testing.assert_close(low[row:row + 1], masks, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(score[row], iou[0, 0], atol=1e-5, rtol=1e-5)


def test_head_generation_keeps_the_best_of_three(model: EvfSam2Model, features) -> None:
    tokens, index = _tokens(3), torch.tensor([0, 0, 1])
    model.config.sam2_generation = "head"
    try:
        assert model.generation == "head"
        with torch.no_grad():
            low, score = model.decode_masks(features, tokens, index)
            expected = _reference(model, features, tokens, index, multimask=True)
    finally:
        model.config.sam2_generation = None
    assert low.shape == (3, 1, 32, 32)
    for row, (masks, iou) in enumerate(expected):
        best = int(iou[0].argmax())
        torch.testing.assert_close(low[row, 0], masks[0, best], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(score[row], iou[0, best], atol=1e-5, rtol=1e-5)


def test_generation_follows_the_tokenizer_unless_overridden(model: EvfSam2Model, tmp_path) -> None:
    try:
        attach_tokenizer(model, train_tokenizer(tmp_path / "plain", TINY_CORPUS, 64, multitask=False))
        assert not model.is_multitask and model.generation == "legacy"
        attach_tokenizer(model, train_tokenizer(tmp_path / "multi", TINY_CORPUS, 64, multitask=True))
        assert model.is_multitask and model.generation == "head"
        model.config.sam2_generation = "legacy"
        assert model.generation == "legacy"
        model.config.sam2_generation = "bogus"
        with pytest.raises(ValueError, match="sam2_generation must be one of"):
            model.generation
    finally:
        model.tokenizer, model.config.sam2_generation = None, None


def test_no_prompts_give_empty_results(model: EvfSam2Model, features) -> None:
    low, score = model.decode_masks(features, torch.zeros(0, 1, 32), torch.zeros(0, dtype=torch.long))
    assert low.shape == (0, 1, 32, 32) and score.shape == (0,)
