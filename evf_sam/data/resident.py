"""Synthetic training data preprocessed once into tensors, so a training step is a GPU gather and nothing else.

`build_synthetic` renders scenes with `evf_sam.data.synthetic.make_example` in worker processes, passes each image
through a JPEG round trip (quality 95, as the files of `generate_dataset`), then through the model's own
preprocessing (`evf_sam.transforms`), and keeps:

- `sam`    uint8 [N,3,S,S]: the longest-side resize into the S x S frame, zero elsewhere (normalised on the GPU);
- `shapes` int16 [N,2]: (h', w') of the resized content inside the frame;
- `beit`   float16 [N,3,B,B]: the normalised BEiT-3 input;
- `masks`  uint8 [M,S,S/8]: each expression's ground truth resized like its image (bilinear, > 0.5), bit-packed;
- `image_of` int32 [M], `texts` and `kinds` (M strings; the query kind of each expression, "semantic" for unions).

About 0.55 MB per image with 4 expressions at S=256, so 40,000 images fit in host and GPU memory.

With `fill_expressions` every image gets exactly `expressions` rows (its expressions repeated in turn when the
generator found fewer; images with none are left out), image i owning rows [k*i, k*i+k): the layout
`replace_images` needs to swap fresh images in during training (`evf_sam.data.stream`).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

_BITS = 1 << torch.arange(7, -1, -1, dtype=torch.uint8)


@dataclass
class ResidentData:
    """Preprocessed images, ground-truth masks and texts of one synthetic split (see the module docstring)."""

    sam: torch.Tensor
    shapes: torch.Tensor
    beit: torch.Tensor
    masks: torch.Tensor
    image_of: torch.Tensor
    texts: list[str]
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def sam_size(self) -> int:
        return int(self.sam.shape[-1])

    def to(self, device: torch.device | str) -> ResidentData:
        """The same data with every tensor on `device`."""
        return ResidentData(self.sam.to(device), self.shapes.to(device), self.beit.to(device), self.masks.to(device),
                            self.image_of.to(device), self.texts, self.kinds)

    def sam_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised SAM inputs float32 [B,3,S,S] of image rows `images`, padding exactly zero as in `sam_input`."""
        from evf_sam.transforms import normalize_sam

        pixels = normalize_sam(self.sam.index_select(0, images).float())
        size = self.sam_size
        grid = torch.arange(size, device=pixels.device)
        shapes = self.shapes.index_select(0, images).to(pixels.device).long()
        inside = (grid[None, :, None] < shapes[:, 0, None, None]) & (grid[None, None, :] < shapes[:, 1, None, None])
        return pixels * inside[:, None]

    def mask_targets(self, rows: torch.Tensor) -> torch.Tensor:
        """Ground truth float32 [T,S,S] (0/1) of expression rows `rows`."""
        packed = self.masks.index_select(0, rows)
        bits = packed.unsqueeze(-1) & _BITS.to(packed.device)
        return (bits != 0).flatten(-2).float()

    def replace_images(self, slots: torch.Tensor, part: ResidentData) -> torch.Tensor:
        """Put `part`'s images into image rows `slots` (one per image of `part`) and its expressions into those
        images' expression rows; both sides must have the fixed layout of `fill_expressions`. Returns the expression
        rows written (long, on this data's device)."""
        per_image = len(self) // len(self.sam)
        if not (_fixed_layout(self, per_image) and _fixed_layout(part, per_image)):
            raise ValueError("replace_images needs a fixed number of expressions per image (fill_expressions=True)")
        if len(slots) != len(part.sam):
            raise ValueError(f"{len(slots)} slots for {len(part.sam)} images")
        device = self.sam.device
        slots = slots.to(device).long()
        rows = (slots[:, None] * per_image + torch.arange(per_image, device=device)).flatten()
        self.sam.index_copy_(0, slots, part.sam.to(device))
        self.shapes.index_copy_(0, slots, part.shapes.to(device))
        self.beit.index_copy_(0, slots, part.beit.to(device))
        self.masks.index_copy_(0, rows, part.masks.to(device))
        for row, text, kind in zip(rows.tolist(), part.texts, part.kinds):
            self.texts[row] = text
            self.kinds[row] = kind
        return rows

    def save(self, path: str | os.PathLike) -> None:
        """Write everything to one file (torch.save)."""
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ResidentData:
        """Read a file written by `save`."""
        return cls(**torch.load(path, weights_only=False))


def _fixed_layout(data: ResidentData, per_image: int) -> bool:
    """Whether image i of `data` owns exactly expression rows [per_image*i, per_image*(i+1))."""
    expected = torch.arange(len(data), device=data.image_of.device) // per_image
    return len(data) == per_image * len(data.sam) and torch.equal(data.image_of.long(), expected)


def render_part(job: tuple[int, str, int, int, int, int, int, int, bool]) -> dict[str, Any]:
    """Images `start..stop-1` of (seed, split) rendered and preprocessed (numpy arrays; `parts_to_data` joins
    them). job = (seed, split, start, stop, sam_size, beit_size, max_side, expressions, fill_expressions)."""
    from evf_sam.data.synthetic import make_example
    from evf_sam.transforms import beit_input, load_image, resize_longest_side

    seed, split, start, stop, sam_size, beit_size, max_side, expressions, fill = job
    torch.set_num_threads(1)
    sam, shapes, beit, masks, image_of, texts, kinds = [], [], [], [], [], [], []
    for index in range(start, stop):
        scene, chosen = make_example(seed, split, index, expressions=expressions, max_side=max_side)
        if fill:
            if not chosen:
                continue
            chosen = [chosen[i % len(chosen)] for i in range(expressions)]
        encoded = io.BytesIO()
        Image.fromarray(scene.image).save(encoded, format="JPEG", quality=95)
        image = load_image(Image.open(encoded))
        resized = resize_longest_side(image, sam_size)
        h, w = resized.shape[:2]
        frame = np.zeros((sam_size, sam_size, 3), np.uint8)
        frame[:h, :w] = resized
        row = len(sam)
        sam.append(frame.transpose(2, 0, 1))
        shapes.append((h, w))
        beit.append(beit_input(image, beit_size).to(torch.float16).numpy())
        for item in chosen:
            mask = Image.fromarray(scene.union(item["targets"]).astype(np.uint8) * 255)
            small = np.asarray(mask.resize((w, h), Image.Resampling.BILINEAR)) > 127
            full = np.zeros((sam_size, sam_size), bool)
            full[:h, :w] = small
            masks.append(np.packbits(full, axis=1))
            image_of.append(row)
            texts.append(item["text"])
            kinds.append("semantic" if item["semantic"] else item["query"]["kind"])
    return {"sam": np.stack(sam), "shapes": np.array(shapes, np.int16), "beit": np.stack(beit),
            "masks": np.stack(masks), "image_of": np.array(image_of, np.int32), "texts": texts,
            "kinds": kinds}


def parts_to_data(parts: list[dict[str, Any]]) -> ResidentData:
    """`render_part` outputs, in order -> one ResidentData on the CPU."""
    offsets = np.cumsum([0] + [len(p["sam"]) for p in parts[:-1]])
    return ResidentData(
        sam=torch.from_numpy(np.concatenate([p["sam"] for p in parts])),
        shapes=torch.from_numpy(np.concatenate([p["shapes"] for p in parts])),
        beit=torch.from_numpy(np.concatenate([p["beit"] for p in parts])),
        masks=torch.from_numpy(np.concatenate([p["masks"] for p in parts])),
        image_of=torch.from_numpy(np.concatenate([p["image_of"] + o for p, o in zip(parts, offsets)])),
        texts=[t for p in parts for t in p["texts"]], kinds=[k for p in parts for k in p["kinds"]])


def build_synthetic(seed: int, split: str, n_images: int, sam_size: int, beit_size: int = 224, *,
                    max_side: int = 640, expressions: int = 4, fill_expressions: bool = False,
                    workers: int | None = None, progress: bool = True) -> ResidentData:
    """Render images `0..n_images-1` of (seed, split) with the generator and preprocess them (module docstring).

    The scenes and expressions are exactly those `generate_dataset(seed=seed, split=split, max_side=max_side)` writes
    (with `fill_expressions`, repeated to `expressions` per image).
    """
    from tqdm.auto import tqdm

    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    chunk = max(1, min(250, -(-n_images // (4 * workers))))
    jobs = [(seed, split, start, min(n_images, start + chunk), sam_size, beit_size, max_side, expressions,
             fill_expressions) for start in range(0, n_images, chunk)]
    parts: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=n_images, desc=f"render {split}", unit="img", disable=not progress) as bar:
        for job, part in zip(jobs, pool.map(render_part, jobs)):
            parts.append(part)
            bar.update(job[3] - job[2])
    return parts_to_data(parts)
