"""Corrections capture against the loopback LS API stand-in and a real dataset directory.

Annotator brushes are encoded like the LS editor does: literal chunks of RGBA words with anti-aliased alpha.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from backend import rle
from backend.corrections.capture import CaptureContext, CorrectionsStore, handle_event, iou
from backend.ls_auth import LabelStudioAuth
from backend.ls_client import LabelStudioClient
from backend.media import ImageFetcher
from evf_sam.data import layout
from tests.backend.conftest import png_bytes
from tests.backend.ls_api_standin import TOKEN, running
from tests.backend.ls_payloads import LABEL_CONFIG

H, W = 32, 40


def editor_rle(mask: np.ndarray, *, edge_alpha: tuple[int, int] = (200, 60)) -> list[int]:
    """RLE as the LS editor writes it (rle-pack v3): literal chunks of up to 256 RGBA words, label colour in RGB and
    anti-aliased alpha: inside pixels on the mask's edge get `edge_alpha[0]` (still inside at threshold 128), the
    outside ring around it `edge_alpha[1]` (outside)."""
    inside = mask.astype(bool)
    grown = inside.copy()
    grown[1:] |= inside[:-1]
    grown[:-1] |= inside[1:]
    grown[:, 1:] |= inside[:, :-1]
    grown[:, :-1] |= inside[:, 1:]
    shrunk = ~(~inside).copy()
    for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
        shrunk &= np.roll(inside, shift, axis=axis)
    alpha = np.where(inside, np.where(shrunk, 255, edge_alpha[0]), np.where(grown, edge_alpha[1], 0))
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = np.where(alpha > 0, 250, 0), np.where(alpha > 0, 30, 0), 0
    rgba[..., 3] = alpha
    words = rgba.reshape(-1).tolist()
    bits = [f"{len(words):032b}", "00111", "0010", "0011", "0111", "1111"]
    for start in range(0, len(words), 256):
        chunk = words[start:start + 256]
        bits += ["0", "10", f"{len(chunk) - 1:08b}"] + [f"{w:08b}" for w in chunk]
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)]


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:bottom, left:right] = True
    return mask


def region(region_id: str, mask: np.ndarray, label: str = "Object", *, editor: bool = False) -> dict:
    return {"id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"format": "rle", "rle": editor_rle(mask) if editor else rle.encode(mask),
                      "brushlabels": [label]}}


@pytest.fixture()
def env(tmp_path):
    with running() as ls:
        ls.files["1/img.png"] = png_bytes(W, H)
        ls.add_project(1, LABEL_CONFIG)
        auth = LabelStudioAuth(ls.url, TOKEN)
        client = LabelStudioClient(ls.url, auth, backoff=0.01)
        ctx = CaptureContext(CorrectionsStore(tmp_path / "corrections"), client, ImageFetcher(ls.url, auth))
        yield ls, ctx
        client.close()


def event(action: str, annotation: dict, ls) -> dict:
    task = ls.tasks[annotation["task"]]
    return {"action": action, "annotation": annotation, "task": task,
            "project": {"id": 1, "label_config": LABEL_CONFIG}}


def records_of(ctx: CaptureContext, annotation_id: int) -> list[layout.Record]:
    return [r for r in ctx.store.records() if r.annotation_id == annotation_id]


def test_editor_rle_with_literal_chunks_and_alpha_decodes_at_threshold_128() -> None:
    mask = box(5, 6, 20, 30)
    words = rle.decode_words(editor_rle(mask))
    alpha = words.reshape(H, W, 4)[..., 3]
    assert set(np.unique(alpha)) == {0, 60, 200, 255}  # really anti-aliased
    assert np.array_equal(rle.decode(editor_rle(mask), H, W, alpha_threshold=128), mask)


def test_edited_added_and_deleted_regions_are_paired_with_the_parent_prediction(env) -> None:
    ls, ctx = env
    task = ls.add_task(1, {"image": "/data/upload/1/img.png", "prompt": {"Object": "the red square",
                                                                         "Cat": "a cat"}})
    predicted, wrong = box(8, 10, 24, 30), box(0, 0, 4, 4)
    prediction = ls.add_prediction(task, [region("r1", predicted), region("r2", wrong)], "evf-abc-p1")
    ls.add_prediction(task, [], "newer-but-not-the-parent")
    corrected = box(8, 10, 24, 34)
    annotation = ls.add_annotation(task, [region("r1", corrected, editor=True),
                                          region("new", box(26, 0, 32, 8), "Cat", editor=True)],
                                   parent_prediction=prediction)

    outcome = handle_event(event("ANNOTATION_CREATED", annotation, ls), ctx)
    assert outcome["annotations"][0]["status"] == "recorded"
    records = {r.extra["kind"]: r for r in records_of(ctx, annotation["id"])}
    assert set(records) == {"edited", "deleted", "added"}

    edited = records["edited"]
    assert edited.prompt == "the red square" and edited.label == "Object" and edited.task_id == task
    assert edited.model_version == "evf-abc-p1" and edited.extra["prediction_id"] == prediction
    assert edited.iou == pytest.approx(iou(predicted, corrected), abs=1e-6)
    assert np.array_equal(layout.load_mask(ctx.store.root / edited.mask), corrected)
    assert np.array_equal(layout.load_mask(ctx.store.root / edited.predicted_mask), predicted)
    assert layout.load_image(ctx.store.root / edited.image).size == (W, H)
    assert edited.image_hash and edited.updated_at == annotation["updated_at"]

    assert records["deleted"].iou == 0.0 and not layout.load_mask(ctx.store.root / records["deleted"].mask).any()
    assert records["added"].prompt == "a cat" and records["added"].predicted_mask is None
    assert records["added"].iou is None


def test_accepted_unchanged_and_latest_prediction_without_parent(env) -> None:
    ls, ctx = env
    task = ls.add_task(1, {"image": "/data/upload/1/img.png"})
    ls.add_prediction(task, [region("r1", box(1, 1, 9, 9))], "old")
    latest = [region("r9", box(10, 10, 20, 20))]
    ls.add_prediction(task, latest, "current")
    annotation = ls.add_annotation(task, latest)  # accepted as is: the editor keeps the region and its RLE
    handle_event(event("ANNOTATION_CREATED", annotation, ls), ctx)
    [record] = records_of(ctx, annotation["id"])
    assert record.extra["kind"] == "accepted" and record.iou == 1.0 and record.model_version == "current"
    assert record.prompt == "object"  # no prompt anywhere: the label itself


def test_update_replaces_duplicates_and_stale_webhooks_change_nothing(env) -> None:
    ls, ctx = env
    task = ls.add_task(1, {"image": "/data/upload/1/img.png"})
    ls.add_prediction(task, [region("r1", box(8, 8, 20, 20))], "v1")
    first = ls.add_annotation(task, [region("r1", box(8, 8, 20, 24), editor=True)],
                              updated_at="2026-11-30T10:00:00.000000Z")
    handle_event(event("ANNOTATION_CREATED", first, ls), ctx)
    [before] = records_of(ctx, first["id"])

    assert handle_event(event("ANNOTATION_CREATED", first, ls), ctx)["annotations"][0]["status"] == "unchanged"
    newer = {**first, "result": [region("drawn-anew", box(0, 0, 30, 30), editor=True)],
             "updated_at": "2026-11-30T10:05:00.000000Z"}
    older = {**first, "result": [region("r1", box(2, 2, 5, 5), editor=True)],
             "updated_at": "2026-11-30T10:01:00.000000Z"}
    assert handle_event(event("ANNOTATION_UPDATED", newer, ls), ctx)["annotations"][0]["status"] == "recorded"
    assert handle_event(event("ANNOTATION_UPDATED", older, ls), ctx)["annotations"][0]["status"] == "unchanged"
    assert handle_event(event("ANNOTATION_UPDATED", newer, ls), ctx)["annotations"][0]["status"] == "unchanged"

    [after] = records_of(ctx, first["id"])
    assert after.updated_at == newer["updated_at"] and after.extra["kind"] == "redrawn"
    assert np.array_equal(layout.load_mask(ctx.store.root / after.mask), box(0, 0, 30, 30))
    assert not (ctx.store.root / before.mask).exists()  # the replaced version's files are gone
    assert len(ctx.store.records()) == 1


def test_deleted_annotation_removes_its_records_and_stays_deleted(env) -> None:
    ls, ctx = env
    task = ls.add_task(1, {"image": "/data/upload/1/img.png"})
    keep = ls.add_annotation(task, [region("a", box(1, 1, 5, 5))])
    gone = ls.add_annotation(task, [region("b", box(6, 6, 9, 9)), region("c", box(20, 20, 30, 30))])
    for annotation in (keep, gone):
        handle_event(event("ANNOTATION_CREATED", annotation, ls), ctx)
    files = [ctx.store.root / r.mask for r in records_of(ctx, gone["id"])]
    outcome = handle_event({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": gone["id"]}]}, ctx)
    assert outcome["removed"] == 2 and not any(path.exists() for path in files)
    assert [r.annotation_id for r in ctx.store.records()] == [keep["id"]]
    late = {**gone, "updated_at": "2099-01-01T00:00:00Z"}
    assert handle_event(event("ANNOTATION_UPDATED", late, ls), ctx)["annotations"][0]["status"] == "unchanged"
    assert (ctx.store.root / ctx.store.records()[0].image).exists()  # the shared image stays


def test_annotation_without_any_prediction_is_recorded_as_plain_training_data(env) -> None:
    ls, ctx = env
    task = ls.add_task(1, {"image": "/data/upload/1/img.png", "prompt": "the square"})
    annotation = ls.add_annotation(task, [region("x", box(4, 4, 12, 12), "Object", editor=True),
                                          region("y", box(20, 20, 30, 30), "Cat", editor=True)])
    handle_event(event("ANNOTATION_CREATED", annotation, ls), ctx)
    records = layout.LayoutDataset(ctx.store.root).records  # readable by training/eval as is
    assert all(r.extra["kind"] == "added" and r.predicted_mask is None and r.model_version is None for r in records)
    # a free-text task prompt belongs to the first label; other labels fall back to their own name
    assert {(r.label, r.prompt) for r in records} == {("Object", "the square"), ("Cat", "cat")}


def test_concurrent_captures_all_land_in_records(env) -> None:
    ls, ctx = env
    task = ls.add_task(1, {"image": "/data/upload/1/img.png"})
    annotations = [ls.add_annotation(task, [region(f"r{n}", box(n, n, n + 5, n + 5))]) for n in range(8)]
    threads = [threading.Thread(target=handle_event, args=(event("ANNOTATION_CREATED", a, ls), ctx))
               for a in annotations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(r.annotation_id for r in ctx.store.records()) == sorted(a["id"] for a in annotations)


def test_a_brush_that_does_not_fit_the_image_is_a_clear_error(env) -> None:
    from backend.errors import BadRequest

    ls, ctx = env
    task = ls.add_task(1, {"image": "/data/upload/1/img.png"})
    bad = region("x", np.ones((H + 1, W), bool))
    annotation = ls.add_annotation(task, [bad])
    with pytest.raises(BadRequest, match=r"region 'x'.*40x32"):
        handle_event(event("ANNOTATION_CREATED", annotation, ls), ctx)
    assert ctx.store.records() == []


def test_bulk_annotations_created_records_each_annotation_with_its_task(env) -> None:
    ls, ctx = env
    first = ls.add_task(1, {"image": "/data/upload/1/img.png", "prompt": "left thing"})
    second = ls.add_task(1, {"image": "/data/upload/1/img.png", "prompt": "right thing"})
    annotations = [ls.add_annotation(first, [region("a", box(1, 1, 9, 9))]),
                   ls.add_annotation(second, [region("b", box(10, 10, 20, 20))])]
    outcome = handle_event({"action": "ANNOTATIONS_CREATED", "annotation": annotations,
                            "task": [ls.tasks[first], ls.tasks[second]],
                            "project": {"id": 1, "label_config": LABEL_CONFIG}}, ctx)
    assert [a["status"] for a in outcome["annotations"]] == ["recorded", "recorded"]
    assert {(r.task_id, r.prompt) for r in ctx.store.records()} == {(first, "left thing"), (second, "right thing")}
