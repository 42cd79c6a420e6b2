import json

import numpy as np
import pytest
from PIL import Image

from evf_sam.data.layout import (
    DatasetError,
    LayoutDataset,
    Record,
    load_mask,
    read_records,
    save_image,
    save_mask,
    write_records,
)


def _make_dataset(root):
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate([(20, 30), (24, 16)]):
        save_image(root / "images" / f"{i}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for j in range(2):
            mask = rng.random((h, w)) > 0.5
            save_mask(root / "masks" / f"{i}_{j}.png", mask)
            records.append(
                Record(f"images/{i}.png", f"masks/{i}_{j}.png", f"thing {j}", "thing", split="train" if i else "val")
            )
    write_records(root, records)
    return records


def test_round_trip_and_split_filter(tmp_path):
    records = _make_dataset(tmp_path)
    assert read_records(tmp_path) == records
    assert [r.image for r in read_records(tmp_path, split="val")] == ["images/0.png"] * 2
    ds = LayoutDataset(tmp_path, split="train")
    assert len(ds) == 2
    for image, mask, record in ds:
        assert image.mode == "RGB" and image.size == (16, 24)
        assert mask.dtype == bool and mask.shape == (24, 16)
        assert np.array_equal(mask, load_mask(tmp_path / record.mask))


def test_by_image_groups_all_records_of_an_image(tmp_path):
    _make_dataset(tmp_path)
    groups = list(LayoutDataset(tmp_path).by_image())
    assert [len(pairs) for _, pairs in groups] == [2, 2]
    assert [img.size for img, _ in groups] == [(30, 20), (16, 24)]


def test_mask_png_is_single_channel_0_255(tmp_path):
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    save_mask(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "L"
        assert set(np.unique(np.asarray(im))) == {0, 255}
    assert np.array_equal(load_mask(tmp_path / "m.png"), mask)


def test_atomic_writes_leave_no_temp_files(tmp_path):
    _make_dataset(tmp_path)
    write_records(tmp_path, read_records(tmp_path)[:1])
    names = [p.name for p in tmp_path.rglob("*")]
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    assert len(read_records(tmp_path)) == 1


def test_extra_and_correction_fields_are_kept(tmp_path):
    line = {
        "image": "images/a.png", "mask": "masks/a.png", "prompt": "the cat", "label": "Cat",
        "predicted_mask": "masks/a_pred.png", "iou": 0.5, "task_id": 3, "annotation_id": 7,
        "model_version": "evf-demo-abc", "created_at": "2026-01-01T00:00:00Z", "region_id": "xyz", "score": 0.9,
    }
    (tmp_path / "records.jsonl").write_text(json.dumps(line) + "\n\n")
    (record,) = read_records(tmp_path)
    assert record.iou == 0.5 and record.task_id == 3 and record.annotation_id == 7 and record.split is None
    assert record.extra == {"region_id": "xyz", "score": 0.9}
    assert record.to_dict() == line
    write_records(tmp_path, [record])
    assert read_records(tmp_path) == [record]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"image": "a.png", "prompt": "x"}\n', "'mask'"),
        ("not json\n", "records.jsonl:1"),
        ('[1, 2]\n', "JSON object"),
    ],
)
def test_bad_records_name_the_problem(tmp_path, content, needle):
    (tmp_path / "records.jsonl").write_text(content)
    with pytest.raises(DatasetError, match=needle.replace(".", r"\.")):
        read_records(tmp_path)


def test_missing_directory_and_mismatched_mask_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no records.jsonl"):
        LayoutDataset(tmp_path / "nowhere")
    _make_dataset(tmp_path)
    save_mask(tmp_path / "masks" / "0_0.png", np.ones((3, 3), bool))
    with pytest.raises(DatasetError, match="shape"):
        LayoutDataset(tmp_path)[0]
