"""Resident synthetic data: the same scenes, texts and SAM inputs as the file-based generator and transforms."""

from __future__ import annotations

import numpy as np
import torch

from evf_sam.data.layout import LayoutDataset
from evf_sam.data.resident import ResidentData, build_synthetic
from evf_sam.data.synthetic import generate_dataset
from evf_sam.transforms import beit_input, load_image, postprocess_logits, sam_input


def test_resident_data_matches_the_files_and_the_reference_preprocessing(tmp_path):
    data = build_synthetic(5, "train", 3, 128, 64, workers=1, progress=False)
    generate_dataset(tmp_path, 3, seed=5, split="train", progress=False)
    records = LayoutDataset(tmp_path, "train").records
    assert data.texts == [r.prompt for r in records]
    dataset = LayoutDataset(tmp_path, "train")
    for row, record in enumerate(records):
        image = load_image(dataset.image_path(record))
        index = int(data.image_of[row])
        reference = sam_input(image, 128)
        assert torch.equal(data.sam_pixels(torch.tensor([index]))[0], reference.pixels)
        assert (data.beit[index].float() - beit_input(image, 64)).abs().max() < 2e-3
        target = data.mask_targets(torch.tensor([row]))
        assert set(target.unique().tolist()) <= {0.0, 1.0}
        back = postprocess_logits(target[:, None] * 20 - 10, reference.original_size, 128, reference.resize_shape)[0]
        truth = dataset.load_mask(record) > 0
        mask = back.numpy() > 0
        assert (mask & truth).sum() / (mask | truth).sum() > 0.75  # a 128 px frame loses small-shape detail only


def test_resident_data_is_deterministic_and_round_trips(tmp_path):
    first = build_synthetic(9, "train", 2, 64, 32, workers=1, progress=False)
    second = build_synthetic(9, "train", 2, 64, 32, workers=2, progress=False)
    assert torch.equal(first.sam, second.sam) and torch.equal(first.masks, second.masks)
    first.save(tmp_path / "data.pt")
    loaded = ResidentData.load(tmp_path / "data.pt")
    assert loaded.texts == first.texts and torch.equal(loaded.beit, first.beit)
    assert len(loaded) == len(first.texts) and loaded.sam_size == 64
    assert np.array_equal(loaded.image_of.numpy(), first.image_of.numpy())
