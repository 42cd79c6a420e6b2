"""Fresh images during training: fixed-layout pools, and a stream that swaps newly rendered images in."""

from __future__ import annotations

import time

import pytest
import torch

from evf_sam.data.resident import build_synthetic, parts_to_data, render_part
from evf_sam.data.stream import SyntheticStream


def wait_for(stream: SyntheticStream, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not stream.ready():
        assert time.monotonic() < deadline, "no rendered chunk arrived"
        time.sleep(0.1)


def test_filled_pools_give_every_image_the_same_number_of_expressions():
    plain = build_synthetic(4, "train", 3, 64, 32, expressions=60, workers=1, progress=False)
    filled = build_synthetic(4, "train", 3, 64, 32, expressions=60, fill_expressions=True, workers=1, progress=False)
    assert len(plain) < len(filled) == 60 * 3  # image 2 has fewer than 60 distinct expressions
    assert filled.image_of.tolist() == [i // 60 for i in range(len(filled))]
    for image in range(3):  # the generator's own expressions, in order, repeated
        own = [t for t, i in zip(plain.texts, plain.image_of.tolist()) if i == image]
        assert filled.texts[60 * image:60 * image + 60] == [own[k % len(own)] for k in range(60)]


def test_the_stream_replaces_the_oldest_images_with_the_next_ones_of_the_split():
    pool = build_synthetic(4, "train", 6, 64, 32, fill_expressions=True, workers=1, progress=False)
    before = pool.sam.clone()
    with SyntheticStream(4, "train", 6, 64, 32, workers=1, chunk=2) as stream:
        wait_for(stream)
        rows = stream.refresh(pool)
    fresh = stream.rendered  # 2 or 4: the chunks finished by then, two jobs are queued per worker
    expected = parts_to_data([render_part((4, "train", 6, 6 + fresh, 64, 32, 640, 4, True))])
    assert fresh in (2, 4) and rows.tolist() == list(range(4 * fresh))
    assert torch.equal(pool.sam[:fresh], expected.sam) and torch.equal(pool.sam[fresh:], before[fresh:])
    assert torch.equal(pool.masks[:4 * fresh], expected.masks) and pool.texts[:4 * fresh] == expected.texts
    assert torch.equal(pool.beit[:fresh], expected.beit) and torch.equal(pool.shapes[:fresh], expected.shapes)


def test_replace_images_refuses_a_pool_without_the_fixed_layout():
    plain = build_synthetic(4, "train", 3, 64, 32, expressions=60, workers=1, progress=False)
    with pytest.raises(ValueError, match="fill_expressions"):
        plain.replace_images(torch.tensor([0]), plain)


def test_training_with_a_stream_swaps_fresh_images_in(tiny_checkpoint):
    import evf_sam
    from evf_sam.train_resident import ResidentRecipe, train_resident

    model = evf_sam.load_model(tiny_checkpoint("sam"))
    data = build_synthetic(3, "train", 4, model.sam_image_size, model.beit_image_size, fill_expressions=True,
                           workers=1, progress=False)
    old_texts = list(data.texts)
    recipe = ResidentRecipe(steps=4, batch_size=4, lr=1e-3, warmup=1, seed=1)
    with SyntheticStream(3, "train", 4, model.sam_image_size, model.beit_image_size, workers=1, chunk=2) as stream:
        wait_for(stream)
        history = train_resident(model, data, recipe, log_every=2, progress=False, stream=stream, refresh_every=1)
    assert history.train[-1]["fresh_images"] >= 2 and data.texts != old_texts
    assert all(entry["loss"] == entry["loss"] for entry in history.train)  # finite, with re-tokenized rows
