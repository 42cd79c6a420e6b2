"""EvfPredictor: contract shapes, batching equivalence, the embedding cache, dtypes, and parity with the
`segment_anything` / `sam2` predictors where their computation overlaps ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evf_sam.errors import ImageError, PromptError
from evf_sam.modeling import ImageFeatures
from evf_sam.predictor import EvfPredictor, Prediction, image_key, packed_host_copy
from evf_sam.transforms import beit_input, sam_input, tokenize
from tests.evf_sam.conftest import shapes_image

# (family, multitask): SAM-1, SAM-2 "legacy" (evf-sam2) and SAM-2 "head" (-multitask) paths.
VARIANTS = [("sam", False), ("sam2", False), ("sam2", True)]
PROMPTS = ["the red circle", "square", "a red car parked near the tree"]


class CountingEncoder:
    """Wraps `model.encode_images` to record the batch size of every call."""

    def __init__(self, model, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[int] = []
        original = model.encode_images

        def encode(pixels: torch.Tensor) -> ImageFeatures:
            self.batches.append(pixels.shape[0])
            return original(pixels)

        monkeypatch.setattr(model, "encode_images", encode)


@pytest.mark.parametrize("family, multitask", VARIANTS)
def test_predictions_follow_the_contract(family: str, multitask: bool, tiny_model) -> None:
    image = shapes_image(70, 100)
    results = EvfPredictor(tiny_model(family, multitask)).predict(image, PROMPTS[:2])
    assert len(results) == 2
    for result in results:
        assert isinstance(result, Prediction)
        assert result.mask.dtype == bool and result.mask.shape == (70, 100)
        assert result.logits.dtype == np.float32 and result.logits.shape == (70, 100)
        np.testing.assert_array_equal(result.mask, result.logits > 0)
        assert isinstance(result.score, float)
    with pytest.raises(AttributeError):
        results[0].score = 1.0  # frozen


@pytest.mark.parametrize("family, multitask", VARIANTS)
def test_masks_only_predictions_equal_the_thresholded_logits(family: str, multitask: bool, tiny_model) -> None:
    model = tiny_model(family, multitask)
    items = [(shapes_image(70, 100, seed=1), PROMPTS[:2]), (shapes_image(50, 60, seed=2), PROMPTS[2:])]
    with_logits = EvfPredictor(model).predict_batch(items)
    masks_only = EvfPredictor(model, return_logits=False).predict_batch(items)
    for full, light in zip(with_logits, masks_only):
        for f, m in zip(full, light):
            assert m.logits is None and m.mask.dtype == bool
            np.testing.assert_array_equal(m.mask, f.logits > 0)
            assert m.score == f.score


def test_packed_host_copy_gives_back_every_tensor() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, generator=generator), torch.randn(2, 5, 7, generator=generator),
               torch.rand(3, 5, 7, generator=generator) > 0.5, torch.rand(1, 3, 3, generator=generator) > 0.5]
    for array, tensor in zip(packed_host_copy(tensors), tensors, strict=True):
        assert array.dtype == tensor.numpy().dtype and array.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(array, tensor.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_sends_masks_scores_and_logits_through_one_host_copy(tiny_model) -> None:
    import copy

    model = tiny_model("sam2")
    items = [(shapes_image(70, 100, seed=1), PROMPTS[:2]), (shapes_image(50, 60, seed=2), PROMPTS[2:])]
    on_cpu = EvfPredictor(model).predict_batch(items)
    on_cuda = copy.deepcopy(model).cuda()
    full = EvfPredictor(on_cuda).predict_batch(items)
    light = EvfPredictor(on_cuda, return_logits=False).predict_batch(items)
    for preds_cpu, preds_full, preds_light in zip(on_cpu, full, light):
        for c, f, m in zip(preds_cpu, preds_full, preds_light):
            assert f.logits.dtype == np.float32 and f.logits.shape == c.logits.shape
            np.testing.assert_array_equal(f.mask, f.logits > 0)
            assert m.logits is None
            np.testing.assert_array_equal(m.mask, f.mask)
            assert m.score == f.score
            # TF32 convolutions on the GPU: close to the CPU, not equal
            assert (f.mask == c.mask).mean() > 0.98 and f.score == pytest.approx(c.score, abs=1e-2)


@pytest.mark.parametrize("family, multitask", VARIANTS)
def test_batched_equals_one_at_a_time(family: str, multitask: bool, tiny_model) -> None:
    model = tiny_model(family, multitask)
    first, second = shapes_image(70, 100, seed=1), shapes_image(120, 90, seed=2)
    items = [(first, PROMPTS[:2]), (second, PROMPTS[2:]), (first.copy(), PROMPTS[2:])]
    batched = EvfPredictor(model, max_image_batch=4).predict_batch(items)
    for (image, prompts), results in zip(items, batched):
        for prompt, result in zip(prompts, results):
            alone = EvfPredictor(model, cache_size=0).predict(image, [prompt])[0]
            np.testing.assert_array_equal(result.mask, alone.mask)
            np.testing.assert_allclose(result.logits, alone.logits, atol=1e-5, rtol=0)
            assert result.score == pytest.approx(alone.score, abs=1e-5)


def test_cache_hit_equals_miss_and_skips_the_image_encoder(tiny_model, monkeypatch, tmp_path: Path) -> None:
    model = tiny_model("sam")
    counter = CountingEncoder(model, monkeypatch)
    predictor = EvfPredictor(model, cache_size=4)
    image = shapes_image(70, 100)
    miss = predictor.predict(image, PROMPTS[:1])[0]
    assert counter.batches == [1] and predictor.cache_stats().misses == 1

    Image.fromarray(image).save(tmp_path / "same.png")  # same pixels, other container
    for same in (image.copy(), tmp_path / "same.png", Image.open(tmp_path / "same.png")):
        hit = predictor.predict(same, PROMPTS[:1])[0]
        np.testing.assert_array_equal(hit.logits, miss.logits)
        assert hit.score == miss.score
    assert counter.batches == [1]  # never called again
    stats = predictor.cache_stats()
    assert (stats.hits, stats.misses, stats.size, stats.capacity) == (3, 1, 1, 4)
    predictor.clear_cache()
    assert predictor.cache_stats().size == 0 and predictor.cache_stats().hits == 0


def test_new_prompts_on_a_cached_image_skip_the_encoder(tiny_model, monkeypatch) -> None:
    model = tiny_model("sam2")
    counter = CountingEncoder(model, monkeypatch)
    predictor = EvfPredictor(model)
    image = shapes_image(64, 64)
    predictor.predict(image, PROMPTS[:1])
    predictor.predict(image, PROMPTS[1:])
    assert counter.batches == [1]


def test_lru_eviction_and_disabled_cache(tiny_model, monkeypatch) -> None:
    model = tiny_model("sam")
    counter = CountingEncoder(model, monkeypatch)
    a, b = shapes_image(40, 40, seed=1), shapes_image(40, 40, seed=2)
    predictor = EvfPredictor(model, cache_size=1)
    for image in (a, b, a):
        predictor.predict(image, PROMPTS[:1])
    assert counter.batches == [1, 1, 1] and predictor.cache_stats().size == 1
    predictor.predict(a, PROMPTS[:1])  # a is the most recent entry
    assert counter.batches == [1, 1, 1]

    uncached = EvfPredictor(model, cache_size=0)
    uncached.predict_batch([(a, PROMPTS[:1]), (a, PROMPTS[1:])])  # one encode per call, even for repeats
    uncached.predict(a, PROMPTS[:1])
    assert counter.batches[3:] == [1, 1] and uncached.cache_stats().size == 0


def test_new_images_are_encoded_in_batches_of_at_most_max_image_batch(tiny_model, monkeypatch) -> None:
    model = tiny_model("sam")
    counter = CountingEncoder(model, monkeypatch)
    images = [shapes_image(48, 64, seed=s) for s in range(5)]
    predictor = EvfPredictor(model, max_image_batch=2, max_prompt_batch=3)
    predictor.predict(images[0], PROMPTS[:1])
    results = predictor.predict_batch([(image, PROMPTS) for image in images])
    assert counter.batches == [1, 2, 2]  # image 0 came from the cache
    assert [len(r) for r in results] == [3] * 5


@pytest.mark.parametrize("family", ["sam", "sam2"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_masks_agree_with_fp32(family: str, dtype: str, tiny_model) -> None:
    # Only the single-mask paths: with random weights the -multitask ("head") path picks the best of three
    # candidate masks by predicted IoUs that differ by ~1e-3, so bf16 rounding legitimately flips that choice.
    # The random tiny SAM-2 marks ~96 % of this picture as foreground (SAM-1: ~72 %), so the background IoU is
    # checked too (measured 0.979-0.998; the minority class makes each flipped pixel count more).
    image = shapes_image(96, 128)
    reference = EvfPredictor(tiny_model(family)).predict(image, PROMPTS)
    low = EvfPredictor(tiny_model(family, dtype=dtype)).predict(image, PROMPTS)
    for ref, result in zip(reference, low):
        assert result.logits.dtype == np.float32
        assert 0.02 < ref.mask.mean() < 0.98  # a meaningful mask, neither empty nor full
        iou = (ref.mask & result.mask).sum() / (ref.mask | result.mask).sum()
        background_iou = (~ref.mask & ~result.mask).sum() / (~ref.mask | ~result.mask).sum()
        assert iou >= 0.98 and background_iou >= 0.95
        assert np.corrcoef(ref.logits.ravel(), result.logits.ravel())[0, 1] > 0.999


def test_exif_transposed_inputs_give_masks_at_the_displayed_size(tiny_model, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(shapes_image(30, 50)).save(tmp_path / "r.png", exif=exif)
    result = EvfPredictor(tiny_model("sam")).predict(tmp_path / "r.png", PROMPTS[:1])[0]
    assert result.mask.shape == (50, 30)


def test_long_prompts_are_truncated_not_rejected(tiny_model) -> None:
    result = EvfPredictor(tiny_model("sam")).predict(shapes_image(32, 32), ["the dog on the left " * 500])
    assert result[0].mask.shape == (32, 32)


def test_semantic_prompts(tiny_model) -> None:
    image = shapes_image(40, 40)
    with pytest.raises(PromptError, match="multitask"):
        EvfPredictor(tiny_model("sam")).predict(image, ["hair"], semantic=True)
    predictor = EvfPredictor(tiny_model("sam2", multitask=True))
    semantic = predictor.predict(image, ["hair"], semantic=True)[0]
    explicit = predictor.predict(image, ["[semantic] hair"])[0]
    np.testing.assert_array_equal(semantic.logits, explicit.logits)


@pytest.mark.parametrize("call, error, message", [
    (lambda p, img: p.predict(img, []), PromptError, "no prompts"),
    (lambda p, img: p.predict(img, ["ok", " "]), PromptError, "prompt 1 is empty"),
    (lambda p, img: p.predict(img, ["ok", None]), PromptError, "prompt 1 must be a string"),
    (lambda p, img: p.predict(img, "the dog"), PromptError, "list"),
    (lambda p, img: p.predict_batch([]), PromptError, "non-empty list"),
    (lambda p, img: p.predict_batch([(img, ["a"]), img]), PromptError, "item 1"),
    (lambda p, img: p.predict_batch([(img, ["a"]), (img, [""])]), PromptError, "item 1: prompt 0 is empty"),
    (lambda p, img: p.predict(img.astype(np.float32), ["a"]), ImageError, "uint8"),
    (lambda p, img: p.predict("/nonexistent/x.png", ["a"]), ImageError, "not found"),
])
def test_bad_inputs_raise_clear_errors(call, error, message: str, tiny_model) -> None:
    predictor = EvfPredictor(tiny_model("sam"))
    with pytest.raises(error, match=message):
        call(predictor, shapes_image(16, 16))
    assert predictor.cache_stats().misses == 0  # rejected before any work


def test_image_key_depends_on_content_and_shape() -> None:
    image = shapes_image(10, 12)
    assert image_key(image) == image_key(image.copy())
    assert image_key(image) != image_key(image.reshape(12, 10, 3))
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert image_key(image) != image_key(changed)


# ------------------------------------------------------------------------------------------ package parity


def _tokens(model, image: np.ndarray, prompts: list[str]) -> torch.Tensor:
    ids, mask = tokenize(model.tokenizer, prompts, model.max_text_tokens)
    beit = beit_input(image).expand(len(prompts), -1, -1, -1)
    return model.encode_prompts(beit, ids, mask)


@pytest.mark.parametrize("size", [(75, 100), (128, 128), (300, 200)])
def test_sam1_matches_segment_anything_predictor(size, tiny_model) -> None:
    """Image features from `SamPredictor.set_image`, its mask decoder and `postprocess_masks` give our logits."""
    from segment_anything import SamPredictor

    model = tiny_model("sam")
    image = shapes_image(*size)
    prompts = PROMPTS[:2]
    ours = EvfPredictor(model).predict(image, prompts)

    sam = model.visual_model
    theirs = SamPredictor(sam)
    theirs.set_image(image)
    with torch.inference_mode():
        mine = model.encode_images(sam_input(image, model.sam_image_size, "sam").pixels[None])
        assert torch.equal(mine.embeddings, theirs.features)  # identical input tensor -> identical features
        tokens = _tokens(model, image, prompts)
        low, _ = model.decode_masks(ImageFeatures(theirs.get_image_embedding()), tokens, torch.zeros(2).long())
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            2, -1, *sam.prompt_encoder.image_embedding_size)
        package_low, package_iou = sam.mask_decoder(
            image_embeddings=theirs.features, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=tokens, dense_prompt_embeddings=dense, multimask_output=False)
        full = sam.postprocess_masks(package_low, theirs.input_size, theirs.original_size)[:, 0]
    torch.testing.assert_close(low, package_low, atol=1e-5, rtol=1e-5)
    for index, result in enumerate(ours):
        np.testing.assert_allclose(result.logits, full[index].numpy(), atol=1e-5, rtol=0)
        assert result.score == pytest.approx(float(package_iou[index, 0]), abs=1e-5)


@pytest.mark.parametrize("multitask", [False, True])
def test_sam2_matches_sam2_image_predictor(multitask: bool, tiny_model) -> None:
    """Features from `SAM2ImagePredictor.set_image`, SAM-2's mask decoder (the image-path recipe) and the predictor's
    `postprocess_masks` give our logits.

    Only for an S x S image: `SAM2ImagePredictor` stretches with an antialiased torchvision resize on [0,1] floats,
    which neither EVF generation does (legacy: PIL longest-side resize + float stretch; head: uint8 stretch, whose
    fixed-point rounding differs by up to one grey level even where antialias has no effect, i.e. when upscaling).
    At S x S every resize is the identity, so all three preprocessings reduce to the same normalisation (theirs on
    [0,1], ours on 0-255: equal up to float rounding). `_bb_feat_sizes` is hard-coded for 1024 inputs upstream.
    """
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = tiny_model("sam2", multitask)
    side = model.sam_image_size
    image = shapes_image(side, side)
    prompts = PROMPTS[:2]
    ours = EvfPredictor(model).predict(image, prompts)

    sam2 = model.visual_model
    theirs = SAM2ImagePredictor(sam2)
    theirs._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
    theirs.set_image(image)
    embed, high_res = theirs._features["image_embed"], theirs._features["high_res_feats"]
    with torch.inference_mode():
        mine = model.encode_images(torch.stack([torch.from_numpy(image).permute(2, 0, 1).float()]).sub(
            torch.tensor([123.675, 116.28, 103.53]).reshape(1, 3, 1, 1)).div(
            torch.tensor([58.395, 57.12, 57.375]).reshape(1, 3, 1, 1)))
        torch.testing.assert_close(mine.embeddings, embed, atol=1e-4, rtol=1e-4)
        for a, b in zip(mine.high_res, high_res):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        tokens = _tokens(model, image, prompts)
        prompt = sam2.sam_prompt_encoder
        dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, *prompt.image_embedding_size)
        masks, iou, _, _ = sam2.sam_mask_decoder(
            image_embeddings=embed, image_pe=prompt.get_dense_pe(), sparse_prompt_embeddings=tokens,
            dense_prompt_embeddings=dense, multimask_output=multitask, repeat_image=True,
            high_res_features=list(high_res))
        if multitask:  # -multitask checkpoints: best predicted IoU among masks 1..3
            best = iou.argmax(dim=1)
            masks, iou = masks[torch.arange(2), best][:, None], iou[torch.arange(2), best][:, None]
        full = theirs._transforms.postprocess_masks(masks, (side, side))[:, 0]
    for index, result in enumerate(ours):
        np.testing.assert_allclose(result.logits, full[index].numpy(), atol=1e-4, rtol=0)
        assert result.score == pytest.approx(float(iou[index, 0]), abs=1e-4)


def test_preprocessing_on_the_model_device_matches_the_reference_path(tiny_model) -> None:
    # On a CPU model both paths run the same kernels; on CUDA they agree up to float rounding of the resizes.
    for family, multitask in VARIANTS:
        model = tiny_model(family, multitask)
        image = shapes_image(70, 100)
        reference = EvfPredictor(model).predict(image, PROMPTS[:1])[0]
        on_device = EvfPredictor(model, preprocess_device="model").predict(image, PROMPTS[:1])[0]
        np.testing.assert_allclose(on_device.logits, reference.logits, atol=1e-5, rtol=0)


def test_threads_can_share_a_predictor(tiny_model) -> None:
    from concurrent.futures import ThreadPoolExecutor

    predictor = EvfPredictor(tiny_model("sam"), cache_size=2)
    images = [shapes_image(40, 50, seed=s) for s in range(4)]
    expected = [EvfPredictor(tiny_model("sam"), cache_size=0).predict(image, PROMPTS[:1])[0] for image in images]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda image: predictor.predict(image, PROMPTS[:1])[0], images * 2))
    for result, reference in zip(results, expected * 2):
        np.testing.assert_array_equal(result.mask, reference.mask)
    stats = predictor.cache_stats()
    assert stats.hits + stats.misses == 8 and stats.size == 2


def test_constructor_rejects_bad_settings(tiny_model) -> None:
    with pytest.raises(ValueError, match="cache_size"):
        EvfPredictor(tiny_model("sam"), cache_size=-1)
    with pytest.raises(ValueError, match="preprocess_device"):
        EvfPredictor(tiny_model("sam"), preprocess_device="cuda")


def test_extreme_aspect_ratios_and_tiny_images(tiny_model) -> None:
    for family, multitask in VARIANTS:
        predictor = EvfPredictor(tiny_model(family, multitask))
        for shape in [(1, 1, 3), (2, 900, 3), (700, 1, 3)]:
            result = predictor.predict(np.full(shape, 128, dtype=np.uint8), PROMPTS[:1])[0]
            assert result.mask.shape == shape[:2]


@pytest.mark.parametrize("family, multitask", VARIANTS)
@pytest.mark.parametrize("preprocess_device", [None, "model"])
def test_prepared_images_predict_exactly_as_raw_ones(family: str, multitask: bool, preprocess_device, tiny_model):
    predictor = EvfPredictor(tiny_model(family, multitask), cache_size=0, preprocess_device=preprocess_device)
    images = [shapes_image(70, 100, seed=1), shapes_image(120, 90, seed=2)]
    raw = predictor.predict_batch([(image, PROMPTS[:2]) for image in images])
    prepared = [predictor.prepare_image(image) for image in images]
    assert all(p.inputs is not None and p.key == image_key(image) for p, image in zip(prepared, images))
    for ours, reference in zip(predictor.predict_batch([(p, PROMPTS[:2]) for p in prepared]), raw):
        for result, expected in zip(ours, reference):
            np.testing.assert_array_equal(result.logits, expected.logits)
            assert result.score == expected.score


def test_the_device_split_runs_the_reference_float_steps(tiny_model) -> None:
    """On a CPU model, the uint8 host part + float device part equal transforms.sam_input / beit_input."""
    image = shapes_image(70, 100)
    for family, multitask in VARIANTS:
        predictor = EvfPredictor(tiny_model(family, multitask), preprocess_device="model")
        sam, beit = predictor._device_inputs(predictor._host_inputs(image))
        model = predictor.model
        mode = "sam" if family == "sam" else ("head" if multitask else "legacy")
        torch.testing.assert_close(sam, sam_input(image, model.sam_image_size, mode, device="cpu").pixels,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(beit, beit_input(image, model.beit_image_size, device="cpu"), atol=1e-6, rtol=0)


def test_images_prepared_on_threads_while_the_model_runs(tiny_model) -> None:
    from concurrent.futures import ThreadPoolExecutor

    predictor = EvfPredictor(tiny_model("sam"), cache_size=2)
    images = [shapes_image(40 + 10 * s, 50, seed=s) for s in range(6)]
    expected = [EvfPredictor(tiny_model("sam"), cache_size=0).predict(image, PROMPTS[:1])[0] for image in images]
    with ThreadPoolExecutor(3) as pool:
        prepared = [pool.submit(predictor.prepare_image, image) for image in images]
        results = [predictor.predict(future.result(), PROMPTS[:1])[0] for future in prepared]
    for result, reference in zip(results, expected):
        np.testing.assert_array_equal(result.mask, reference.mask)


def test_a_prepared_image_survives_eviction_and_another_predictor(tiny_model) -> None:
    predictor = EvfPredictor(tiny_model("sam"), cache_size=1)
    image, other = shapes_image(70, 100, seed=1), shapes_image(60, 80, seed=2)
    reference = EvfPredictor(tiny_model("sam"), cache_size=0).predict(image, PROMPTS[:1])[0]
    predictor.predict(image, PROMPTS[:1])
    cached = predictor.prepare_image(image)
    assert cached.inputs is None  # the embedding is cached: no preprocessing done
    predictor.predict(other, PROMPTS[:1])  # evicts it
    np.testing.assert_array_equal(predictor.predict(cached, PROMPTS[:1])[0].logits, reference.logits)
    on_device = EvfPredictor(tiny_model("sam"), cache_size=0, preprocess_device="model")
    assert on_device.prepare_image(cached).inputs is not None  # made for another preprocessing: redone
    np.testing.assert_allclose(on_device.predict(cached, PROMPTS[:1])[0].logits, reference.logits, atol=1e-5)


def test_prepare_image_rejects_bad_images(tiny_model) -> None:
    with pytest.raises(ImageError, match="uint8"):
        EvfPredictor(tiny_model("sam")).prepare_image(np.zeros((4, 4, 3), dtype=np.float32))
