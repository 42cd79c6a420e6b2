"""`python -m evf_sam ...`: the predict command end to end in a subprocess, its errors, and the dispatcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evf_sam import __main__ as cli
from evf_sam.cli_predict import OVERLAY_COLOURS, overlay, slug
from tests.evf_sam.conftest import shapes_image

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str | os.PathLike, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "EVF_SAM_CHECKPOINT"}
    environment.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "evf_sam", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "picture.png"
    Image.fromarray(shapes_image(60, 80)).save(path)
    return path


@pytest.mark.slow
def test_predict_writes_masks_and_overlay(tiny_checkpoint, picture: Path, tmp_path: Path) -> None:
    import evf_sam

    checkpoint = tiny_checkpoint("sam")
    out = tmp_path / "out"
    done = run_cli("predict", "--checkpoint", checkpoint, "--image", picture, "--prompt", "The red circle!",
                   "--prompt", "square", "--out", out)
    assert done.returncode == 0, done.stderr
    masks = [out / "mask_00_the-red-circle.png", out / "mask_01_square.png"]
    for path in [*masks, out / "overlay.png"]:
        assert str(path) in done.stdout
    expected = evf_sam.EvfPredictor(evf_sam.load_model(checkpoint)).predict(picture, ["The red circle!", "square"])
    for path, prediction in zip(masks, expected):
        written = Image.open(path)
        assert written.mode == "L" and written.size == (80, 60)
        values = np.asarray(written)
        assert set(np.unique(values)) <= {0, 255}
        np.testing.assert_array_equal(values == 255, prediction.mask)
    image = np.asarray(Image.open(picture))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "overlay.png")),
                                  overlay(image, [p.mask for p in expected]))


@pytest.mark.slow
def test_checkpoint_from_the_environment(tiny_checkpoint, picture: Path, tmp_path: Path) -> None:
    done = run_cli("predict", "--image", picture, "--prompt", "circle", "--out", tmp_path,
                   env={"EVF_SAM_CHECKPOINT": str(tiny_checkpoint("sam2"))})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mask_00_circle.png").is_file() and "sam2" in done.stdout


ERROR_CASES = [
    ("missing image", "image file not found"),
    ("unreadable image", "cannot read"),
    ("empty prompt", "prompt 1 is empty"),
    ("repo id offline", "is not a local directory"),
    ("missing checkpoint dir", "checkpoint directory not found"),
    ("semantic on a plain model", "multitask"),
]


def _error_args(case: str, checkpoint: Path, picture: Path, tmp_path: Path) -> list[str]:
    image, prompts, extra = str(picture), ["circle"], []
    if case == "missing image":
        image = str(tmp_path / "nope.png")
    elif case == "unreadable image":
        (tmp_path / "text.png").write_text("not a picture")
        image = str(tmp_path / "text.png")
    elif case == "empty prompt":
        prompts = ["circle", "   "]
    elif case == "repo id offline":
        checkpoint = "someone/not-downloaded-evf-model"
    elif case == "missing checkpoint dir":
        checkpoint = tmp_path / "no-such-dir"
    else:
        extra = ["--semantic"]
    return ["predict", "--checkpoint", str(checkpoint), "--image", image,
            *[token for prompt in prompts for token in ("--prompt", prompt)], "--out", str(tmp_path / "out"), *extra]


def _assert_one_line_error(code: int, stderr: str, message: str) -> None:
    assert code == 1
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m evf_sam predict: error: ") and message in lines[0]


@pytest.mark.parametrize("case, message", ERROR_CASES)
def test_errors_in_process(case: str, message: str, tiny_checkpoint, picture: Path, tmp_path: Path,
                           monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(_error_args(case, tiny_checkpoint("sam"), picture, tmp_path))
    _assert_one_line_error(code, capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case, message", ERROR_CASES)
def test_errors_are_one_line_without_traceback(case: str, message: str, tiny_checkpoint, picture: Path,
                                                tmp_path: Path) -> None:
    done = run_cli(*_error_args(case, tiny_checkpoint("sam"), picture, tmp_path))
    _assert_one_line_error(done.returncode, done.stderr, message)
    assert not (tmp_path / "out").exists()


def test_help_texts() -> None:
    top = run_cli("--help")
    assert top.returncode == 0 and all(name in top.stdout for name in ("predict", "train", "eval", "bench"))
    predict = run_cli("predict", "--help")
    assert predict.returncode == 0
    for option in ("--checkpoint", "--image", "--prompt", "--out", "--device", "--dtype", "--semantic",
                   "EVF_SAM_CHECKPOINT"):
        assert option in predict.stdout


def test_missing_required_options_and_unknown_commands_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--prompt", "x"])
    assert exit_info.value.code == 2 and "--image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["segment"])
    assert exit_info.value.code == 2


def test_a_command_whose_module_is_missing_is_not_available(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.COMMANDS, "eval", ("evf_sam.no_such_module", "placeholder"))
    assert cli.main(["eval", "--anything"]) == 2
    assert "not available" in capsys.readouterr().err


def test_overlay_blends_half_in_the_prompt_colour() -> None:
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 0] = True
    out = overlay(image, [mask])
    assert out[0, 0].tolist() == [75, 110, 160]  # (100 + (50, 120, 220)) / 2
    assert OVERLAY_COLOURS[0] == (50, 120, 220)
    assert (out[1:] == 100).all() and (out[0, 1:] == 100).all()


@pytest.mark.parametrize("text, expected", [("The red circle!", "the-red-circle"), ("  ", "prompt"),
                                            ("ça va / 2", "a-va-2"), ("x" * 80, "x" * 40)])
def test_slug(text: str, expected: str) -> None:
    assert slug(text) == expected


def test_no_checkpoint_anywhere_is_a_clear_error(picture: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from evf_sam import cli_predict

    monkeypatch.delenv("EVF_SAM_CHECKPOINT", raising=False)
    monkeypatch.setattr(cli_predict, "DEMO_CHECKPOINT", tmp_path / "models" / "evf-demo")
    code = cli.main(["predict", "--image", str(picture), "--prompt", "circle", "--out", str(tmp_path / "out")])
    _assert_one_line_error(code, capsys.readouterr().err, "no checkpoint: pass --checkpoint")


def test_unusable_device_is_a_clear_error(tiny_checkpoint, picture: Path, tmp_path: Path, capsys) -> None:
    import torch

    device = "cpu:x" if torch.cuda.is_available() else "cuda"
    code = cli.main(["predict", "--checkpoint", str(tiny_checkpoint("sam")), "--image", str(picture),
                     "--prompt", "circle", "--device", device, "--out", str(tmp_path)])
    _assert_one_line_error(code, capsys.readouterr().err, device)
