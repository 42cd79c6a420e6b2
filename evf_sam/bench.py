"""`python -m evf_sam bench`: full-size EVF-SAM / EVF-SAM2 throughput on a CUDA GPU, against an official-style baseline.

Both paths run in the same process on the same random weights (no hub is needed):
- baseline: what the official `inference.py` does per image - fp16 weights under a global fp16 autocast, one image and
  one prompt at a time, CPU preprocessing, no reuse of the image embedding;
- ours: `EvfPredictor` in the chosen dtype, batches of distinct images, embedding cache; measured with CPU
  preprocessing, with GPU-side preprocessing, then (`--fast`) also with fused attention, with CUDA graphs of the
  prompt path and (`--compile`) with the image encoder compiled (`evf_sam.acceleration`), each step on top of the
  previous one. The prompt-path step times a new prompt on a cached image eagerly and with the graphs in the same
  run (masks only, as the worker asks, and with float32 logits) and checks their agreement; on a CPU the graphs are
  off and only the eager path is timed.
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
    parser.add_argument("--fast", action="store_true",
                        help="also time GPU preprocessing + fused attention (and with --compile, + torch.compile)")
    parser.add_argument("--compile", action="store_true", help="with --fast: also time the compiled image encoder")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the image encoder with --compile (default: torch's default; e.g. "
                             "max-autotune-no-cudagraphs, which autotunes its kernels and takes minutes per shape)")
    parser.add_argument("--compile-batch-sizes", default="1,32",
                        help="batch sizes timed on the compiled path (each compiles once; default 1,32)")
    parser.add_argument("--demo-agreement", default=None, metavar="CHECKPOINT",
                        help="also compare the fast path with the fp32 path on this trained checkpoint (e.g. "
                             "models/evf-demo) over held-out synthetic images")
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


def _agreement(model, images: list[np.ndarray], dtype: torch.dtype, preprocess_device: str | None = None,
               reference: Any = None) -> dict[str, float]:
    """Fast path (`dtype`) vs fp32 on the same weights: Pearson correlation of the logits and mean mask IoU.
    The fp32 side runs `reference` (a model with the same weights, e.g. without fused attention) if given, else
    `model` cast to fp32, always with the CPU (reference) preprocessing."""
    from evf_sam.predictor import EvfPredictor

    items = [(img, PROMPTS[:2]) for img in images]
    fast = EvfPredictor(model.to(dtype), cache_size=0, preprocess_device=preprocess_device).predict_batch(items)
    exact = EvfPredictor((reference if reference is not None else model).to(torch.float32),
                         cache_size=0).predict_batch(items)
    model.to(dtype)
    comparison = _compare(fast, exact)
    return {k: comparison[k] for k in ("logits_correlation", "mean_mask_iou")}


def _compare(got: list[list[Any]], want: list[list[Any]]) -> dict[str, float]:
    """Per-prompt mask IoU (mean, min, count) and the Pearson correlation of all logits, `got` against `want`."""
    ious = []
    for preds_got, preds_want in zip(got, want):
        for g, w in zip(preds_got, preds_want):
            union = np.logical_or(g.mask, w.mask).sum()
            ious.append(np.logical_and(g.mask, w.mask).sum() / union if union else 1.0)
    a = np.concatenate([p.logits.ravel() for preds in got for p in preds])
    b = np.concatenate([p.logits.ravel() for preds in want for p in preds])
    return {"prompts": len(ious), "mean_mask_iou": float(np.mean(ious)), "min_mask_iou": float(np.min(ious)),
            "logits_correlation": float(np.corrcoef(a, b)[0, 1])}


def run_bench(family: str, model_size: str, dtype: torch.dtype, batch_sizes: list[int], n_images: int, n_baseline: int,
              image_size: tuple[int, int], device: torch.device, tokenizer_dir: Path, fast: bool = False,
              compile_batch_sizes: list[int] | None = None, compile_mode: str | None = None) -> dict[str, Any]:
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
    fast_result = (_time_fast(model, images[:n_images], batch_sizes, compile_batch_sizes, compile_mode, device, dtype)
                   if fast else None)
    out = {"family": family, "params": params, "dtype": str(dtype).replace("torch.", ""), "image_size": list(image_size),
           "baseline_fp16_autocast_bs1": baseline, "ours": ours, "ours_gpu_preprocessing": ours_gpu_pre,
           "agreement_vs_fp32": agreement, **(fast_result or {}),
           "speedup_vs_baseline": {k: v / baseline["img_per_s"] for k, v in ours.items() if k.endswith("img_per_s")}}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu"] = torch.cuda.get_device_name(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _time_fast(model, images: list[np.ndarray], batch_sizes: list[int], compile_batch_sizes: list[int] | None,
               compile_mode: str | None, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """GPU preprocessing + fused attention, + prompt-path CUDA graphs (`_time_prompt_path`), then (with
    `compile_batch_sizes`) + the compiled image encoder; the agreement of the fused path with the unfused fp32
    model; compile warm-up seconds per batch size."""
    import copy

    from evf_sam.acceleration import accelerate

    reference = copy.deepcopy(model).to("cpu")
    done = accelerate(model, fused_attention=True)
    result: dict[str, Any] = {"fused_attention_modules": done["fused_attention_modules"],
                              "ours_fused": _time_ours(model, images, batch_sizes, device, preprocess_device="model")}
    reference.to(device)
    result["agreement_fused_vs_fp32"] = _agreement(model, images[:4], dtype, "model", reference)
    del reference
    result["prompt_path"] = _time_prompt_path(model, images[:16], device)
    if compile_batch_sizes:
        result["compile_mode"] = accelerate(model, fused_attention=False, compile_encoder=True,
                                            compile_mode=compile_mode)["compiled_encoder"]
        warmups = {}
        for bs in compile_batch_sizes:
            start = time.perf_counter()
            with torch.no_grad():
                model.encode_images(torch.zeros(bs, 3, model.sam_image_size, model.sam_image_size, device=device,
                                                dtype=dtype))
            _sync(device)
            warmups[str(bs)] = time.perf_counter() - start
        result["compile_warmup_s"] = warmups
        result["ours_compiled"] = _time_ours(model, images, compile_batch_sizes, device, preprocess_device="model")
        encoder = model.visual_model.image_encoder
        pixels = torch.randn(max(compile_batch_sizes), 3, model.sam_image_size, model.sam_image_size, device=device,
                             dtype=dtype, generator=torch.Generator(device).manual_seed(0))
        with torch.no_grad():
            compiled, eager = _main_output(encoder(pixels)), _main_output(encoder.forward(pixels))
        result["compiled_vs_eager_encoder"] = {"correlation": float(torch.corrcoef(torch.stack([compiled, eager]))[0, 1]),
                                               "max_abs_diff": float((compiled - eager).abs().max())}
    return result


def _time_prompt_path(model, images: list[np.ndarray], device: torch.device) -> dict[str, Any]:
    """A new prompt on a cached image (GPU preprocessing), eager and with the prompt path's CUDA graphs
    (`accelerate(prompt_graphs=True)`) on the same model, each returning masks only (as the worker does) and with
    float32 logits; then the graphs against the eager path in the same dtype (mask IoU, logits correlation) on one
    call of 4 images with 3 prompts each. On a CPU the graphs are off and only the eager path is timed."""
    from evf_sam.acceleration import accelerate
    from evf_sam.predictor import EvfPredictor

    replayed = accelerate(model, fused_attention=False, prompt_graphs=True)["prompt_graphs"]
    graphs = model.prompt_graphs
    result: dict[str, Any] = {"graphs": "on" if replayed else
                              f"off: CUDA graphs need a CUDA model (this one is on {device.type})"}
    for name in ("eager", "graphs") if replayed else ("eager",):
        model.prompt_graphs = graphs if name == "graphs" else None  # the same model with and without its graphs
        for return_logits in (False, True):
            predictor = EvfPredictor(model, cache_size=len(images), preprocess_device="model",
                                     return_logits=return_logits)
            result[f"{name}_{'logits' if return_logits else 'masks'}"] = _cached_prompt_latency(predictor, images,
                                                                                              device)
    if replayed:
        items = [(image, PROMPTS) for image in images[:4]]
        model.prompt_graphs = None
        want = EvfPredictor(model, cache_size=0, preprocess_device="model").predict_batch(items)
        model.prompt_graphs = graphs
        got = EvfPredictor(model, cache_size=0, preprocess_device="model").predict_batch(items)
        result["agreement_graphs_vs_eager"] = _compare(got, want)
        result["speedup_p50_masks"] = result["eager_masks"]["p50_ms"] / result["graphs_masks"]["p50_ms"]
        # what the worker gains: it used to take the eager path with float32 logits
        result["speedup_p50_vs_eager_logits"] = result["eager_logits"]["p50_ms"] / result["graphs_masks"]["p50_ms"]
        result["captured_buckets"] = [list(bucket) for bucket in graphs.buckets]
        if graphs.failure is not None:
            result["graphs"] = f"capture failed, eager: {graphs.failure}"
    model.prompt_graphs = graphs
    return result


def _cached_prompt_latency(predictor: Any, images: list[np.ndarray], device: torch.device) -> dict[str, float]:
    """p50/p95 of `predictor.predict(image, [prompt])` on images it has cached, over images x PROMPTS[1:]."""
    for image in images:
        predictor.predict(image, PROMPTS[:1])  # encodes and caches the image
    for prompt in PROMPTS[1:]:
        predictor.predict(images[0], [prompt])  # first use of each text length (graphs: capture)
    times = []
    for image in images:
        for prompt in PROMPTS[1:]:
            _sync(device)
            start = time.perf_counter()
            predictor.predict(image, [prompt])
            _sync(device)
            times.append(time.perf_counter() - start)
    return {**_percentiles(times), "samples": len(times)}


def _main_output(output: Any) -> torch.Tensor:
    """The image encoder's embedding as one flat float tensor (SAM-2's encoder returns a dict)."""
    tensor = output["vision_features"] if isinstance(output, dict) else output
    return tensor.float().ravel()


def demo_agreement(checkpoint: str, n_images: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The fast path (`dtype`, fused attention, GPU preprocessing) against the fp32 reference path (CPU
    preprocessing, eager attention) on a trained checkpoint and held-out synthetic images: mean mask IoU and logits
    correlation over 4 expressions per image."""
    import copy

    from evf_sam.acceleration import accelerate
    from evf_sam.data.synthetic import make_example
    from evf_sam.loading import load_model
    from evf_sam.predictor import EvfPredictor

    reference = load_model(checkpoint, device=device, dtype=torch.float32)
    fast = copy.deepcopy(reference).to(dtype)
    fast.tokenizer = reference.tokenizer
    accelerate(fast, fused_attention=True)
    examples = [make_example(777, "test", i) for i in range(n_images)]
    items = [(scene.image, [c["text"] for c in chosen]) for scene, chosen in examples]
    got = EvfPredictor(fast, cache_size=0, preprocess_device="model").predict_batch(items)
    want = EvfPredictor(reference, cache_size=0).predict_batch(items)
    return {"checkpoint": checkpoint, "images": n_images, **_compare(got, want)}


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
    for name in ("ours_fused", "ours_compiled"):
        if result.get(name):
            part = result[name]
            rates = ", ".join(f"{k}: {v:.2f} ({v / base['img_per_s']:.2f}x)" for k, v in part.items()
                              if k.endswith("img_per_s"))
            print(f"{name}: {rates}; new image p50 {part['new_image']['p50_ms']:.1f} ms; "
                  f"new prompt on cached image p50 {part['cached_image_new_prompt']['p50_ms']:.1f} ms")
    if result.get("compiled_vs_eager_encoder"):
        print(f"compiled vs eager image encoder (same dtype): {result['compiled_vs_eager_encoder']}")
    if result.get("prompt_path"):
        _print_prompt_path(result["prompt_path"])
    for name in ("agreement_fused_vs_fp32",):
        if result.get(name):
            print(f"{name}: logits correlation {result[name]['logits_correlation']:.5f}, "
                  f"mean mask IoU {result[name]['mean_mask_iou']:.4f}")
    if result.get("compile_warmup_s"):
        print(f"compile warm-up (s) per batch size: {result['compile_warmup_s']}")
    agree = result["agreement_vs_fp32"]
    print(f"{result['dtype']} vs fp32: logits correlation {agree['logits_correlation']:.5f}, "
          f"mean mask IoU {agree['mean_mask_iou']:.4f}")
    if "peak_memory_gib" in result:
        print(f"peak GPU memory: {result['peak_memory_gib']:.1f} GiB on {result['gpu']}")


def _print_prompt_path(part: dict[str, Any]) -> None:
    timed = ", ".join(f"{key} {part[key]['p50_ms']:.2f}/{part[key]['p95_ms']:.2f}"
                      for key in ("eager_masks", "eager_logits", "graphs_masks", "graphs_logits") if key in part)
    print(f"new prompt on a cached image, p50/p95 ms (prompt graphs {part['graphs']}): {timed}")
    if "agreement_graphs_vs_eager" in part:
        agree = part["agreement_graphs_vs_eager"]
        print(f"prompt graphs: {part['speedup_p50_masks']:.2f}x eager at p50 (masks only; "
              f"{part['speedup_p50_vs_eager_logits']:.2f}x eager with logits); vs eager in the same dtype: "
              f"mean mask IoU {agree['mean_mask_iou']:.4f} (min {agree['min_mask_iou']:.4f}), logits correlation "
              f"{agree['logits_correlation']:.6f}; buckets {part['captured_buckets']}")


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
    results: list[dict[str, Any]] = []
    if args.demo_agreement:
        results.append({"demo_agreement": demo_agreement(args.demo_agreement, 50, device, parse_dtype(args.dtype))})
        print(f"demo model, fast path vs fp32: {results[-1]['demo_agreement']}", flush=True)
    for family in families:
        results.append(run_bench(family, args.size, parse_dtype(args.dtype), batch_sizes, args.images,
                                 args.baseline_images, (width, height), device, tokenizer_dir, fast=args.fast,
                                 compile_batch_sizes=([int(v) for v in args.compile_batch_sizes.split(",")]
                                                      if args.fast and args.compile else None),
                                 compile_mode=args.compile_mode))
        _print(results[-1])
        args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return 0
