"""Prompt-path CUDA graphs (`evf_sam.prompt_graphs`, switched on by `evf_sam.acceleration`): bucket padding gives
the unpadded results, the predictor falls back to the eager path off CUDA, and (on a GPU) replays match eager."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evf_sam.acceleration import accelerate
from evf_sam.predictor import EvfPredictor
from evf_sam.prompt_graphs import PromptGraphs, prompt_bucket, text_bucket
from evf_sam.transforms import tokenize
from tests.evf_sam.conftest import shapes_image

VARIANTS = [("sam", False), ("sam2", False), ("sam2", True)]
# 12, 7 and 39 tokens with the tiny tokenizer: text buckets 16 and 62 (the tiny model's max_text_tokens)
PROMPTS = ["the red circle", "square", "a red car parked near the tree and more words here"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_buckets_are_powers_of_two_within_the_limits() -> None:
    assert [prompt_bucket(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert prompt_bucket(5, 6) == 6
    assert [text_bucket(n, 62) for n in (1, 8, 9, 17, 33, 62)] == [8, 8, 16, 32, 62, 62]
    for bad in (lambda: prompt_bucket(0, 8), lambda: prompt_bucket(9, 8), lambda: text_bucket(63, 62)):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("family, multitask", VARIANTS)
def test_padded_buckets_equal_the_unpadded_prompt_path(family: str, multitask: bool, tiny_model) -> None:
    model = tiny_model(family, multitask)
    size = model.sam_image_size
    generator = torch.Generator().manual_seed(0)
    ids, mask = tokenize(model.tokenizer, PROMPTS, model.max_text_tokens)
    with torch.inference_mode():
        features = model.encode_images(torch.randn(2, 3, size, size, generator=generator))
        beit = torch.randn(2, 3, model.beit_image_size, model.beit_image_size, generator=generator)
        for rows in ([0, 1, 0], [1]):  # 3 prompts -> 4 rows; one prompt of 12 tokens -> 16 tokens
            index = torch.tensor(rows)
            length = int(mask[:len(rows)].sum(dim=1).max())
            text = ids[:len(rows), :length], mask[:len(rows), :length]
            want = model.decode_masks(features, model.encode_prompts(beit[index], *text), index)
            got = PromptGraphs().run(model, beit, features, index, *text, limit=8)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
            assert torch.equal(got[0] > 0, want[0] > 0)


def test_the_predictor_falls_back_to_the_eager_path_off_cuda(tiny_model) -> None:
    plain = tiny_model("sam")
    model = copy.deepcopy(plain)
    assert accelerate(model, fused_attention=False, prompt_graphs=True)["prompt_graphs"] is False
    items = [(shapes_image(70, 100, seed=1), PROMPTS[:2]), (shapes_image(60, 80, seed=2), PROMPTS[2:])]
    got = EvfPredictor(model).predict_batch(items)
    want = EvfPredictor(plain).predict_batch(items)
    for preds_got, preds_want in zip(got, want):
        for g, w in zip(preds_got, preds_want):
            np.testing.assert_array_equal(g.logits, w.logits)
            assert g.score == w.score
    assert model.prompt_graphs.buckets == []  # nothing was captured


def test_a_copy_of_an_accelerated_model_gets_its_own_empty_graphs(tiny_model) -> None:
    model = copy.deepcopy(tiny_model("sam"))
    accelerate(model, fused_attention=False, prompt_graphs=True)
    graphs = model.prompt_graphs
    assert accelerate(model, fused_attention=False, prompt_graphs=True)["prompt_graphs"] is False
    assert model.prompt_graphs is graphs  # attaching twice keeps the captures
    clone = copy.deepcopy(model)
    assert isinstance(clone.prompt_graphs, PromptGraphs) and clone.prompt_graphs is not graphs


# ---------------------------------------------------------------------------------------------- CUDA only


def _on_cuda(tiny_model, family: str, multitask: bool = False, dtype: torch.dtype = torch.float32):
    model = copy.deepcopy(tiny_model(family, multitask)).to("cuda", dtype)
    eager = EvfPredictor(model, cache_size=4)
    graphed = copy.deepcopy(model)
    assert accelerate(graphed, fused_attention=False, prompt_graphs=True)["prompt_graphs"] is True
    return eager, EvfPredictor(graphed, cache_size=4, max_prompt_batch=8), graphed.prompt_graphs


@cuda
@pytest.mark.parametrize("family, multitask", VARIANTS)
def test_graph_replays_equal_the_eager_path_on_cuda(family: str, multitask: bool, tiny_model) -> None:
    eager, graphed, graphs = _on_cuda(tiny_model, family, multitask)
    items = [(shapes_image(70, 100, seed=1), PROMPTS[:2]), (shapes_image(60, 80, seed=2), PROMPTS[2:]),
             (shapes_image(70, 100, seed=1), PROMPTS[1:2])]
    want = eager.predict_batch(items)
    for _ in range(2):  # captured on the first call, replayed on the second
        got = graphed.predict_batch(items)
        for preds_got, preds_want in zip(got, want):
            for g, w in zip(preds_got, preds_want):
                np.testing.assert_allclose(g.logits, w.logits, atol=1e-4, rtol=0)
                np.testing.assert_array_equal(g.mask, g.logits > 0)
                assert g.score == pytest.approx(w.score, abs=1e-5)
    assert graphs.buckets == [(4, 62)]  # 4 prompts, longest text 39 tokens -> 62 (the tiny model's limit)


@cuda
def test_new_shapes_capture_once_and_casting_the_model_recaptures(tiny_model) -> None:
    _, graphed, graphs = _on_cuda(tiny_model, "sam")
    image = shapes_image(64, 64)
    first = graphed.predict(image, PROMPTS[:1])[0]
    graphed.predict(image, PROMPTS[1:2])
    graphed.predict(image, PROMPTS[:1] * 3)
    assert graphs.buckets == [(1, 8), (1, 16), (4, 16)]
    graphed.model.to(torch.bfloat16)
    graphed.clear_cache()  # its embeddings are float32
    low = graphed.predict(image, PROMPTS[:1])[0]
    assert graphs.buckets == [(1, 16)]  # the fp32 captures were dropped
    assert (low.mask == first.mask).mean() > 0.95


@cuda
def test_autocast_and_masks_only_run_without_graphs_or_logits(tiny_model) -> None:
    eager, graphed, graphs = _on_cuda(tiny_model, "sam2")
    image = shapes_image(64, 64)
    with torch.autocast("cuda", dtype=torch.float16):
        graphed.predict(image, PROMPTS[:1])
    assert graphs.buckets == []
    masks_only = EvfPredictor(graphed.model, return_logits=False).predict(image, PROMPTS[:2])
    for got, want in zip(masks_only, eager.predict(image, PROMPTS[:2])):
        assert got.logits is None
        assert (got.mask == want.mask).mean() > 0.999


@cuda
def test_a_failed_capture_switches_the_graphs_off_and_answers_eagerly(tiny_model, monkeypatch) -> None:
    eager, graphed, graphs = _on_cuda(tiny_model, "sam")
    decode = graphed.model.decode_masks

    def syncing(features, tokens, index):
        tokens.sum().item()  # waits for the device: not allowed while a graph is captured
        return decode(features, tokens, index)

    monkeypatch.setattr(graphed.model, "decode_masks", syncing)
    image = shapes_image(64, 64)
    got = graphed.predict(image, PROMPTS[:1])[0]
    assert graphs.failure is not None and graphs.buckets == []
    np.testing.assert_allclose(got.logits, eager.predict(image, PROMPTS[:1])[0].logits, atol=1e-4, rtol=0)
    graphed.predict(image, PROMPTS[1:2])  # later calls go straight to the eager path
    assert graphs.buckets == []
