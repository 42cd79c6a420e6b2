"""The labelling page of a real Label Studio, in headless Debian chromium, shows our brush prediction as a labelled
region painted over the image. Leaves a screenshot in docs/img/ls_prelabelled_task.png (used by the README)."""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import rle
from scripts.ls_harness import REPO, LabelStudioClient, LabelStudioServer, make_samples

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "docs" / "img" / "ls_prelabelled_task.png"


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's chromium (installed by scripts/ls_install_chromium.sh when missing)."""
    if not CHROMIUM.exists():
        result = subprocess.run(["bash", str(REPO / "scripts" / "ls_install_chromium.sh")], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.fail(f"could not install chromium:\n{result.stderr[-2000:]}")
    return CHROMIUM


@pytest.fixture(scope="module")
def prelabelled_task(ls: LabelStudioClient, label_config: str,
                     document_root: Path) -> tuple[int, int, str, np.ndarray]:
    """(project, task, label, mask): a task whose prediction is the brush RLE of a synthetic image's ground-truth
    mask. The image is made grey, so the label-coloured overlay is the only colour on the canvas."""
    sample = make_samples(document_root / "browser", count=1)[0]
    Image.open(sample.image).convert("L").convert("RGB").save(sample.image)
    project = ls.create_project("browser check", label_config)["id"]
    ls.add_local_storage(project, document_root / "browser" / "images")
    image = f"/data/local-files/?d=browser/images/{sample.image.name}"
    task = ls.import_tasks(project, [{"data": {"image": image}}])[0]
    label, mask = next(iter(sample.masks.items()))
    height, width = mask.shape
    region = {"id": "region-0001", "from_name": "tag", "to_name": "image", "type": "brushlabels",
              "original_width": width, "original_height": height, "image_rotation": 0,
              "value": {"format": "rle", "rle": rle.encode(mask), "brushlabels": [label]}}
    ls.create_prediction(task, [region], score=0.9, model_version="browser-check")
    return project, task, label, mask


def test_prelabelled_task_shows_the_labelled_brush_region(
        chromium: Path, label_studio: LabelStudioServer, prelabelled_task: tuple[int, int, str, np.ndarray]) -> None:
    from playwright.sync_api import sync_playwright

    project, task, label, mask = prelabelled_task
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("input[name=email]", label_studio.credentials.email)
            page.fill("input[name=password]", label_studio.credentials.password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)
            page.goto(f"{label_studio.url}/projects/{project}/data?task={task}")

            region = page.locator(".lsf-outliner-item__title").first
            region.wait_for(timeout=60_000)
            assert region.inner_text().strip() == label

            canvas = page.locator("canvas").first
            canvas.wait_for(timeout=30_000)
            time.sleep(2)  # the mask layer is painted after the image has loaded
            box = canvas.bounding_box()
            shot = page.screenshot()
        finally:
            browser.close()

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(shot)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    x0, y0 = int(box["x"]), int(box["y"])
    view = pixels[y0:y0 + int(box["height"]), x0:x0 + int(box["width"])]
    painted = view.max(axis=-1) - view.min(axis=-1) > 25  # coloured: the overlay (the image itself is grey)
    scale = box["width"] / mask.shape[1]
    expected = mask.sum() * scale * scale
    assert 0.7 * expected < painted.sum() < 1.3 * expected, (painted.sum(), expected)
