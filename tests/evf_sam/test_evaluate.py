"""evf_sam.evaluate: per-split cIoU / gIoU through the predictor, JSON + Markdown output, layout and RefCOCO data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import evf_sam
from evf_sam.data.layout import LayoutDataset, Record, save_image, save_mask, write_records
from evf_sam.evaluate import evaluate, open_datasets, run


@pytest.fixture(scope="module")
def layout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three images (two train, one val) with two expressions each, plus one image without a split."""
    root = tmp_path_factory.mktemp("layout")
    rng = np.random.default_rng(1)
    records = []
    for i, split in enumerate(["train", "train", "val", None]):
        image = rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)
        save_image(root / f"images/{i}.png", image)
        for k in range(2):
            mask = np.zeros(image.shape[:2], bool)
            mask[5 + 10 * k:20 + 10 * k, 10:30] = True
            save_mask(root / f"masks/{i}_{k}.png", mask)
            records.append(Record(f"images/{i}.png", f"masks/{i}_{k}.png", f"object {k}", "Thing", split))
    write_records(root, records)
    return root


def _reference_metrics(checkpoint: Path, root: Path, split: str | None) -> tuple[float, float]:
    """cIoU / gIoU computed pair by pair with EvfPredictor.predict (no batching)."""
    predictor = evf_sam.EvfPredictor(evf_sam.load_model(checkpoint))
    inter, union, ious = 0, 0, []
    for image, mask, record in LayoutDataset(root, split):
        if split is None and record.split is not None:
            continue
        pred = predictor.predict(image, [record.prompt])[0].mask
        i, u = int((pred & mask).sum()), int((pred | mask).sum())
        inter, union = inter + i, union + u
        ious.append(i / u if u else 1.0)
    return inter / union, float(np.mean(ious))


def test_every_split_is_scored_like_pairwise_prediction(tiny_checkpoint, layout_dir):
    result = evaluate(tiny_checkpoint(), layout_dir, images_per_batch=2, progress=False)
    assert list(result["splits"]) == ["all", "train", "val"]
    assert [r["pairs"] for r in result["splits"].values()] == [2, 4, 2]
    for name, split in (("train", "train"), ("val", "val"), ("all", None)):
        ciou, giou = _reference_metrics(tiny_checkpoint(), layout_dir, split)
        assert result["splits"][name]["ciou"] == pytest.approx(ciou)
        assert result["splits"][name]["giou"] == pytest.approx(giou)
    assert result["model_version"].endswith(evf_sam.load_model(tiny_checkpoint()).fingerprint)


def test_cli_writes_json_and_markdown(tiny_checkpoint, layout_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    code = run(["--checkpoint", str(tiny_checkpoint()), "--data", str(layout_dir), "--split", "val",
                "--output", str(out_json), "--markdown", str(out_md), "--no-progress"])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert list(data["splits"]) == ["val"] and data["splits"]["val"]["pairs"] == 2
    assert data["checkpoint"] == str(tiny_checkpoint())
    table = out_md.read_text()
    assert table.startswith("| split | pairs | cIoU | gIoU |") and "| val | 2 |" in table
    assert table in capsys.readouterr().out


def test_bad_data_argument_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    assert run(["--checkpoint", str(tiny_checkpoint()), "--data", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "neither a dataset directory" in capsys.readouterr().err
    assert run(["--checkpoint", str(tiny_checkpoint()), "--data", "refcoco|unc|val", "--no-progress"]) == 2
    assert "--refer-root" in capsys.readouterr().err


def test_refcoco_split(tiny_checkpoint, tmp_path):
    """A minimal REFER tree (one image, two refs in val) is evaluated under its spec name."""
    root = tmp_path / "refer_seg"
    images = root / "images/mscoco/images/train2014"
    images.mkdir(parents=True)
    save_image(images / "COCO_train2014_000000000001.jpg", np.full((48, 64, 3), 128, np.uint8))
    (root / "refcoco").mkdir()
    polygon = [[4.0, 4.0, 30.0, 4.0, 30.0, 30.0, 4.0, 30.0]]
    instances = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 48, "width": 64}],
                 "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "segmentation": polygon,
                                  "iscrowd": 0, "bbox": [4, 4, 26, 26], "area": 676}],
                 "categories": [{"id": 1, "name": "box"}]}
    (root / "refcoco/instances.json").write_text(json.dumps(instances))
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 1,
             "file_name": "COCO_train2014_000000000001_1.jpg",
             "sentences": [{"sent_id": 1, "sent": "The Box ", "raw": "The Box"},
                           {"sent_id": 2, "sent": "grey square", "raw": "grey square"}]}]
    with open(root / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    datasets = open_datasets("refcoco|unc|val", refer_root=root)
    assert list(datasets) == ["refcoco|unc|val"]
    result = evaluate(tiny_checkpoint(), "refcoco|unc|val", refer_root=root, progress=False)
    assert result["splits"]["refcoco|unc|val"]["pairs"] == 2
