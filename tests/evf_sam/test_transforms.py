"""Preprocessing and postprocessing follow the official EVF-SAM code (reference §4, §5.4) value for value."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from evf_sam.errors import ImageError, PromptError
from evf_sam.transforms import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, beit_input, check_prompts, load_image,
                                normalize_sam, postprocess_logits, resize_longest_side, resized_shape, sam_input,
                                tokenize)
from tests.evf_sam.conftest import shapes_image

# ------------------------------------------------------------------------------------------------ load_image


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_load_image_from_path_pil_and_array_agree(tmp_path: Path) -> None:
    array = shapes_image(30, 40)
    path = _save(Image.fromarray(array), tmp_path / "a.png")
    for source in (path, str(path), Image.open(path), array):
        loaded = load_image(source)
        assert loaded.dtype == np.uint8 and loaded.shape == (30, 40, 3)
        np.testing.assert_array_equal(loaded, array)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    array[0, 0] = (255, 0, 0)  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = _save(Image.fromarray(array), tmp_path / "rotated.png", exif=exif)
    for source in (path, Image.open(path)):
        loaded = load_image(source)
        assert loaded.shape == (40, 20, 3)  # transposed size
        np.testing.assert_array_equal(loaded[0, -1], (255, 0, 0))  # top-left moved to top-right


def test_grayscale_palette_alpha_cmyk_and_16_bit(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert load_image(Image.fromarray(gray, "L")).tolist() == np.repeat(gray[..., None], 3, axis=2).tolist()
    assert load_image(gray).shape == (3, 4, 3)
    assert load_image(gray[..., None]).shape == (3, 4, 3)

    rgba = np.dstack([shapes_image(3, 4), np.full((3, 4), 7, np.uint8)])
    np.testing.assert_array_equal(load_image(Image.fromarray(rgba, "RGBA")), rgba[..., :3])  # alpha dropped
    np.testing.assert_array_equal(load_image(rgba), rgba[..., :3])

    palette = Image.fromarray(shapes_image(8, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    assert load_image(_save(palette, tmp_path / "p.png")).shape == (8, 8, 3)
    assert load_image(Image.fromarray(shapes_image(5, 6)).convert("CMYK")).shape == (5, 6, 3)

    wide = np.array([[0, 257, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(wide), tmp_path / "16bit.png")
    assert Image.open(path).mode.startswith("I")
    assert load_image(path)[0, :, 0].tolist() == [0, 1, 255]
    dark = _save(Image.fromarray(np.array([[0, 200]], dtype=np.uint16)), tmp_path / "dark16.png")
    assert load_image(dark)[0, :, 0].tolist() == [0, 1]  # 16-bit scale even when every value is small


def test_arrays_are_not_modified_and_read_only_arrays_work() -> None:
    array = shapes_image(10, 12)
    array.setflags(write=False)
    loaded = load_image(array)
    assert loaded.flags.writeable and loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
    (np.zeros((4, 4, 2), dtype=np.uint8), "shape"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
    (b"\x89PNG", "unsupported image type"),
    (42, "unsupported image type"),
])
def test_bad_image_inputs_raise_image_error(bad, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(bad)


def test_bad_files_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "text.png")
    buffer = io.BytesIO()
    Image.fromarray(shapes_image(64, 64)).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(tmp_path / "truncated.png")


# ------------------------------------------------------------------------------------------------ SAM-1 input


@pytest.mark.parametrize("height, width, long_side, expected", [
    (480, 640, 1024, (768, 1024)),
    (100, 150, 128, (85, 128)),   # 85.33 -> 85
    (333, 1000, 1024, (341, 1024)),  # 340.99 -> 341
    (1000, 5, 128, (128, 1)),     # 0.64 -> 1
    (64, 64, 128, (128, 128)),
    (1, 5000, 128, (1, 128)),     # 0.03 -> 0 would be an empty image: kept at 1
])
def test_resized_shape_rounds_half_up(height: int, width: int, long_side: int, expected) -> None:
    assert resized_shape(height, width, long_side) == expected


@pytest.mark.parametrize("size", [(75, 100), (100, 60), (128, 128), (300, 257)])
def test_sam1_input_equals_segment_anything(size, tiny_model) -> None:
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = tiny_model("sam").visual_model
    side = sam.image_encoder.img_size
    image = shapes_image(*size)
    theirs_resized = ResizeLongestSide(side).apply_image(image)
    np.testing.assert_array_equal(resize_longest_side(image, side), theirs_resized)
    theirs = sam.preprocess(torch.as_tensor(theirs_resized).permute(2, 0, 1).contiguous()[None].float())[0]
    ours = sam_input(image, side, "sam")
    assert torch.equal(ours.pixels, theirs)
    assert ours.original_size == size and ours.resize_shape == theirs_resized.shape[:2]


def test_sam1_input_values_by_hand() -> None:
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    image[:] = (124, 116, 104)
    prepared = sam_input(image, 64, "sam")
    assert prepared.pixels.shape == (3, 64, 64) and prepared.pixels.dtype == torch.float32
    assert prepared.resize_shape == (32, 64)
    expected = [(v - m) / s for v, m, s in zip((124, 116, 104), SAM_PIXEL_MEAN, SAM_PIXEL_STD)]
    torch.testing.assert_close(prepared.pixels[:, :32].mean(dim=(1, 2)), torch.tensor(expected))
    assert torch.count_nonzero(prepared.pixels[:, 32:]) == 0  # zero padding after normalising, bottom only


# ------------------------------------------------------------------------------------------------ SAM-2 inputs


def test_sam2_head_is_a_uint8_stretch_then_normalise() -> None:
    image = shapes_image(70, 100)
    prepared = sam_input(image, 128, "head")
    assert prepared.pixels.shape == (3, 128, 128) and prepared.resize_shape is None
    as_uint8 = torch.from_numpy(image).permute(2, 0, 1)[None]
    expected = normalize_sam(F.interpolate(as_uint8, (128, 128), mode="bilinear", align_corners=False)[0].float())
    assert torch.equal(prepared.pixels, expected)
    float_stretch = F.interpolate(as_uint8.float(), (128, 128), mode="bilinear", align_corners=False)[0]
    std, mean = torch.tensor(SAM_PIXEL_STD)[:, None, None], torch.tensor(SAM_PIXEL_MEAN)[:, None, None]
    unnormalised = prepared.pixels * std + mean
    assert (unnormalised - float_stretch.round()).abs().max() <= 1.001  # fixed-point uint8 kernel: within +-1


def test_sam2_legacy_is_pil_resize_normalise_then_float_stretch() -> None:
    image = shapes_image(70, 100)
    prepared = sam_input(image, 128, "legacy")
    assert prepared.pixels.shape == (3, 128, 128) and prepared.resize_shape is None
    resized = Image.fromarray(image).resize((128, 90), Image.Resampling.BILINEAR)  # 70 * 1.28 = 89.6 -> 90
    normalised = normalize_sam(torch.from_numpy(np.array(resized)).permute(2, 0, 1).float())
    expected = F.interpolate(normalised[None], (128, 128), mode="bilinear", align_corners=False)[0]
    assert torch.equal(prepared.pixels, expected)


def test_sam2_generations_differ_except_on_square_inputs_of_the_model_size() -> None:
    image = shapes_image(70, 100)
    legacy, head = sam_input(image, 128, "legacy").pixels, sam_input(image, 128, "head").pixels
    assert (legacy - head).abs().max() > 0.05  # two resizes vs one: documented to differ (reference §4.4)
    square = shapes_image(128, 128)
    normalised = normalize_sam(torch.from_numpy(square).permute(2, 0, 1).float())
    for mode in ("legacy", "head"):
        assert torch.equal(sam_input(square, 128, mode).pixels, normalised)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        sam_input(shapes_image(8, 8), 16, "bicubic")


# ------------------------------------------------------------------------------------------------ BEiT-3 input


@pytest.mark.parametrize("size", [(300, 500), (100, 60), (224, 224)])
def test_beit_input_matches_the_reference_compose(size) -> None:
    reference = T.Compose([T.ToTensor(), T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC,
                                                  antialias=None), T.Normalize([0.5] * 3, [0.5] * 3)])
    image = shapes_image(*size)
    ours = beit_input(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, reference(image))


def test_beit_input_keeps_bicubic_overshoot_and_skips_antialias() -> None:
    stripes = np.zeros((40, 40, 3), dtype=np.uint8)
    stripes[:, 20:] = 255
    assert beit_input(stripes).max() > 1.0 and beit_input(stripes).min() < -1.0  # overshoot is not clamped
    fine = np.zeros((448, 448, 3), dtype=np.uint8)
    fine[:, 1::4] = 255
    antialiased = T.functional.resize(T.functional.to_tensor(fine), [224, 224], antialias=True,
                                      interpolation=T.InterpolationMode.BICUBIC) * 2 - 1
    assert (beit_input(fine) - antialiased).abs().max() > 0.1
    assert torch.allclose(beit_input(np.full((10, 10, 3), 51, np.uint8)), torch.tensor(51 / 255 * 2 - 1))


# ------------------------------------------------------------------------------------------------ text


def test_tokenize_pads_right_with_pad_id_and_mask(tiny_model) -> None:
    model = tiny_model("sam")
    ids, mask = tokenize(model.tokenizer, ["the dog on the left", "circle"], model.max_text_tokens)
    assert ids.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 2
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] == ids.shape[1] > lengths[1]
    for row, length in enumerate(lengths):
        assert ids[row, 0] == 0 and ids[row, length - 1] == 2  # <s> ... </s>
        assert (ids[row, length:] == 1).all() and (mask[row, length:] == 0).all() and (mask[row, :length] == 1).all()
    single, _ = tokenize(model.tokenizer, ["circle"], model.max_text_tokens)
    assert single[0].tolist() == ids[1, :lengths[1]].tolist()  # no padding when alone


def test_a_10000_character_prompt_is_truncated_to_the_position_table(tiny_model) -> None:
    model = tiny_model("sam")
    text = ("the dog on the left " * 500)[:10_000]
    ids, mask = tokenize(model.tokenizer, [text, "circle"], model.max_text_tokens)
    assert ids.shape[1] == model.max_text_tokens == model.mm_extractor.beit3.max_text_tokens
    assert ids[0, 0] == 0 and ids[0, -1] == 2 and mask[0].all()


def test_semantic_prefix_only_for_multitask(tiny_model) -> None:
    plain = tiny_model("sam")
    with pytest.raises(PromptError, match="multitask"):
        tokenize(plain.tokenizer, ["hair"], plain.max_text_tokens, semantic=True, multitask=plain.is_multitask)
    multi = tiny_model("sam", multitask=True)
    semantic_id = multi.tokenizer.convert_tokens_to_ids("[semantic]")
    ids, _ = tokenize(multi.tokenizer, ["hair", "[semantic] hair"], multi.max_text_tokens, semantic=True,
                      multitask=multi.is_multitask)
    assert ids[0, 1] == semantic_id and ids[0].tolist() == ids[1].tolist()  # never prefixed twice
    assert (ids[0] == semantic_id).sum() == 1


@pytest.mark.parametrize("prompts, message", [
    ([], "no prompts"),
    (["ok", "  \n"], "prompt 1 is empty"),
    ([""], "prompt 0 is empty"),
    (["ok", 3], "prompt 1 must be a string"),
    ("the dog", "wrap a single prompt in a list"),
    (None, "list of strings"),
])
def test_bad_prompts_raise_prompt_error(prompts, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        check_prompts(prompts)


# ------------------------------------------------------------------------------------------------ masks


def test_postprocess_sam1_crops_the_padding_before_resizing() -> None:
    low = torch.full((2, 1, 16, 16), -5.0)
    low[:, :, :8, :] = 3.0  # content = top half of the padded square (resize_shape 32 x 64 of 64 x 64)
    out = postprocess_logits(low, (50, 100), sam_size=64, resize_shape=(32, 64))
    assert out.shape == (2, 50, 100) and out.dtype == torch.float32
    assert (out[:, :45] > 0).all()  # the padding region (negative) is cropped away before the final resize
    expected = F.interpolate(F.interpolate(low, (64, 64), mode="bilinear")[..., :32, :64], (50, 100),
                             mode="bilinear")[:, 0]
    assert torch.equal(out, expected)


def test_postprocess_sam2_is_one_resize_in_float32() -> None:
    low = torch.randn(3, 1, 16, 16, dtype=torch.bfloat16)
    out = postprocess_logits(low, (40, 30), sam_size=64, resize_shape=None)
    assert out.dtype == torch.float32 and out.shape == (3, 40, 30)
    assert torch.equal(out, F.interpolate(low.float(), (40, 30), mode="bilinear", align_corners=False)[:, 0])
