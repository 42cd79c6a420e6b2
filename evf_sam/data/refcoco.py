"""RefCOCO, RefCOCO+ and RefCOCOg in the standard REFER layout, as `SampleDataset`s (reference §10).

```
refer_seg/                         <- `refer_root`
  refcoco/   refs(unc).p  refs(google).p  instances.json
  refcoco+/  refs(unc).p                  instances.json
  refcocog/  refs(umd).p  refs(google).p  instances.json
  images/mscoco/images/train2014/COCO_train2014_*.jpg     (or pass image_dir)
```
A split is named "dataset|splitBy|split", e.g. "refcoco|unc|val", "refcoco+|unc|testA", "refcocog|umd|test"
("refcocog|val" uses the default splitBy). One sample per (ref, sentence): the sentence lowercased and stripped,
the mask decoded from the referred annotation's COCO polygons or RLE (parts summed, i.e. their union).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from evf_sam.data.layout import DatasetError, Record, SampleDataset

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
IMAGE_DIRS = ("images/mscoco/images/train2014", "images/train2014", "train2014")


class _PlainUnpickler(pickle.Unpickler):
    """The refs pickles hold only lists, dicts, strings and numbers: refuse anything that would run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refs file references {module}.{name}; only plain data is allowed")


def _load_refs(path: str) -> list[dict[str, Any]]:
    """The refs list of a pickle (cached per path and modification time)."""
    return _load_refs_cached(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_refs_cached(path: str, _mtime: int) -> list[dict[str, Any]]:
    for encoding in ("ASCII", "latin1"):  # the official pickles were written by Python 2
        try:
            with open(path, "rb") as fh:
                return _PlainUnpickler(fh, encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise DatasetError(f"cannot read refs file {path}: {exc}") from None
    raise DatasetError(f"cannot decode the strings of refs file {path}")


def _load_instances(path: str) -> dict[str, Any]:
    """Images, annotations and category names of an instances.json, by id (cached per path and mtime)."""
    if not os.path.isfile(path):
        raise DatasetError(f"no {path}")
    return _load_instances_cached(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_instances_cached(path: str, _mtime: int) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    return {
        "images": {img["id"]: img for img in data.get("images", [])},
        "annotations": {ann["id"]: ann for ann in data.get("annotations", [])},
        "categories": {cat["id"]: cat.get("name", str(cat["id"])) for cat in data.get("categories", [])},
    }


def parse_name(name: str) -> tuple[str, str, str]:
    """"refcoco|unc|val" -> ("refcoco", "unc", "val"); "refcocog|val" -> ("refcocog", "umd", "val")."""
    parts = name.split("|")
    if len(parts) == 2 and parts[0] in DEFAULT_SPLIT_BY:
        parts = [parts[0], DEFAULT_SPLIT_BY[parts[0]], parts[1]]
    if len(parts) != 3 or not all(parts):
        raise DatasetError(f"bad RefCOCO split name {name!r}; expected 'dataset|splitBy|split', e.g. 'refcoco|unc|val'")
    return parts[0], parts[1], parts[2]


def list_splits(refer_root: str | os.PathLike) -> list[str]:
    """Every "dataset|splitBy|split" name available under `refer_root` (datasets with a refs(*).p file)."""
    names = []
    for refs_path in sorted(Path(refer_root).glob("*/refs(*).p")):
        dataset, split_by = refs_path.parent.name, refs_path.name[len("refs("):-len(").p")]
        splits = sorted({str(ref["split"]) for ref in _load_refs(str(refs_path))})
        names.extend(f"{dataset}|{split_by}|{split}" for split in splits)
    return names


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons ([[x, y, ...], ...]) or RLE (dict or list of dicts; counts as list or compressed string)
    -> boolean (H, W) mask, the union of all parts."""
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if not isinstance(segmentation, list) or not segmentation:
        raise DatasetError(f"empty or unknown segmentation {type(segmentation).__name__}")
    if isinstance(segmentation[0], list):
        # pycocotools reads a 4-number list as a box, so drop degenerate polygons (fewer than 3 points).
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rles = coco_mask.frPyObjects(polygons, height, width)
    else:
        rles = []
        for rle in segmentation:
            if isinstance(rle.get("counts"), list):
                rles.append(coco_mask.frPyObjects(rle, *rle["size"]))
            else:
                counts = rle["counts"]
                rles.append({"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts})
    with warnings.catch_warnings():
        # pycocotools 2.0.11 calls np.array(copy=False) internally; numpy 2 warns, the result is unaffected.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = coco_mask.decode(rles)  # (H, W, parts)
    return decoded.reshape(decoded.shape[0], decoded.shape[1], -1).any(axis=2)


class RefCocoDataset(SampleDataset):
    """One RefCOCO-family split; yields `Sample(image, mask, record)` per (ref, sentence).

    Records: `image` is the COCO file name (relative to `image_dir`), `mask` is "annotation:<ann_id>",
    `prompt` the lowercased sentence, `label` the COCO category, `split` the split; `extra` holds
    `dataset` (the full name), `ref_id`, `ann_id`, `sent_id`, `image_id`.
    """

    def __init__(self, refer_root: str | os.PathLike, name: str, image_dir: str | os.PathLike | None = None):
        self.refer_root = Path(refer_root)
        self.name = name
        dataset, split_by, split = parse_name(name)
        refs_path = self.refer_root / dataset / f"refs({split_by}).p"
        if not refs_path.is_file():
            available = ", ".join(list_splits(self.refer_root)) if self.refer_root.is_dir() else "none"
            raise DatasetError(f"no {refs_path} (available splits: {available})")
        refs = [r for r in _load_refs(str(refs_path)) if r["split"] == split]
        if not refs:
            raise DatasetError(f"split {split!r} has no refs in {refs_path}; available: {list_splits(self.refer_root)}")
        self._instances = _load_instances(str(self.refer_root / dataset / "instances.json"))
        self.image_dir = Path(image_dir) if image_dir else self._find_image_dir()
        self.records = [record for ref in refs for record in self._records(ref, split)]

    def _find_image_dir(self) -> Path:
        for rel in IMAGE_DIRS:
            if (self.refer_root / rel).is_dir():
                return self.refer_root / rel
        tried = ", ".join(str(self.refer_root / rel) for rel in IMAGE_DIRS)
        raise DatasetError(f"COCO train2014 images not found (tried {tried}); pass image_dir")

    def _records(self, ref: dict[str, Any], split: str) -> list[Record]:
        image = self._instances["images"].get(ref["image_id"])
        ann = self._instances["annotations"].get(ref["ann_id"])
        if image is None or ann is None:
            raise DatasetError(f"ref {ref.get('ref_id')} names image {ref['image_id']} / annotation {ref['ann_id']} "
                               "missing from instances.json")
        label = self._instances["categories"].get(ann.get("category_id", ref.get("category_id")), "")
        extra = {"dataset": self.name, "ref_id": ref.get("ref_id"), "ann_id": ann["id"], "image_id": image["id"]}
        return [
            Record(image=image["file_name"], mask=f"annotation:{ann['id']}", prompt=_sentence(sent), label=label,
                   split=split, extra={**extra, "sent_id": sent.get("sent_id")})
            for sent in ref["sentences"]
        ]

    def image_path(self, record: Record) -> Path:
        return self.image_dir / record.image

    def load_mask(self, record: Record) -> np.ndarray:
        ann = self._instances["annotations"][record.extra["ann_id"]]
        image = self._instances["images"][record.extra["image_id"]]
        return decode_segmentation(ann["segmentation"], image["height"], image["width"])


def _sentence(sent: dict[str, Any]) -> str:
    text = sent.get("sent") or sent.get("raw") or ""
    return str(text).strip().lower()
