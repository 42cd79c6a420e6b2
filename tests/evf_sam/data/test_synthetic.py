import math

import numpy as np
import pytest

from evf_sam.data import expressions as ex
from evf_sam.data.layout import LayoutDataset, read_records
from evf_sam.data.synthetic import generate_dataset, main, make_example, text_corpus, vocabulary

INDICES = range(12)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seeds_or_splits_differ(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_dataset(a, 3, seed=5, split="train", progress=False)
    generate_dataset(b, 3, seed=5, split="train", progress=False)
    generate_dataset(c, 3, seed=6, split="train", progress=False)
    assert _files(a) == _files(b)
    assert _files(a)["images/train_000000.jpg"] != _files(c)["images/train_000000.jpg"]
    val, _ = make_example(5, "val", 0)
    train, _ = make_example(5, "train", 0)
    assert val.image.shape != train.image.shape or not np.array_equal(val.image, train.image)


def _holds_independently(query, target, objects):
    """Re-check a referring query against the scene description, without the generator's resolver."""
    by_id = {o.id: o for o in objects}
    cands = [o for o in objects if all(getattr(o, k) == v for k, v in query["attrs"].items())]
    t = by_id[target]
    kind = query["kind"]
    if kind == "attribute":
        return cands == [t]
    if kind == "position":
        (other,) = [o for o in cands if o is not t]
        return {"left": t.cx < other.cx, "right": t.cx > other.cx,
                "top": t.cy < other.cy, "bottom": t.cy > other.cy}[query["side"]]
    if kind == "superlative":
        key = {"leftmost": lambda o: o.cx, "rightmost": lambda o: -o.cx, "topmost": lambda o: o.cy,
               "bottommost": lambda o: -o.cy, "largest": lambda o: -o.area, "smallest": lambda o: o.area}
        return len(cands) >= 2 and min(cands, key=key[query["order"]]) is t
    (ref,) = [o for o in objects if all(getattr(o, k) == v for k, v in query["ref"].items())]
    others = [o for o in cands if o is not t and o is not ref]
    if query["relation"] == "near":
        dist = lambda o: math.hypot(o.cx - ref.cx, o.cy - ref.cy)  # noqa: E731
        return all(dist(o) > dist(t) for o in others)
    sign = {"left_of": (-1, 0), "right_of": (1, 0), "above": (0, -1), "below": (0, 1)}[query["relation"]]
    offset = lambda o: sign[0] * (o.cx - ref.cx) + sign[1] * (o.cy - ref.cy)  # noqa: E731
    return offset(t) > 0 and all(offset(o) < 0 for o in others)


def test_every_expression_names_exactly_its_target_and_the_mask_is_its_visible_part():
    kinds = set()
    for index in INDICES:
        scene, chosen = make_example(0, "train", index, expressions=6, semantic_ratio=0.3)
        assert chosen
        for item in chosen:
            query, targets = item["query"], item["targets"]
            kinds.add(query["kind"])
            mask = scene.union(targets)
            assert mask.any()
            if item["semantic"]:
                assert query["kind"] == "semantic"
                assert targets == [o.id for o in scene.objects
                                   if all(getattr(o, k) == v for k, v in query["attrs"].items())]
            else:
                assert len(targets) == 1, item
                assert _holds_independently(query, targets[0], scene.objects), item
                assert ex.resolve(query, scene.objects) == targets
                assert np.array_equal(mask, scene.masks[targets[0]])
            words = item["text"].split()
            if "colour" in query["attrs"]:
                assert set(ex.COLOUR_WORDS[query["attrs"]["colour"]]) & set(words), item
    assert kinds == {"attribute", "position", "superlative", "relation", "semantic"}


def test_masks_are_visible_parts_disjoint_and_sizes_vary():
    sizes = set()
    for index in INDICES:
        scene, _ = make_example(1, "train", index)
        sizes.add((scene.width, scene.height))
        assert 160 <= scene.width <= 640 and 160 <= scene.height <= 640
        assert 2 <= len(scene.objects) <= 6
        total = np.zeros(scene.image.shape[:2], int)
        for obj, mask in zip(scene.objects, scene.masks):
            total += mask
            assert mask.sum() == obj.visible_area >= 0.6 * obj.area > 0
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = obj.bbox
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert total.max() == 1  # occluded parts belong to the object on top only
    assert len(sizes) == len(INDICES)


def test_solid_objects_are_painted_exactly_where_their_masks_are():
    checked = 0
    for index in INDICES:
        scene, _ = make_example(4, "train", index)
        for obj, mask in zip(scene.objects, scene.masks):
            if obj.texture != "solid":
                continue
            pixels = scene.image[mask].astype(int)
            colour = np.median(pixels, axis=0)
            assert np.abs(pixels - colour).max() <= 25  # colour + pixel noise only: no background inside the mask
            checked += 1
    assert checked >= 3


def test_dataset_on_disk_matches_the_generator(tmp_path):
    records = generate_dataset(tmp_path, 4, seed=2, split="val", semantic_ratio=0.5, progress=False)
    generate_dataset(tmp_path, 2, seed=2, split="train", progress=False)
    generate_dataset(tmp_path, 3, seed=2, split="val", semantic_ratio=0.5, progress=False)
    assert {r.split for r in read_records(tmp_path)} == {"train", "val"}
    on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*")}
    assert on_disk == {r.image for r in read_records(tmp_path)} | {r.mask for r in read_records(tmp_path)}
    val = LayoutDataset(tmp_path, split="val")
    assert len(val) == len([r for r in records if r.extra["scene_index"] < 3])
    assert any(r.semantic for r in val.records)
    for image, mask, record in val:
        scene, chosen = make_example(2, "val", record.extra["scene_index"], semantic_ratio=0.5)
        assert image.size == (scene.width, scene.height)
        item = next(c for c in chosen if c["text"] == record.prompt)
        assert np.array_equal(mask, scene.union(item["targets"]))
        assert record.semantic == item["semantic"]
        if not record.semantic:
            assert record.label == scene.objects[item["targets"][0]].shape


def test_split_names_that_would_break_file_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="split name"):
        generate_dataset(tmp_path, 1, split="../x", progress=False)


def test_corpus_covers_the_vocabulary():
    sentences = text_corpus(2000, seed=0)[:2000]
    words = {w for line in sentences for w in line.split()}
    assert words == set(vocabulary())
    assert {"circle", "box", "leftmost", "striped", "below", "all"} <= set(vocabulary())


def test_cli_help_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--semantic-ratio" in capsys.readouterr().out
    assert main(["--out", str(tmp_path), "--images", "2", "--split", "test", "--corpus", str(tmp_path / "c.txt")]) == 0
    assert len(read_records(tmp_path, split="test")) > 0 and (tmp_path / "c.txt").stat().st_size > 0


def test_defaults_draw_the_scenes_of_the_original_generator():
    """Golden hash of the default scenes (taken before SceneStyle and labels existed): the options change nothing."""
    import hashlib

    digest = hashlib.sha256()
    for index in range(4):
        scene, chosen = make_example(3, "train", index, max_side=200)
        digest.update(scene.image.tobytes())
        for mask in scene.masks:
            digest.update(mask.tobytes())
        digest.update(repr([item["text"] for item in chosen]).encode())
    assert digest.hexdigest() == "5a4b9322ac1da2915bb284759e98ff1e60da424d50e361ced1dcb0552d5c8e6b"


def test_a_style_narrows_and_shifts_the_visual_domain():
    from evf_sam.data.scenes import SIZES, SceneStyle

    style = SceneStyle(shapes=("hexagon", "circle"), colours=("red", "blue"), sizes=("small",), size_scale=0.8,
                       saturation=0.3, background="tiles")
    spreads = []
    for index in INDICES:
        scene, _ = make_example(1, "train", index, style=style, max_side=240)
        side = min(scene.width, scene.height)
        assert {o.shape for o in scene.objects} <= {"hexagon", "circle"}
        assert {o.colour for o in scene.objects} <= {"red", "blue"} and {o.size for o in scene.objects} == {"small"}
        assert all(o.radius <= SIZES["small"][1] * 0.8 * side + 1e-9 for o in scene.objects)
        for obj, mask in zip(scene.objects, scene.masks):
            if obj.texture == "solid" and mask.any():
                spreads.append(float(np.ptp(scene.image[mask].mean(0))))
        default, _ = make_example(1, "train", index, max_side=240)
        assert not np.array_equal(default.image, scene.image) or default.image.shape != scene.image.shape
    assert spreads and max(spreads) < 120  # muted: the palette's red and blue span about 180 between channels
    for bad in ({"shapes": ("blob",)}, {"background": "plaid"}, {"saturation": 1.5}, {"size_scale": 3.0},
                {"colours": ()}):
        with pytest.raises(ValueError, match="style"):
            SceneStyle(**bad)


def test_labels_make_one_semantic_record_per_label_present(tmp_path):
    labels = {"bolt": {"shape": "hexagon"}, "washer": {"shape": "circle"}, "red thing": {"colour": "red"}}
    records = generate_dataset(tmp_path, 8, seed=2, split="p", labels=labels, progress=False)
    scenes = {}
    for index in range(8):
        scene, chosen = make_example(2, "p", index, labels=labels)
        scenes[index] = scene
        present = [name for name, attrs in labels.items() if ex.matches(attrs, scene.objects)]
        assert [item["text"] for item in chosen] == present[:4]
    assert records and all(r.semantic and r.prompt == r.label and r.prompt in labels for r in records)
    dataset = LayoutDataset(tmp_path, "p")
    for record in records:
        scene = scenes[record.extra["scene_index"]]
        expected = scene.union(ex.matches(labels[record.prompt], scene.objects))
        assert np.array_equal(dataset.load_mask(record), expected)
