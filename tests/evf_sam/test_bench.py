"""`python -m evf_sam bench` runs end to end (on the CPU with a tiny model; the real figures need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_reports_baseline_ours_ratios_and_agreement(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "evf_sam", "bench", "--device", "cpu", "--size", "tiny",
                          "--family", "sam", "--images", "2", "--baseline-images", "1", "--batch-sizes", "2",
                          "--fast", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    [result] = json.loads(out.read_text())
    assert result["baseline_fp16_autocast_bs1"]["img_per_s"] > 0
    assert result["ours"]["batch_2_img_per_s"] > 0
    assert result["speedup_vs_baseline"]["batch_2_img_per_s"] > 0
    assert 0.9 < result["agreement_vs_fp32"]["logits_correlation"] <= 1.0
    assert "x baseline" in run.stdout
    # the prompt path on a CPU: graphs off, said so, the eager path timed with and without logits
    prompt_path = result["prompt_path"]
    assert prompt_path["graphs"].startswith("off: CUDA graphs need a CUDA model")
    assert prompt_path["eager_masks"]["samples"] == 4 and prompt_path["eager_logits"]["p50_ms"] > 0
    assert "graphs_masks" not in prompt_path and "prompt graphs off" in run.stdout


def test_bench_without_cuda_says_so():
    run = subprocess.run([sys.executable, "-m", "evf_sam", "bench", "--device", "cuda"], capture_output=True,
                         text=True, timeout=120)
    if run.returncode == 0:
        pytest.skip("a CUDA device is available here")
    assert run.returncode == 2 and "no CUDA device" in run.stdout + run.stderr
