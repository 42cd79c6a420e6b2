import json
import math

import numpy as np
import pytest
import torch

from evf_sam.metrics import IoUAccumulator, SplitMetrics, intersection_union, to_json, to_markdown


def _mask(h, w, box):
    m = np.zeros((h, w), bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_single_pair_hand_computed():
    pred = _mask(10, 10, (0, 4, 0, 4))  # 16 px
    gt = _mask(10, 10, (2, 6, 2, 6))  # 16 px, overlap 2x2
    inter, union = intersection_union(pred, gt)
    assert (int(inter), int(union)) == (4, 28)


def test_ciou_differs_from_giou():
    # pair 1: small object, half right (I=1, U=2); pair 2: big object, perfect (I=U=98)
    pred = np.stack([_mask(10, 10, (0, 1, 0, 2)), _mask(10, 10, (0, 7, 0, 14))])
    gt = np.stack([_mask(10, 10, (0, 1, 0, 1)), _mask(10, 10, (0, 7, 0, 14))])
    acc = IoUAccumulator()
    ious = acc.update(pred, gt)
    assert ious.tolist() == [0.5, 1.0]
    assert acc.ciou == pytest.approx((1 + 70) / (2 + 70))
    assert acc.giou == pytest.approx(0.75)
    assert acc.ciou != pytest.approx(acc.giou)


def test_empty_union_counts_one_for_giou_and_nothing_for_ciou():
    acc = IoUAccumulator()
    acc.update(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    assert acc.giou == 1.0 and acc.ciou == 1.0
    acc.update(_mask(4, 4, (0, 2, 0, 2)), _mask(4, 4, (0, 2, 0, 1)))  # I=2, U=4
    assert acc.giou == pytest.approx((1.0 + 0.5) / 2)
    assert acc.ciou == pytest.approx(0.5)
    assert acc.result() == {"ciou": 0.5, "giou": 0.75, "pairs": 2, "intersection": 2, "union": 4}


def test_nothing_accumulated_is_nan():
    assert math.isnan(IoUAccumulator().ciou) and math.isnan(IoUAccumulator().giou)


def test_torch_and_numpy_agree_and_batches_equal_one_by_one():
    rng = np.random.default_rng(0)
    pred, gt = rng.random((3, 2, 8, 9)) > 0.5, rng.random((3, 2, 8, 9)) > 0.6
    i_np, u_np = intersection_union(pred, gt)
    i_t, u_t = intersection_union(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.uint8) * 255))
    assert i_np.shape == (3, 2) and np.array_equal(i_np, i_t) and np.array_equal(u_np, u_t)
    batched, single = IoUAccumulator(), IoUAccumulator()
    batched.update(pred, gt)
    for p, g in zip(pred.reshape(-1, 8, 9), gt.reshape(-1, 8, 9)):
        single.update(p, g)
    assert batched.result() == pytest.approx(single.result())


@pytest.mark.parametrize(
    "pred, gt, needle",
    [
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), bool), "threshold"),
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool), "shape"),
        (np.zeros(4, bool), np.zeros(4, bool), "2 dimensions"),
    ],
)
def test_bad_inputs_are_refused(pred, gt, needle):
    with pytest.raises(ValueError, match=needle):
        intersection_union(pred, gt)


def test_per_split_results_render_as_json_and_markdown():
    metrics = SplitMetrics()
    metrics.update("refcoco|unc|val", _mask(4, 4, (0, 2, 0, 2)), _mask(4, 4, (0, 2, 0, 1)))
    metrics.update("synthetic-val", _mask(4, 4, (0, 2, 0, 2)), _mask(4, 4, (0, 2, 0, 2)))
    results = metrics.results()
    assert list(results) == ["refcoco|unc|val", "synthetic-val"]
    doc = json.loads(to_json(results, checkpoint="models/evf-demo"))
    assert doc["checkpoint"] == "models/evf-demo" and doc["splits"]["synthetic-val"]["ciou"] == 1.0
    table = to_markdown(results)
    assert r"| refcoco\|unc\|val | 1 | 50.00 | 50.00 |" in table
    assert "| synthetic-val | 1 | 100.00 | 100.00 |" in table
