"""Deterministic synthetic referring-segmentation data in the dataset layout (`evf_sam.data.layout`).

Each image shows 2-6 textured shapes on a cluttered background (`scenes`); each record pairs it with one
unambiguous expression (`expressions`) and the VISIBLE mask of the object it names, or, for semantic prompts
(`semantic=true`, e.g. "all red shapes"), the union of all matching objects. Images are a pure function of
(seed, split, index), so the same arguments give byte-identical files.

Optional narrowing for a "project" (all defaults leave the output unchanged): a `SceneStyle` (`scenes`) shifts the
visual domain, and `labels` replaces the referring expressions by a fixed label set, as a Label Studio project whose
prompts are its label names: each label present in an image gives one semantic record whose prompt is the label name
and whose mask is the union of the objects the label stands for.

    python -m evf_sam.data.synthetic --out data/synth --images 2000 --seed 0 --split train
"""

from __future__ import annotations

import argparse
import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evf_sam.data import expressions as ex
from evf_sam.data.layout import (
    IMAGES_DIR,
    MASKS_DIR,
    RECORDS_FILE,
    Record,
    atomic_write_bytes,
    read_records,
    save_image,
    save_mask,
    write_records,
)
from evf_sam.data.scenes import DEFAULT_STYLE, Scene, SceneStyle, sample_scene

SCENES_FILE = "scenes.jsonl"
KINDS = ("attribute", "position", "superlative", "relation")


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split` (the split name is mixed in, so splits never share images)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def make_example(seed: int, split: str, index: int, *, expressions: int = 4, semantic_ratio: float = 0.2,
                 min_side: int = 160, max_side: int = 640, style: SceneStyle = DEFAULT_STYLE,
                 labels: Mapping[str, Mapping[str, str]] | None = None) -> tuple[Scene, list[dict[str, Any]]]:
    """Render one scene and pick its expressions.

    Returns the scene and up to `expressions` dicts {"text", "query", "targets" (object ids), "semantic"}; each
    referring query resolves to exactly its one target, a semantic one to all its targets (the GT is their union).
    With `labels` ({label name: attributes, e.g. {"star": {"shape": "star"}}}), the expressions are instead the
    labels present in the scene (text = label name, semantic, targets = every matching object), in `labels` order.
    """
    rng = scene_rng(seed, split, index)
    scene = sample_scene(rng, min_side, max_side, style=style)
    if labels is not None:
        return scene, _label_expressions(scene, labels)[:expressions]
    options = ex.valid_queries(scene.objects, min(scene.width, scene.height))
    chosen: list[dict[str, Any]] = []
    used_targets: set[int] = set()
    for _ in range(expressions):
        semantic = rng.random() < semantic_ratio
        kinds = ["semantic"] if semantic else [k for k in KINDS if any(q["kind"] == k for q, _, _ in options)]
        pool = [o for o in options if o[0]["kind"] in kinds] if kinds else []
        if not pool:
            continue
        kind = kinds[int(rng.integers(len(kinds)))]
        pool = [o for o in pool if o[0]["kind"] == kind]
        weights = np.array([w * (0.2 if set(ids) <= used_targets else 1.0) for _, ids, w in pool])
        query, ids, _ = pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
        options = [o for o in options if o[0] is not query]
        used_targets.update(ids)
        chosen.append({"text": ex.describe(query, rng), "query": query, "targets": ids, "semantic": semantic})
    return scene, chosen


def _label_expressions(scene: Scene, labels: Mapping[str, Mapping[str, str]]) -> list[dict[str, Any]]:
    chosen = []
    for name, attrs in labels.items():
        query = {"kind": "semantic", "attrs": dict(attrs)}
        targets = ex.matches(query["attrs"], scene.objects)
        if targets:
            chosen.append({"text": name, "query": query, "targets": targets, "semantic": True, "label": name})
    return chosen


def generate_dataset(root: str | os.PathLike, n_images: int, seed: int = 0, split: str = "train", *,
                     expressions: int = 4, semantic_ratio: float = 0.2, min_side: int = 160, max_side: int = 640,
                     image_format: str = "jpg", style: SceneStyle = DEFAULT_STYLE,
                     labels: Mapping[str, Mapping[str, str]] | None = None, progress: bool = True) -> list[Record]:
    """Write `n_images` scenes of `split` into the layout at `root`; returns this split's records.

    Records of other splits already in `root` are kept (generate train and val into one directory); those of
    `split` are replaced. Images are JPEG (quality 95) or PNG (`image_format="png"`); masks are 0/255 PNGs.
    Each record carries extra fields `kind`, `query`, `targets` and `scene_index`; `scenes.jsonl` describes
    every object (attributes, centre, radius, bbox, full and visible area). `style` and `labels`: `make_example`;
    label records carry the label name as their `label`.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", split):
        raise ValueError(f"split name {split!r} must be letters, digits, '.' or '-' (it becomes part of file names)")
    root = Path(root)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (root / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    scenes: list[str] = []
    save_kwargs = {"quality": 95} if image_format in ("jpg", "jpeg") else {}
    for index in tqdm(range(n_images), desc=f"synthetic {split}", unit="img", disable=not progress):
        scene, chosen = make_example(seed, split, index, expressions=expressions, semantic_ratio=semantic_ratio,
                                     min_side=min_side, max_side=max_side, style=style, labels=labels)
        stem = f"{split}_{index:06d}"
        image = f"{IMAGES_DIR}/{stem}.{image_format}"
        save_image(root / image, scene.image, durable=False, **save_kwargs)
        for k, item in enumerate(chosen):
            mask = f"{MASKS_DIR}/{stem}_{k}.png"
            save_mask(root / mask, scene.union(item["targets"]), durable=False)
            shapes = {scene.objects[i].shape for i in item["targets"]}
            label = item.get("label") or (shapes.pop() if len(shapes) == 1 else "shape")
            records.append(Record(
                image=image, mask=mask, prompt=item["text"], label=label,
                split=split, semantic=item["semantic"],
                extra={"kind": item["query"]["kind"], "query": item["query"], "targets": item["targets"],
                       "scene_index": index},
            ))
        scenes.append(json.dumps({"split": split, "index": index, "image": image, "width": scene.width,
                                  "height": scene.height, "objects": [o.to_dict() for o in scene.objects]}))
    _merge_split(root, split, records, scenes)
    return records


def _merge_split(root: Path, split: str, records: list[Record], scenes: list[str]) -> None:
    kept = [r for r in read_records(root) if r.split != split] if (root / RECORDS_FILE).is_file() else []
    old_scenes = (root / SCENES_FILE).read_text().splitlines() if (root / SCENES_FILE).is_file() else []
    kept_scenes = [line for line in old_scenes if line and json.loads(line).get("split") != split]
    atomic_write_bytes(root / SCENES_FILE, "".join(f"{s}\n" for s in kept_scenes + scenes).encode())
    write_records(root, kept + records)
    # Files of an earlier, larger run of this split are no longer referenced: remove them.
    referenced = {r.image for r in records} | {r.mask for r in records}
    ours = re.compile(rf"{re.escape(split)}_\d{{6,}}(_\d+)?\.(jpg|png)")
    for folder in (IMAGES_DIR, MASKS_DIR):
        for path in (root / folder).iterdir():
            if ours.fullmatch(path.name) and f"{folder}/{path.name}" not in referenced:
                path.unlink()


def text_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """`n` random expressions of every kind plus every vocabulary word: training text for the demo tokenizer."""
    rng = np.random.default_rng(seed)
    return [ex.describe(ex.random_query(rng), rng) for _ in range(n)] + ex.vocabulary()


vocabulary = ex.vocabulary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evf_sam.data.synthetic",
        description="Generate a deterministic synthetic referring-segmentation dataset (images/, masks/, "
        "records.jsonl). Same arguments give byte-identical files; different splits never share images.",
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset directory (created; other splits kept)")
    parser.add_argument("--images", required=True, type=int, help="number of images to generate")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--split", default="train", help="split name written into the records (default: train)")
    parser.add_argument("--expressions", type=int, default=4, help="expressions per image (default: 4)")
    parser.add_argument("--semantic-ratio", type=float, default=0.2,
                        help="fraction of semantic prompts ('all red shapes', GT = union); 0 disables (default: 0.2)")
    parser.add_argument("--min-side", type=int, default=160, help="smallest image side in pixels (default: 160)")
    parser.add_argument("--max-side", type=int, default=640, help="largest image side in pixels (default: 640)")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image file format (default: jpg)")
    parser.add_argument("--corpus", type=Path, help="also write a text corpus (one expression a line) here")
    args = parser.parse_args(argv)
    if args.images < 0 or args.expressions < 1 or not 0 <= args.semantic_ratio <= 1:
        parser.error("--images must be >= 0, --expressions >= 1, --semantic-ratio in [0, 1]")
    if not 32 <= args.min_side <= args.max_side:
        parser.error("need 32 <= --min-side <= --max-side")
    records = generate_dataset(args.out, args.images, args.seed, args.split, expressions=args.expressions,
                               semantic_ratio=args.semantic_ratio, min_side=args.min_side, max_side=args.max_side,
                               image_format=args.format)
    if args.corpus:
        atomic_write_bytes(args.corpus, "".join(f"{line}\n" for line in text_corpus(seed=args.seed)).encode())
    print(f"wrote {args.images} images, {len(records)} records of split {args.split!r} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
