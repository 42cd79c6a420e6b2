"""The corrections report: HTML with embedded plots and thumbnails, and a JSON summary, from a real dataset dir."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from backend.corrections.report import build_report
from evf_sam.data import layout
from tests.backend.conftest import REPO


def make_dataset(root) -> None:
    image = np.zeros((30, 40, 3), np.uint8)
    image[5:25, 5:35] = (200, 40, 40)
    layout.save_image(root / "images/h1.png", image)
    records = []
    rows = [("Cat", "a cat", "accepted", 1.0, "m-1"), ("Cat", "a cat", "edited", 0.8, "m-1"),
            ("Dog", "the dog", "redrawn", 0.2, "m-1"), ("Dog", "the dog", "deleted", 0.0, "m-2"),
            ("Dog", "the dog", "added", None, None), ("Cat", "a cat", "accepted", 1.0, "m-2")]
    for n, (label, prompt, kind, iou, version) in enumerate(rows):
        corrected = np.zeros((30, 40), bool)
        if kind != "deleted":
            corrected[5:25, 5:30 + n] = True
        layout.save_mask(root / f"masks/{n}.png", corrected)
        predicted = None
        if iou is not None:
            predicted = f"masks/{n}-pred.png"
            layout.save_mask(root / predicted, np.roll(corrected, 3, axis=1))
        records.append(layout.Record(image="images/h1.png", mask=f"masks/{n}.png", prompt=prompt, label=label,
                                     predicted_mask=predicted, iou=iou, model_version=version, task_id=1 + n // 2,
                                     annotation_id=10 + n // 2, created_at=f"2026-11-30T10:0{n}:00Z",
                                     extra={"kind": kind}))
    layout.write_records(root, records)


def test_report_has_plots_thumbnails_and_a_matching_json_summary(tmp_path) -> None:
    make_dataset(tmp_path / "c")
    paths = build_report(tmp_path / "c", tmp_path / "out")
    summary = json.loads(paths["json"].read_text())
    assert summary["records"] == 6 and summary["annotations"] == 3
    assert summary["kinds"] == {"accepted": 2, "edited": 1, "redrawn": 1, "deleted": 1, "added": 1}
    assert summary["iou"]["pairs"] == 5 and summary["iou"]["mean"] == 0.6
    assert sum(summary["iou"]["histogram"]["counts"]) == 5
    assert summary["per_label"]["Dog"] == {"accepted": 0, "edited": 0, "redrawn": 1, "deleted": 1, "added": 1}
    assert [v["model_version"] for v in summary["per_model_version"]] == ["m-1", "m-2"]
    assert summary["per_model_version"][1] == {"model_version": "m-2", "regions": 2, "mean_iou": 0.5,
                                               "accepted_share": 0.5}
    assert summary["worst_prompts"][0]["prompt"] == "the dog"
    assert summary["plots"] == ["iou_histogram", "kinds_per_label", "trend"]

    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 3 + 4  # three plots, two prompts x two examples
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    thumb = Image.open(__import__("io").BytesIO(base64.b64decode(images[-1])))
    assert thumb.width > 3 * thumb.height  # image | predicted | corrected


def test_empty_dataset_gives_a_report_saying_so(tmp_path) -> None:
    paths = build_report(tmp_path / "none", tmp_path / "out")
    assert "No corrections recorded yet" in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["records"] == 0


def test_cli_writes_the_report(tmp_path, base_env) -> None:
    make_dataset(tmp_path / "c")
    result = subprocess.run([sys.executable, "-m", "backend", "corrections", "report", "--out", str(tmp_path / "r")],
                            cwd=REPO, env={**base_env, "CORRECTIONS_DIR": str(tmp_path / "c")}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r/report.html").is_file() and "report.html" in result.stdout
