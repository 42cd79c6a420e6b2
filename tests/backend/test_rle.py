"""Brush RLE codec: reference vectors, byte identity with the SDK encoder, editor-style streams, cleanup."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backend import rle
from backend.errors import BadRequest

# Reference label_studio.md §9.5 (SDK 2.1.2).
VECTORS = [
    (np.zeros((2, 2), np.uint8), [0, 0, 0, 16, 57, 27, 253, 240, 0]),
    (np.full((2, 2), 255, np.uint8), [0, 0, 0, 16, 57, 27, 253, 255, 240]),
    (np.array([[0, 255], [255, 0]], np.uint8), [0, 0, 0, 16, 57, 27, 252, 96, 19, 255, 198, 0]),
    (np.zeros((1, 100), np.uint8), [0, 0, 1, 144, 57, 27, 255, 1, 143, 0, 0]),
    (np.zeros((128, 128), np.uint8), [0, 1, 0, 0, 57, 27, 255, 255, 255, 0, 0]),
    (np.zeros((256, 128), np.uint8), [0, 2, 0, 0, 57, 27, 255, 255, 255, 0, 255, 255, 224, 0]),
]
LITERAL_STREAM = [0, 0, 0, 6, 57, 27, 248, 160, 31, 224, 31, 224, 225, 32]


def _literal_stream(words: list[int]) -> list[int]:
    """Hand-built stream of literal chunks (flag 0), as the editor's rle-pack writes them (16-bit counts)."""
    bits = f"{len(words):032b}" + "00111" + "0010" + "0011" + "0111" + "1111"
    for start in range(0, len(words), 1000):
        chunk = words[start:start + 1000]
        bits += "0" + "11" + f"{len(chunk) - 1:016b}" + "".join(f"{w:08b}" for w in chunk)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


@pytest.mark.parametrize("mask,expected", VECTORS, ids=lambda v: getattr(v, "shape", None) and str(v.shape))
def test_reference_vectors(mask: np.ndarray, expected: list[int]) -> None:
    assert rle.encode(mask) == expected
    assert rle.encode(mask > 0) == expected  # every vector is 0/255
    assert np.array_equal(rle.decode(expected, *mask.shape), mask > 0)


def test_sdk_word_vector() -> None:
    words = [1, 1, 1, 1, 2, 3, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4, 4, 4]
    stream = [0, 0, 0, 18, 57, 27, 252, 96, 32, 1, 0, 6, 0, 40, 0, 192, 3, 128, 17, 56, 32]
    assert rle.encode_words(words) == stream
    assert rle.decode_words(stream).tolist() == words


def test_literal_chunks_decode() -> None:
    assert rle.decode_words(LITERAL_STREAM).tolist() == [0, 255, 0, 255, 7, 9]


def _structured_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:150, :200]
    disk = (yy - 70) ** 2 + (xx - 90) ** 2 < 50 ** 2
    stripes = (xx // 3) % 2 == 0
    single = np.zeros((150, 200), bool)
    single[75, 100] = True
    long_runs = np.zeros((300, 300), bool)
    long_runs[:, 150:] = True  # runs of 150 px = 600 words, and a full-empty first half row
    big = np.zeros((400, 400), bool)  # runs over 65536 words: split into 16-bit chunks
    big[200:, :] = True
    return [disk, stripes, single, long_runs, big, ~disk, rng.random((37, 53)) < 0.5, rng.random((1, 1)) < 0.5,
            np.ones((1, 7), bool), rng.random((64, 64)) < 0.05]


@pytest.mark.parametrize("index", range(10))
def test_byte_identical_to_sdk_on_structured_masks(index: int) -> None:
    mask = _structured_masks()[index]
    as_uint8 = mask.astype(np.uint8) * 255
    assert rle.encode(mask) == mask2rle(as_uint8)
    assert rle.encode(as_uint8) == mask2rle(as_uint8)
    assert np.array_equal(rle.decode(rle.encode(mask), *mask.shape), mask)


def test_byte_identical_to_sdk_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = rng.integers(1, 80, 2)
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8) * np.uint8(rng.integers(0, 256))
        assert rle.encode(mask) == mask2rle(mask)


def test_byte_identical_to_sdk_on_word_streams_with_all_run_classes() -> None:
    rng = np.random.default_rng(1)
    for limit in (3, 20, 300, 140_000):
        values = rng.integers(0, 256, 40)
        words = np.repeat(values, rng.integers(1, limit, values.size)).astype(int)
        assert rle.encode_words(words) == encode_rle(words)
        assert np.array_equal(rle.decode_words(rle.encode_words(words)), words)


@settings(max_examples=150, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)),
              elements=st.sampled_from([0, 0, 0, 1, 128, 255, 255])))
def test_hypothesis_matches_sdk_and_round_trips(mask: np.ndarray) -> None:
    stream = rle.encode(mask)
    assert stream == mask2rle(mask)
    assert np.array_equal(rle.decode_words(stream), decode_rle(stream))
    assert np.array_equal(rle.decode(stream, *mask.shape), mask > 0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 7, 255]), st.integers(1, 70_000)), min_size=1, max_size=30))
def test_hypothesis_word_runs_match_sdk_encode_rle(runs: list[tuple[int, int]]) -> None:
    words = np.repeat([v for v, _ in runs], [n if i % 3 == 0 else n % 300 + 1 for i, (_, n) in enumerate(runs)])
    assert rle.encode_words(words) == encode_rle(words.astype(int))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=3000))
def test_hypothesis_literal_chunks_decode(words: list[int]) -> None:
    stream = _literal_stream(words)
    assert rle.decode_words(stream).tolist() == words == decode_rle(stream).tolist()


def test_integer_masks_are_clipped_and_other_dtypes_refused() -> None:
    assert rle.encode(np.array([[300, -5]])) == mask2rle(np.array([[255, 0]], np.uint8))
    with pytest.raises(ValueError, match="bool or integer"):
        rle.encode(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 4), np.uint8))


def test_alpha_threshold_reads_antialiased_editor_masks() -> None:
    alpha = np.array([[0, 1, 64], [127, 128, 255]])
    rgba = np.zeros((2, 3, 4), int)
    rgba[..., :3] = 200  # the editor paints RGB with the label colour; only alpha decides
    rgba[..., 3] = alpha
    stream = _literal_stream(rgba.ravel().tolist())
    assert rle.decode(stream, 2, 3).tolist() == [[False, True, True], [True, True, True]]
    assert rle.decode(stream, 2, 3, alpha_threshold=128).tolist() == [[False, False, False], [False, True, True]]


def test_decode_rejects_wrong_size_and_broken_streams() -> None:
    stream = rle.encode(np.ones((4, 5), bool))
    with pytest.raises(BadRequest, match="4x4 image needs 64") as info:
        rle.decode(stream, 4, 4)
    assert info.value.code == "bad_rle"
    with pytest.raises(BadRequest, match="truncated|runs past"):
        rle.decode_words(LITERAL_STREAM[:10])
    with pytest.raises(BadRequest, match="header"):
        rle.decode_words([0, 0, 1])
    with pytest.raises(BadRequest, match="integers 0..255"):
        rle.decode_words([0, 0, 0, 16, 57, 27, 999])


def test_clean_mask_removes_specks_and_fills_small_holes() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:25, 5:25] = True
    mask[10:12, 10:12] = False  # hole of 4 px
    mask[15:20, 15:20] = False  # hole of 25 px
    mask[35, 35] = True  # speck of 1 px
    mask[30:33, 2:5] = True  # blob of 9 px
    mask[0:3, 37:40] = False
    cleaned = rle.clean_mask(mask, min_area=5, fill_holes_below=10)
    assert not cleaned[35, 35] and cleaned[31, 3]
    assert cleaned[10:12, 10:12].all() and not cleaned[15:20, 15:20].any()
    assert not cleaned[0, 0]  # background touching the border is never a hole
    assert np.array_equal(rle.clean_mask(mask), mask)
    assert mask[35, 35]  # input untouched


def test_clean_mask_diagonal_pixels_form_one_object() -> None:
    mask = np.eye(6, dtype=bool)
    assert rle.clean_mask(mask, min_area=6).sum() == 6
    assert rle.clean_mask(mask, min_area=7).sum() == 0


def test_split_instances_largest_first_with_min_area_and_cap() -> None:
    mask = np.zeros((30, 30), bool)
    mask[0:3, 0:3] = True  # 9 px
    mask[10:20, 10:20] = True  # 100 px
    mask[25, 25] = True  # 1 px
    parts = rle.split_instances(mask)
    assert [int(p.sum()) for p in parts] == [100, 9, 1]
    assert all(p.shape == mask.shape and p.dtype == bool for p in parts)
    assert np.array_equal(np.logical_or.reduce(parts), mask)
    assert [int(p.sum()) for p in rle.split_instances(mask, min_area=5)] == [100, 9]
    assert [int(p.sum()) for p in rle.split_instances(mask, max_instances=1)] == [100]
    assert rle.split_instances(np.zeros((5, 5), bool)) == []
