"""Segment one image with one or more text prompts.

Writes one mask per prompt (PNG, 0/255, named mask_<index>_<prompt slug>.png) and overlay.png (each mask blended
at 50 % over the image; the first prompt in (50,120,220)) into --out, and prints what it wrote.

example:
  python -m evf_sam predict --image assets/sample.png --prompt "the red circle" --prompt "the blue square" \\
      --out runs/demo
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

from evf_sam.errors import EvfError

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "evf-demo"
OVERLAY_COLOURS = [(50, 120, 220), (220, 120, 50), (60, 180, 75), (200, 60, 160), (240, 200, 40), (70, 200, 200)]


def default_checkpoint() -> str | None:
    """$EVF_SAM_CHECKPOINT, else the shipped demo model directory when it exists."""
    return os.environ.get("EVF_SAM_CHECKPOINT") or (str(DEMO_CHECKPOINT) if DEMO_CHECKPOINT.is_dir() else None)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m evf_sam predict`."""
    parser.add_argument("--checkpoint", default=None, metavar="DIR_OR_REPO",
                        help="checkpoint directory or Hugging Face repo id (default: $EVF_SAM_CHECKPOINT, "
                             f"else the demo model {DEMO_CHECKPOINT.parent.name}/{DEMO_CHECKPOINT.name})")
    parser.add_argument("--image", required=True, type=Path, help="image file to segment (EXIF orientation applied)")
    parser.add_argument("--prompt", required=True, action="append", dest="prompts", metavar="TEXT",
                        help="text describing what to segment; repeat for several masks")
    parser.add_argument("--out", type=Path, default=Path("runs/predict"), metavar="DIR",
                        help="output directory, created if needed (default: runs/predict)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default: auto = "
                                                         "cuda when available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="model precision (default: auto = bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--semantic", action="store_true",
                        help='prefix prompts with "[semantic] " for part/semantic masks (-multitask checkpoints only)')


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe lower-case slug of `text` ("The red circle!" -> "the-red-circle")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def overlay(image: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """uint8 RGB image with each mask blended at 50 % in its colour of OVERLAY_COLOURS (in order, cycling)."""
    out = image.astype(np.float32)
    for index, mask in enumerate(masks):
        colour = np.array(OVERLAY_COLOURS[index % len(OVERLAY_COLOURS)], dtype=np.float32)
        out[mask] = 0.5 * out[mask] + 0.5 * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _device_and_dtype(device_name: str, dtype_name: str) -> tuple[str, str]:
    import torch

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except (RuntimeError, ValueError) as error:
        raise EvfError(f"unknown device {device_name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvfError(f"device {device_name!r} requested but CUDA is not available (use --device cpu)")
    if dtype_name == "auto":
        dtype_name = "bf16" if device.type == "cuda" else "fp32"
    return str(device), dtype_name


def main(args: argparse.Namespace) -> int:
    """Run the prediction; 0 on success, 1 with a one-line message on stderr for bad input."""
    try:
        return _run(args)
    except (EvfError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the exception text
        print(f"python -m evf_sam predict: error: {message}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from PIL import Image

    from evf_sam.transforms import check_prompts, load_image

    image = load_image(args.image)  # cheap checks first: no model load for a bad image or prompt
    prompts = check_prompts(args.prompts)
    checkpoint = args.checkpoint or default_checkpoint()
    if checkpoint is None:
        raise EvfError(f"no checkpoint: pass --checkpoint DIR_OR_REPO or set EVF_SAM_CHECKPOINT "
                       f"(the shipped demo model {DEMO_CHECKPOINT} is missing)")
    device, dtype = _device_and_dtype(args.device, args.dtype)

    import evf_sam

    model = evf_sam.load_model(checkpoint, device=device, dtype=dtype)
    print(f"model {model.model_name} ({model.family}, {model.fingerprint}) on {device}/{dtype}")
    results = evf_sam.EvfPredictor(model, cache_size=1).predict(image, prompts, semantic=args.semantic)

    args.out.mkdir(parents=True, exist_ok=True)
    for index, (prompt, result) in enumerate(zip(prompts, results)):
        path = args.out / f"mask_{index:02d}_{slug(prompt)}.png"
        Image.fromarray(result.mask.astype(np.uint8) * 255).save(path)
        area = int(result.mask.sum())
        print(f"wrote {path}  (prompt {prompt!r}: score {result.score:.3f}, {area} px = "
              f"{100 * area / result.mask.size:.1f} % of the image)")
    path = args.out / "overlay.png"
    Image.fromarray(overlay(image, [r.mask for r in results])).save(path)
    print(f"wrote {path}")
    return 0
