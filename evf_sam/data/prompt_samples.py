"""Layout datasets as training batches: preprocessed (image, expression) samples, their collation (each distinct image
once per batch) and the per-epoch sample order that resuming reproduces."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from evf_sam.data.layout import Record, SampleDataset
from evf_sam.evaluate import prompt_text


class PromptSamples(torch.utils.data.Dataset):
    """(image, expression) records of a SampleDataset as model inputs, preprocessed by `evf_sam.transforms`."""

    def __init__(self, dataset: SampleDataset, sam_size: int, sam_mode: str, beit_size: int,
                 multitask: bool, preload: bool = False) -> None:
        self.dataset = dataset
        self.sam_size, self.sam_mode, self.beit_size, self.multitask = sam_size, sam_mode, beit_size, multitask
        paths = [str(dataset.image_path(r)) for r in dataset.records]
        ids = {p: i for i, p in enumerate(dict.fromkeys(paths))}
        self.image_ids = [ids[p] for p in paths]
        self.preload = preload
        self._images: dict[int, tuple[Any, torch.Tensor]] = {}
        self._masks: dict[int, torch.Tensor] = {}
        self._last: tuple[int, tuple[Any, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, index: int) -> tuple[Any, torch.Tensor]:
        from evf_sam.transforms import beit_input, load_image, sam_input

        image_id = self.image_ids[index]
        if image_id in self._images:
            return self._images[image_id]
        if self._last is not None and self._last[0] == image_id:  # consecutive expressions of one image
            return self._last[1]
        image = load_image(self.dataset.load_image(self.dataset.records[index]))
        prepared = (sam_input(image, self.sam_size, self.sam_mode), beit_input(image, self.beit_size))
        if self.preload:
            self._images[image_id] = prepared
        self._last = (image_id, prepared)
        return prepared

    def _mask(self, index: int) -> torch.Tensor:
        if index not in self._masks:
            mask = torch.from_numpy(self.dataset.load_mask(self.dataset.records[index]).astype(np.uint8))
            if not self.preload:
                return mask
            self._masks[index] = mask
        return self._masks[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record: Record = self.dataset.records[index]
        prepared, beit = self._image(index)
        mask = self._mask(index)
        if tuple(mask.shape) != prepared.original_size:
            raise ValueError(f"mask of {record.prompt!r} is {tuple(mask.shape)}, its image {prepared.original_size}")
        return {"pixels": prepared.pixels, "beit": beit, "mask": mask, "prompt": prompt_text(record, self.multitask),
                "image_id": self.image_ids[index], "original_size": prepared.original_size,
                "resize_shape": prepared.resize_shape}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> one batch: distinct images once (`pixels`, `beit`, `image_ids`), per prompt `image_index`."""
    unique: dict[int, int] = {}
    pixels, beit = [], []
    for s in samples:
        if s["image_id"] not in unique:
            unique[s["image_id"]] = len(unique)
            pixels.append(s["pixels"])
            beit.append(s["beit"])
    return {"pixels": torch.stack(pixels), "image_ids": list(unique),
            "image_index": torch.tensor([unique[s["image_id"]] for s in samples], dtype=torch.long),
            "beit": torch.stack(beit), "prompts": [s["prompt"] for s in samples],
            "masks": [s["mask"] for s in samples], "original_size": [s["original_size"] for s in samples],
            "resize_shape": [s["resize_shape"] for s in samples]}


def epoch_order(size: int, seed: int, epoch: int, groups: Sequence[int] | None = None) -> list[int]:
    """The sample order of `epoch`, a function of (seed, epoch) only, so resuming reproduces it.

    With `groups` (a group id per sample, e.g. its image), whole groups are shuffled and each group's samples stay
    together: a batch then holds all expressions of fewer images, so each image is preprocessed and encoded once.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if groups is None:
        return torch.randperm(size, generator=generator).tolist()
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    keys = list(members)
    return [i for g in torch.randperm(len(keys), generator=generator).tolist() for i in members[keys[g]]]
