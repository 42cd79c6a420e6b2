"""Brush RLE encoder benchmark: backend.rle.encode vs label_studio_sdk's mask2rle, measured in the same run.

    .venv/bin/python benchmarks/rle_bench.py                 # 3000x4000 blobs + noise (the SDK needs ~0.5 min on noise)
    .venv/bin/python benchmarks/rle_bench.py --skip-noise    # blobs only

Prints both times (best of --repeat), the speed-up and whether outputs are byte-identical; exits 1 if the blob
speed-up is below --min-ratio (4x).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from backend import rle  # noqa: E402


def blobs(height: int, width: int) -> np.ndarray:
    """A realistic prediction: a few large smooth objects (a disk, an ellipse, a rectangle with a hole)."""
    yy, xx = np.ogrid[:height, :width]
    mask = (yy - 0.4 * height) ** 2 + (xx - 0.37 * width) ** 2 < (0.27 * height) ** 2
    mask |= ((yy - 0.73 * height) / (0.2 * height)) ** 2 + ((xx - 0.75 * width) / (0.22 * width)) ** 2 < 1
    mask[int(0.03 * height):int(0.23 * height), int(0.62 * width):int(0.95 * width)] = True
    mask[int(0.1 * height):int(0.15 * height), int(0.7 * width):int(0.8 * width)] = False
    return mask


def noise(height: int, width: int) -> np.ndarray:
    """The worst case: independent random pixels (half set)."""
    return np.random.default_rng(0).random((height, width)) < 0.5


def best_time(function: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def compare(name: str, mask: np.ndarray, repeat: int, sdk_repeat: int) -> float:
    as_uint8 = mask.astype(np.uint8) * 255  # mask2rle takes uint8 only
    ours_s, ours = best_time(lambda: rle.encode(mask), repeat)
    sdk_s, theirs = best_time(lambda: mask2rle(as_uint8), sdk_repeat)
    ratio = sdk_s / ours_s
    print(f"{name:>6} {mask.shape[0]}x{mask.shape[1]}: ours {ours_s * 1000:9.1f} ms | "
          f"sdk mask2rle {sdk_s * 1000:9.1f} ms"
          f" | speed-up {ratio:6.1f}x | {len(ours):>10,} bytes | identical: {ours == theirs}")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=5, help="runs of our encoder (best counts)")
    parser.add_argument("--sdk-repeat", type=int, default=3, help="runs of the SDK on the blob mask (noise: 1)")
    parser.add_argument("--skip-noise", action="store_true", help="skip the slow noise case")
    parser.add_argument("--min-ratio", type=float, default=4.0)
    args = parser.parse_args()

    ratio = compare("blobs", blobs(args.height, args.width), args.repeat, args.sdk_repeat)
    if not args.skip_noise:
        compare("noise", noise(args.height, args.width), max(1, args.repeat // 2), 1)
    verdict = "OK" if ratio >= args.min_ratio else "TOO SLOW"
    print(f"blob speed-up {ratio:.1f}x (required >= {args.min_ratio}x): {verdict}")
    return 0 if ratio >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
