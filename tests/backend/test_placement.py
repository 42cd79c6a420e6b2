"""Device, dtype and preprocessing choice, and `--gpu` pinning (the logic runs without a GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backend.placement import Placement, PlacementError, pin_gpu, resolve
from tests.backend.conftest import REPO


def test_auto_is_the_fast_path_on_a_gpu_and_float32_on_the_cpu():
    assert resolve("auto", "auto", "auto", visible_gpus=1) == Placement("cuda:0", "bfloat16", "model")
    assert resolve("auto", "auto", "auto", visible_gpus=0) == Placement("cpu", "float32", None)


def test_explicit_settings_win_over_auto():
    assert resolve("cuda:1", "float32", "cpu", visible_gpus=2) == Placement("cuda:1", "float32", None)
    assert resolve("cuda", "auto", "auto", visible_gpus=1) == Placement("cuda:0", "bfloat16", "model")
    assert resolve("cpu", "bfloat16", "device", visible_gpus=4) == Placement("cpu", "bfloat16", "model")


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "sees 0 CUDA GPU"),
    ("cuda:1", 1, "CUDA_VISIBLE_DEVICES=3: numbering starts at 0"),
    ("cuda:x", 2, "not a device"),
    ("tpu", 0, "not a device"),
])
def test_a_device_this_process_cannot_use_is_named(device, gpus, message):
    with pytest.raises(PlacementError, match=message):
        resolve(device, "auto", "auto", visible_gpus=gpus, environ={"CUDA_VISIBLE_DEVICES": "3"})


def test_pin_gpu_sets_cuda_visible_devices_for_one_gpu():
    environ: dict[str, str] = {}
    pin_gpu(" 1 ", environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "1"}
    pin_gpu("GPU-5f1c2d3e-aaaa-bbbb-cccc-0123456789ab", environ)
    assert environ["CUDA_VISIBLE_DEVICES"].startswith("GPU-5f1c")


@pytest.mark.parametrize("value", ["0,1", "", "all", "-1"])
def test_pin_gpu_takes_exactly_one_gpu(value):
    with pytest.raises(PlacementError, match="one GPU"):
        pin_gpu(value, {})


def test_worker_gpu_flag_reaches_the_model_placement(model_env, redis_db):
    """`worker --gpu 0` on a machine without that GPU: the worker says so in one line instead of using the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**model_env, **redis_db.env(), "EVF_SAM_DEVICE": "cuda"}
    run = subprocess.run([sys.executable, "-m", "backend", "worker", "--gpu", "0", "--burst"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "cannot load the model: EVF_SAM_DEVICE=cuda:0 but this process sees 0 CUDA GPU(s) " \
           "(CUDA_VISIBLE_DEVICES=0" in run.stderr


def test_worker_rejects_a_gpu_list(base_env, redis_db):
    env = {**base_env, **redis_db.env()}
    run = subprocess.run([sys.executable, "-m", "backend", "worker", "--gpu", "0,1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "--gpu takes one GPU" in run.stderr and "Traceback" not in run.stderr
