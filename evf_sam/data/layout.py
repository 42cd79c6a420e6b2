"""The dataset layout shared by training, evaluation and the corrections capture (ARCHITECTURE §6).

```
root/
  images/          the images (any format PIL reads)
  masks/           ground-truth masks: PNG, single channel, 0 = background, 255 = foreground
  records.jsonl    one JSON object per (image, expression)
```
Every record has `image` and `mask` (paths relative to `root`), `prompt`, `label`, and optionally `split`
("train"/"val"/"test"), `semantic` (the prompt asks for the union of all matching instances: multitask
"[semantic]" mode), the corrections fields (`predicted_mask`, `iou`, `model_version`, `task_id`, `annotation_id`,
`image_hash`, `created_at`, `updated_at`) and any other keys, kept verbatim in `Record.extra`.
Every file is replaced atomically (write a temp file, fsync, rename), so readers never see half a file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from evf_sam.errors import EvfError

RECORDS_FILE = "records.jsonl"
IMAGES_DIR = "images"
MASKS_DIR = "masks"


class DatasetError(EvfError):
    """A dataset directory, record or mask file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One (image, expression) pair; paths are relative to the dataset root. Unknown keys live in `extra`."""

    image: str
    mask: str
    prompt: str
    label: str = ""
    split: str | None = None
    semantic: bool = False
    predicted_mask: str | None = None
    iou: float | None = None
    model_version: str | None = None
    task_id: int | None = None
    annotation_id: int | None = None
    image_hash: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Build a record from a decoded JSON object; raises DatasetError naming a missing or mistyped field."""
        if not isinstance(data, dict):
            raise DatasetError(f"a record must be a JSON object, got {type(data).__name__}")
        for key in ("image", "mask", "prompt"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise DatasetError(f"record field {key!r} must be a non-empty string, got {data.get(key)!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["label"] = str(values.get("label") or "")
        values["semantic"] = bool(values.get("semantic", False))
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record: known fields (None and default `semantic=False` left out) then `extra`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None or (f.name == "semantic" and not value):
                continue
            out[f.name] = value
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out


class Sample(NamedTuple):
    """What every dataset yields: the RGB image, its boolean (H, W) ground-truth mask, and the record."""

    image: Image.Image
    mask: np.ndarray
    record: Record


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically: temp file in the same directory, fsync, rename, fsync the directory.

    durable=False skips the fsyncs (still atomic for readers, not crash-safe): for bulk generated files that
    only become reachable once the durably written records.jsonl names them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_records(root: str | os.PathLike, split: str | None = None) -> list[Record]:
    """Read `root/records.jsonl` (blank lines skipped); keep only records of `split` when given."""
    path = Path(root) / RECORDS_FILE
    if not path.is_file():
        raise DatasetError(f"no {RECORDS_FILE} in dataset directory {Path(root)}")
    records = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = Record.from_dict(json.loads(line))
            except (json.JSONDecodeError, DatasetError, TypeError) as exc:
                raise DatasetError(f"{path}:{line_no}: bad record: {exc}") from None
            if split is None or record.split == split:
                records.append(record)
    return records


def write_records(root: str | os.PathLike, records: Iterable[Record]) -> None:
    """Atomically replace `root/records.jsonl` with `records`, one JSON object per line."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records]
    atomic_write_bytes(Path(root) / RECORDS_FILE, "".join(lines).encode("utf-8"))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask image as a boolean (H, W) array (pixel value >= 128 is foreground)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) >= 128
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}") from None


def save_mask(path: str | os.PathLike, mask: np.ndarray, *, durable: bool = True) -> None:
    """Atomically write a boolean / 0-1 (H, W) mask as a single-channel 0/255 PNG (durable: see atomic_write_bytes)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    pixels = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8))  # uint8 (H, W) -> mode "L"
    _save_pil(path, pixels, "PNG", {"compress_level": 1}, durable)


def save_image(path: str | os.PathLike, image: Image.Image | np.ndarray, *, durable: bool = True,
               **save_kwargs: Any) -> None:
    """Atomically write an image; the format follows the suffix (`.png`, `.jpg` ...), `save_kwargs` go to PIL."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image format for {path}")
    _save_pil(path, image, fmt, save_kwargs, durable)


def _save_pil(path: str | os.PathLike, image: Image.Image, fmt: str, kwargs: dict[str, Any], durable: bool) -> None:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    atomic_write_bytes(path, buf.getvalue(), durable=durable)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, EXIF-transposed (the orientation the predictor uses)."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


class SampleDataset:
    """Records plus loaders for their images and masks: indexable, iterable, and groupable by image.

    Subclasses set `self.records` and implement `image_path` and `load_mask`; evaluation and training
    only use this interface, so they run unchanged on the layout, synthetic data and RefCOCO.
    """

    records: Sequence[Record]

    def image_path(self, record: Record) -> Path:
        """Where the image of `record` is on disk."""
        raise NotImplementedError

    def load_mask(self, record: Record) -> np.ndarray:
        """The boolean (H, W) ground-truth mask of `record`."""
        raise NotImplementedError

    def load_image(self, record: Record) -> Image.Image:
        """The RGB, EXIF-transposed image of `record`."""
        return load_image(self.image_path(record))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        return self._sample(self.load_image(record), record)

    def __iter__(self) -> Iterator[Sample]:
        """Samples in record order; an image shared by consecutive records is decoded once."""
        last_path, image = None, None
        for record in self.records:
            path = self.image_path(record)
            if path != last_path:
                last_path, image = path, self.load_image(record)
            yield self._sample(image, record)

    def by_image(self) -> Iterator[tuple[Image.Image, list[tuple[np.ndarray, Record]]]]:
        """One item per distinct image (first-seen order): the image and all its (mask, record) pairs."""
        groups: dict[Path, list[Record]] = {}
        for record in self.records:
            groups.setdefault(self.image_path(record), []).append(record)
        for records in groups.values():
            image = self.load_image(records[0])
            yield image, [(s.mask, s.record) for s in (self._sample(image, r) for r in records)]

    def _sample(self, image: Image.Image, record: Record) -> Sample:
        mask = self.load_mask(record)
        if mask.shape != (image.height, image.width):
            raise DatasetError(
                f"mask of {record.prompt!r} has shape {mask.shape}, image {self.image_path(record)} "
                f"is {image.height}x{image.width}"
            )
        return Sample(image, mask, record)


class LayoutDataset(SampleDataset):
    """A dataset directory in the layout above, optionally restricted to one split."""

    def __init__(self, root: str | os.PathLike, split: str | None = None):
        self.root = Path(root)
        self.split = split
        self.records = read_records(self.root, split)

    def image_path(self, record: Record) -> Path:
        return self.root / record.image

    def load_mask(self, record: Record) -> np.ndarray:
        return load_mask(self.root / record.mask)


class ConcatDataset(SampleDataset):
    """Several layout datasets read as one (records keep their own roots)."""

    def __init__(self, parts: Sequence[LayoutDataset]) -> None:
        self.parts = list(parts)
        self.records = [r for p in self.parts for r in p.records]
        self._owner = {id(r): p for p in self.parts for r in p.records}

    def _part(self, record: Record) -> LayoutDataset:
        return self._owner[id(record)]

    def image_path(self, record: Record) -> Path:
        return self._part(record).image_path(record)

    def load_mask(self, record: Record) -> np.ndarray:
        return self._part(record).load_mask(record)


def concat_datasets(parts: Sequence[LayoutDataset]) -> SampleDataset:
    """One dataset reading all of `parts` (the part itself when there is one)."""
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
