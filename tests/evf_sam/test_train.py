"""evf_sam.train: a short run learns, a split run resumes to the same state, the output loads, the CLI works."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import evf_sam
from evf_sam.evaluate import evaluate
from evf_sam.data.layout import Record, save_image, save_mask, write_records
from evf_sam.cli_train import configure_parser, main
from evf_sam.losses import dice_loss
from evf_sam.train import CURVES_FILE, HISTORY_FILE, STATE_FILE, lr_factor, parse_parts, train


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 64x80 images, each with a red square and a blue disc at jittered places; 5 train images, 1 val."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    records = []
    for i in range(6):
        image = np.full((64, 80, 3), 30, np.uint8)
        top, left = rng.integers(4, 20, size=2)
        square = np.zeros((64, 80), bool)
        square[top:top + 24, left:left + 24] = True
        cy, cx = rng.integers(36, 50), rng.integers(45, 65)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 144
        image[square] = (220, 40, 40)
        image[disc] = (40, 40, 220)
        save_image(root / f"images/{i}.png", image)
        save_mask(root / f"masks/{i}_square.png", square)
        save_mask(root / f"masks/{i}_disc.png", disc)
        split = "val" if i == 5 else "train"
        records += [Record(f"images/{i}.png", f"masks/{i}_square.png", "the red square", "Square", split),
                    Record(f"images/{i}.png", f"masks/{i}_disc.png", "the blue circle", "Circle", split)]
    write_records(root, records)
    return root


def test_short_run_lowers_the_loss_and_raises_iou(tiny_checkpoint, shapes_dir, tmp_path):
    before = evaluate(tiny_checkpoint(), shapes_dir, split="train", progress=False)["splits"]["train"]
    out = tmp_path / "run"
    result = train(tiny_checkpoint(), shapes_dir, out, val_split=None,
                   trainable="image_encoder,mask_decoder,beit3,projector", max_steps=20, batch_size=5, lr=3e-3,
                   warmup_steps=2, bce_weight=0.5, dice_weight=2.0, log_every=3, progress=False)
    losses = [h["loss"] for h in result.history["train"]]
    assert result.steps == 20
    assert losses[-1] < 0.9 * losses[0]
    after = evaluate(out, shapes_dir, split="train", progress=False)["splits"]["train"]
    assert after["ciou"] > before["ciou"] + 0.1
    assert (out / CURVES_FILE).stat().st_size > 1000
    assert json.loads((out / HISTORY_FILE).read_text())["train"][-1]["step"] == 20


def test_output_is_a_checkpoint_load_model_reads(tiny_checkpoint, shapes_dir, tmp_path):
    out = tmp_path / "finetuned"
    train(tiny_checkpoint(), shapes_dir, out, max_steps=1, batch_size=4, val_split=None, progress=False,
          save_dtype="bf16")
    model = evf_sam.load_model(out)
    assert model.model_name == "finetuned" and len(model.fingerprint) == 16
    assert load_file(out / "model.safetensors")["text_hidden_fcs.0.0.weight"].dtype == torch.bfloat16
    prediction = evf_sam.EvfPredictor(model).predict(shapes_dir / "images/0.png", ["the red square"])[0]
    assert prediction.mask.shape == (64, 80)


def test_frozen_parts_stay_unchanged(tiny_checkpoint, shapes_dir, tmp_path):
    out = tmp_path / "projector-only"
    train(tiny_checkpoint(), shapes_dir, out, trainable="projector", max_steps=2, batch_size=4, lr=1e-2,
          warmup_steps=1, val_split=None, progress=False)
    before, after = load_file(tiny_checkpoint() / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("text_hidden_fcs.") for k in changed)


def test_resumed_run_continues_from_the_same_state(tiny_checkpoint, shapes_dir, tmp_path):
    # No embedding cache: cached embeddings come from differently composed batches in the two runs, and their
    # last-bit differences get amplified by Adam on parameters whose true gradient is zero (attention key biases).
    common = dict(max_steps=6, batch_size=3, grad_accum=2, lr=2e-3, warmup_steps=2, val_split=None, log_every=1,
                  progress=False, trainable="mask_decoder,beit3,projector", cache_features=False)
    straight = train(tiny_checkpoint(), shapes_dir, tmp_path / "straight", **common)
    first = train(tiny_checkpoint(), shapes_dir, tmp_path / "split", stop_after=3, **common)
    assert first.steps == 3 and (tmp_path / "split" / STATE_FILE).is_file()
    resumed = train(tiny_checkpoint(), shapes_dir, tmp_path / "split", resume=True, **common)
    assert resumed.steps == 6
    assert [h["loss"] for h in resumed.history["train"]] == pytest.approx(
        [h["loss"] for h in straight.history["train"]], rel=1e-5)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_cli_trains_and_reports(tiny_checkpoint, shapes_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["--checkpoint", str(tiny_checkpoint()), "--data", str(shapes_dir), "--output", str(out),
                              "--steps", "2", "--batch-size", "4", "--no-progress"])
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / "config.json").is_file()
    history = json.loads((out / HISTORY_FILE).read_text())
    assert history["val"][-1]["step"] == 2 and history["val"][-1]["pairs"] == 2  # the one val image, 2 prompts
    bad = parser.parse_args(["--checkpoint", str(tiny_checkpoint()), "--data", str(shapes_dir), "--output", str(out),
                             "--train", "projector,wings", "--no-progress"])
    assert main(bad) == 2
    assert "wings" in capsys.readouterr().err


def test_recipe_pieces():
    assert parse_parts(None, "sam") == ("projector", "beit3", "mask_decoder")
    assert parse_parts(None, "sam2") == ("projector", "beit3")
    assert parse_parts("beit3, projector,beit3", "sam") == ("beit3", "projector")
    with pytest.raises(ValueError, match="unknown trainable part"):
        parse_parts("everything", "sam")
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    assert dice_loss((target * 2 - 1) * 50, target).item() < 1e-3
    assert dice_loss(-(target * 2 - 1) * 50, target).item() > 0.9
