"""`python -m evf_sam bench`: full-size EVF-SAM / EVF-SAM2 throughput on a CUDA GPU, against an official-style baseline.

Both paths run in the same process on the same random weights (no hub is needed):
- baseline: what the official `inference.py` does per image - fp16 weights under a global fp16 autocast, one image and
  one prompt at a time, CPU preprocessing, no reuse of the image embedding;
- ours: `EvfPredictor` in the chosen dtype, batches of distinct images, embedding cache.
Prints images/s per batch size, latency percentiles, the cached-prompt latency, peak memory and the ratios, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "sam": {"architectures": ["EvfSamModel"], "hidden_size": 1024, "out_dim": 256,
            "mm_extractor_scale": "large", "sam_scale": "huge"},
    "sam2": {"architectures": ["EvfSam2Model"], "hidden_size": 1024, "out_dim": 256,
             "mm_extractor_scale": "large", "sam_scale": "large"},
}
PROMPTS = ["the zebra on the left", "a red car parked near the tree", "the man in a blue shirt holding a cup"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=["sam", "sam2", "both"], default="both",
                        help="which full-size model to build with random weights (default: both)")
    parser.add_argument("--dtype", default="bf16", help="dtype of our path: bf16 (default), fp16 or fp32")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated image batch sizes (default 1,8,32)")
    parser.add_argument("--images", type=int, default=64, help="distinct images timed per batch size (default 64)")
    parser.add_argument("--baseline-images", type=int, default=16, help="images timed on the baseline path (default 16)")
    parser.add_argument("--image-size", default="640x480", help="WxH of the synthetic test images (default 640x480)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON results")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="full: the official architectures (default); tiny: a small random model for a CPU smoke run")


def _random_images(n: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(family: str, size: str, device: torch.device, dtype: torch.dtype, tokenizer_dir: Path):
    from evf_sam.config import EvfConfig
    from evf_sam.loading import attach_tokenizer, model_class
    from evf_sam.testing import tiny_config

    config = EvfConfig(**OFFICIAL_CONFIGS[family]) if size == "full" else tiny_config(family)
    with torch.device(device):
        model = model_class(config)(config)
    model = model.to(dtype).eval()
    attach_tokenizer(model, tokenizer_dir, name=f"random-evf-{family}")
    return model


def _percentiles(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]}


def _time_baseline(model, images: list[np.ndarray], device: torch.device) -> dict[str, float]:
    """Official-style: fp16 weights, global fp16 autocast, one image + one prompt per call, nothing reused."""
    from evf_sam.predictor import EvfPredictor

    predictor = EvfPredictor(model, cache_size=0)
    times = []
    with torch.autocast(device.type, dtype=torch.float16):
        predictor.predict(images[0], PROMPTS[:1])  # warm-up
        for image in images:
            _sync(device)
            start = time.perf_counter()
            predictor.predict(image, PROMPTS[:1])
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"img_per_s": len(times) / sum(times), **_percentiles(times)}


def _time_ours(model, images: list[np.ndarray], batch_sizes: list[int], device: torch.device,
               preprocess_device: str | None) -> dict[str, Any]:
    from evf_sam.predictor import EvfPredictor

    predictor = EvfPredictor(model, cache_size=max(batch_sizes), preprocess_device=preprocess_device)
    result: dict[str, Any] = {}
    for bs in batch_sizes:
        predictor.clear_cache()
        predictor.predict_batch([(img, PROMPTS[:1]) for img in images[:bs]])  # warm-up for this shape
        predictor.clear_cache()
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(images), bs):
            predictor.predict_batch([(img, PROMPTS[:1]) for img in images[i:i + bs]])
            predictor.clear_cache()
        _sync(device)
        result[f"batch_{bs}_img_per_s"] = len(images) / (time.perf_counter() - start)

    latencies, cached = [], []
    for image in images[:16]:
        _sync(device)
        start = time.perf_counter()
        predictor.predict(image, PROMPTS[:1])
        _sync(device)
        latencies.append(time.perf_counter() - start)
        for prompt in PROMPTS[1:]:
            start = time.perf_counter()
            predictor.predict(image, [prompt])
            _sync(device)
            cached.append(time.perf_counter() - start)
    result["new_image"] = _percentiles(latencies)
    result["cached_image_new_prompt"] = _percentiles(cached)
    return result


def _agreement(model, images: list[np.ndarray], dtype: torch.dtype) -> dict[str, float]:
    """Fast path (`dtype`) vs fp32 on the same weights: Pearson correlation of the logits and mean mask IoU."""
    from evf_sam.predictor import EvfPredictor

    items = [(img, PROMPTS[:2]) for img in images]
    fast = EvfPredictor(model.to(dtype), cache_size=0).predict_batch(items)
    exact = EvfPredictor(model.to(torch.float32), cache_size=0).predict_batch(items)
    a = np.concatenate([p.logits.ravel() for preds in fast for p in preds])
    b = np.concatenate([p.logits.ravel() for preds in exact for p in preds])
    ious = []
    for preds_fast, preds_exact in zip(fast, exact):
        for pf, pe in zip(preds_fast, preds_exact):
            union = np.logical_or(pf.mask, pe.mask).sum()
            ious.append(np.logical_and(pf.mask, pe.mask).sum() / union if union else 1.0)
    model.to(dtype)
    return {"logits_correlation": float(np.corrcoef(a, b)[0, 1]), "mean_mask_iou": float(np.mean(ious))}


def run_bench(family: str, model_size: str, dtype: torch.dtype, batch_sizes: list[int], n_images: int, n_baseline: int,
              image_size: tuple[int, int], device: torch.device, tokenizer_dir: Path) -> dict[str, Any]:
    images = _random_images(max(n_images, n_baseline), *image_size, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = _build(family, model_size, device, torch.float16, tokenizer_dir)
    baseline = _time_baseline(model, images[:n_baseline], device)
    model = model.to(dtype)
    ours = _time_ours(model, images[:n_images], batch_sizes, device, preprocess_device=None)
    ours_gpu_pre = (_time_ours(model, images[:n_images], batch_sizes, device, preprocess_device="model")
                    if device.type == "cuda" else None)
    agreement = _agreement(model, images[:4], dtype)
    params = sum(p.numel() for p in model.parameters())
    out = {"family": family, "params": params, "dtype": str(dtype).replace("torch.", ""), "image_size": list(image_size),
           "baseline_fp16_autocast_bs1": baseline, "ours": ours, "ours_gpu_preprocessing": ours_gpu_pre,
           "agreement_vs_fp32": agreement,
           "speedup_vs_baseline": {k: v / baseline["img_per_s"] for k, v in ours.items() if k.endswith("img_per_s")}}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu"] = torch.cuda.get_device_name(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _print(result: dict[str, Any]) -> None:
    base = result["baseline_fp16_autocast_bs1"]
    print(f"\n== {result['family']}: {result['params']:,} params, ours in {result['dtype']}, images {result['image_size']}")
    print(f"baseline (fp16 autocast, bs1, no reuse): {base['img_per_s']:.2f} img/s, p50 {base['p50_ms']:.1f} ms")
    for key, ratio in result["speedup_vs_baseline"].items():
        print(f"ours {key}: {result['ours'][key]:.2f}  ({ratio:.2f}x baseline)")
    ours = result["ours"]
    print(f"ours new image p50/p95: {ours['new_image']['p50_ms']:.1f}/{ours['new_image']['p95_ms']:.1f} ms; "
          f"new prompt on cached image p50: {ours['cached_image_new_prompt']['p50_ms']:.1f} ms")
    if result.get("ours_gpu_preprocessing"):
        gpu = result["ours_gpu_preprocessing"]
        rates = ", ".join(f"{k}: {v:.2f}" for k, v in gpu.items() if k.endswith("img_per_s"))
        print(f"ours with GPU-side preprocessing: {rates}; new image p50 {gpu['new_image']['p50_ms']:.1f} ms; "
              f"new prompt on cached image p50 {gpu['cached_image_new_prompt']['p50_ms']:.1f} ms")
    agree = result["agreement_vs_fp32"]
    print(f"{result['dtype']} vs fp32: logits correlation {agree['logits_correlation']:.5f}, "
          f"mean mask IoU {agree['mean_mask_iou']:.4f}")
    if "peak_memory_gib" in result:
        print(f"peak GPU memory: {result['peak_memory_gib']:.1f} GiB on {result['gpu']}")


def main(args: argparse.Namespace) -> int:
    from evf_sam.loading import parse_dtype
    from evf_sam.testing import train_tokenizer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("evf_sam bench: no CUDA device is available (use --device cpu for a slow smoke run)")
        return 2
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    tokenizer_dir = args.out.parent / "bench-tokenizer"
    train_tokenizer(tokenizer_dir, PROMPTS * 20, vocab_size=64, multitask=False)
    families = ["sam", "sam2"] if args.family == "both" else [args.family]
    results = [run_bench(f, args.size, parse_dtype(args.dtype), batch_sizes, args.images, args.baseline_images,
                         (width, height), device, tokenizer_dir) for f in families]
    for result in results:
        _print(result)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return 0
