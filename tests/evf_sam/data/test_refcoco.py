import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from evf_sam.data.layout import DatasetError
from evf_sam.data.refcoco import RefCocoDataset, decode_segmentation, list_splits, parse_name

H, W = 12, 14


def _uncompressed_rle(mask):
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with background."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": [mask.shape[0], mask.shape[1]], "counts": ([0] + runs) if flat[0] else runs}


def _compressed_rle(mask):
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def masks():
    two_parts = np.zeros((H, W), bool)
    two_parts[3:8, 2:10] = True
    two_parts[9:11, 11:13] = True
    rle_mask = np.zeros((H, W), bool)
    rle_mask[0:4, 5:7] = True
    rle_mask[6, :] = True
    crowd = np.zeros((H, W), bool)
    crowd[2:5, 1:3] = True
    crowd[8:12, 10:14] = True
    return {1: two_parts, 2: rle_mask, 3: crowd}


@pytest.fixture
def refer_root(tmp_path, masks):
    root = tmp_path / "refer_seg"
    images_dir = root / "images/mscoco/images/train2014"
    images_dir.mkdir(parents=True)
    names = {100: "COCO_train2014_000000000100.jpg", 200: "COCO_train2014_000000000200.jpg"}
    for image_id, name in names.items():
        Image.new("RGB", (W, H), (image_id % 255, 0, 0)).save(images_dir / name)
    instances = {
        "images": [{"id": i, "file_name": n, "height": H, "width": W} for i, n in names.items()],
        "annotations": [
            {"id": 1, "image_id": 100, "category_id": 7, "iscrowd": 0,
             "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8], [11, 9, 13, 9, 13, 11, 11, 11]]},
            {"id": 2, "image_id": 100, "category_id": 8, "iscrowd": 1, "segmentation": _uncompressed_rle(masks[2])},
            {"id": 3, "image_id": 200, "category_id": 7, "iscrowd": 1, "segmentation": _compressed_rle(masks[3])},
        ],
        "categories": [{"id": 7, "name": "cup"}, {"id": 8, "name": "person"}],
    }

    def ref(ref_id, ann_id, image_id, split, *sents):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 7,
                "file_name": f"{names[image_id][:-4]}_{ann_id}.jpg",
                "sentences": [{"sent_id": ref_id * 10 + k, "sent": s, "raw": s.upper()} for k, s in enumerate(sents)]}

    refs = [
        ref(1, 1, 100, "val", "  The Red CUP ", "cup on the left"),
        ref(2, 2, 100, "testA", "man in white"),
        ref(3, 3, 200, "val", "Two cups"),
        ref(4, 1, 100, "train", "the cup"),
    ]
    for dataset, split_by in (("refcoco", "unc"), ("refcocog", "umd")):
        (root / dataset).mkdir()
        (root / dataset / "instances.json").write_text(json.dumps(instances))
        with open(root / dataset / f"refs({split_by}).p", "wb") as fh:
            pickle.dump(refs, fh, protocol=2)
    return root


def test_val_split_yields_every_sentence_with_its_mask(refer_root, masks):
    ds = RefCocoDataset(refer_root, "refcoco|unc|val")
    assert [r.prompt for r in ds.records] == ["the red cup", "cup on the left", "two cups"]
    assert [r.label for r in ds.records] == ["cup", "cup", "cup"]
    samples = list(ds)
    assert np.array_equal(samples[0].mask, masks[1])  # polygons, two parts summed
    assert np.array_equal(samples[2].mask, masks[3])  # compressed RLE string
    assert samples[0].image.size == (W, H) and samples[0].image.mode == "RGB"
    assert samples[2].record.extra["ref_id"] == 3 and samples[2].record.split == "val"


def test_split_filtering_and_uncompressed_rle(refer_root, masks):
    ds = RefCocoDataset(refer_root, "refcoco|unc|testA")
    (sample,) = list(ds)
    assert sample.record.prompt == "man in white" and sample.record.label == "person"
    assert np.array_equal(sample.mask, masks[2])
    assert len(RefCocoDataset(refer_root, "refcoco|unc|train")) == 1


def test_by_image_groups_sentences_of_one_image(refer_root):
    groups = list(RefCocoDataset(refer_root, "refcocog|val").by_image())
    assert [len(pairs) for _, pairs in groups] == [2, 1]


def test_split_names(refer_root):
    assert parse_name("refcocog|val") == ("refcocog", "umd", "val")
    assert parse_name("refcoco+|unc|testB") == ("refcoco+", "unc", "testB")
    assert list_splits(refer_root) == [
        "refcoco|unc|testA", "refcoco|unc|train", "refcoco|unc|val",
        "refcocog|umd|testA", "refcocog|umd|train", "refcocog|umd|val",
    ]
    with pytest.raises(DatasetError, match="dataset\\|splitBy\\|split"):
        parse_name("refcoco")
    with pytest.raises(DatasetError, match="no refs"):
        RefCocoDataset(refer_root, "refcoco|unc|testB")
    with pytest.raises(DatasetError, match="available splits: refcoco\\|unc\\|testA"):
        RefCocoDataset(refer_root, "refcoco+|unc|val")


def test_missing_images_and_code_in_pickles_are_refused(refer_root, tmp_path):
    os.rename(refer_root / "images", tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match="pass image_dir"):
        RefCocoDataset(refer_root, "refcoco|unc|val")
    ds = RefCocoDataset(refer_root, "refcoco|unc|val", image_dir=tmp_path / "elsewhere/mscoco/images/train2014")
    assert len(list(ds)) == 3
    (refer_root / "refcoco+").mkdir()
    with open(refer_root / "refcoco+" / "refs(unc).p", "wb") as fh:
        pickle.dump([os.getcwd], fh, protocol=2)  # a reference to a callable: must not be resolved
    with pytest.raises(DatasetError, match="only plain data"):
        RefCocoDataset(refer_root, "refcoco+|unc|val")


def test_decode_segmentation_edge_cases():
    assert not decode_segmentation([[1, 1, 5, 5]], 8, 8).any()  # a 2-point "polygon" is degenerate, not a box
    with pytest.raises(DatasetError):
        decode_segmentation([], 8, 8)
