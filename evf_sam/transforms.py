"""Image and text preprocessing and mask postprocessing, exactly as the official EVF-SAM code (reference §4, §5.4).

Images enter as uint8 RGB arrays [H,W,3] (`load_image`). Each model sees two versions of the image:
- the SAM input [3,S,S] (`sam_input`), S = `model.sam_image_size` (1024 for official checkpoints):
  "sam" (SAM-1): PIL-bilinear longest-side resize, normalise on 0-255, zero-pad bottom/right;
  "legacy" (evf-sam2): the same resize, normalise, then a bilinear float stretch to S x S;
  "head" (-multitask SAM-2): a bilinear uint8 stretch to S x S on the CPU, then normalise;
- the BEiT-3 input [3,224,224] (`beit_input`): bicubic stretch of the [0,1] tensor without antialias or clamp,
  normalised with mean = std = 0.5.
Prompts become right-padded token ids and an attention mask (`tokenize`); low-resolution mask logits go back to the
original size with `postprocess_logits`.

The CPU path is the reference. With `device=` the float steps run on that device (uploads stay uint8); the results
then agree with the reference up to floating-point rounding of the resize kernels. The same steps are exposed split
in two (`sam_host_steps` / `sam_float_steps`, `beit_float_steps`) for `EvfPredictor`, which runs the uint8 part on
a CPU thread and the float part on the model's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from evf_sam.errors import ImageError, PromptError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
BEIT_MEAN = (0.5, 0.5, 0.5)
BEIT_STD = (0.5, 0.5, 0.5)
SEMANTIC_PREFIX = "[semantic] "
SAM_MODES = ("sam", "legacy", "head")

ImageInput = Image.Image | np.ndarray | str | os.PathLike


# ---------------------------------------------------------------------------------------------------- images


def load_image(image: ImageInput) -> np.ndarray:
    """A path, PIL image or array -> uint8 RGB array [H,W,3] (C-contiguous, writable).

    Files and PIL images are EXIF-transposed; grayscale, palette, alpha (dropped, as OpenCV does), CMYK and
    16-bit images are converted. Arrays must already be upright: uint8 [H,W,3], [H,W,4] (alpha dropped),
    [H,W] or [H,W,1] (grayscale). Raises ImageError with the reason otherwise.
    """
    if isinstance(image, (str, os.PathLike)):
        return _pil_to_rgb(_open(Path(image)))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(f"unsupported image type {type(image).__name__}: pass a file path, a PIL image "
                     f"or a uint8 numpy array [H,W,3]")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageError(f"image file not found: {path}" if not path.exists() else f"not a file: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read {path} as an image: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise ImageError(f"cannot decode image {path}: {error}") from error
    return image


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
            return _array_to_rgb(_wide_gray_to_uint8(np.asarray(image), image.mode))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as error:  # corrupt EXIF or unusual modes
        raise ImageError(f"cannot convert the {image.mode} image to RGB: {error}") from error
    return _array_to_rgb(array)


def _wide_gray_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Wide grayscale to 8 bits: 16-bit modes scale by 255/65535, 32-bit integers too when they exceed 255,
    float images are taken as [0,1]."""
    values = array.astype(np.float64)
    if mode == "F":
        values = values * 255.0
    elif mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values * (255.0 / 65535.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 RGB [H,W,3], got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"image arrays must be uint8 RGB [H,W,3], got shape {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"the image is empty (shape {list(array.shape)})")
    return np.array(array, dtype=np.uint8, order="C", copy=not (array.flags.c_contiguous and array.flags.writeable))


# ---------------------------------------------------------------------------------------------------- SAM input


@dataclass(frozen=True)
class SamInput:
    """The SAM input of one image: `pixels` float32 [3,S,S]; `original_size` (H,W); `resize_shape` (h',w')
    of the unpadded content for SAM-1, None for the stretched SAM-2 inputs."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    resize_shape: tuple[int, int] | None


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h',w') with the longest side scaled to `long_side`, rounded as `int(x * s + 0.5)`.

    A side that would round to 0 (aspect ratios beyond 2*long_side : 1, where the official code fails) becomes 1.
    """
    scale = long_side * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [h',w',3], PIL bilinear (antialiased), see `resized_shape`."""
    height, width = resized_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def normalize_sam(pixels: torch.Tensor) -> torch.Tensor:
    """Float [...,3,H,W] on the 0-255 scale -> (x - mean) / std with SAM's mean/std."""
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=pixels.dtype, device=pixels.device).reshape(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=pixels.dtype, device=pixels.device).reshape(3, 1, 1)
    return (pixels - mean) / std


def _to_chw(image: np.ndarray, device: torch.device | str | None) -> torch.Tensor:
    """uint8 [H,W,3] array -> uint8 tensor [3,H,W] on `device`."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(device)


def sam_host_steps(image: np.ndarray, size: int, mode: str = "sam") -> tuple[torch.Tensor, tuple[int, int] | None]:
    """The uint8 steps of `sam_input`, which run on the CPU: the longest-side resize ("sam", "legacy") or the uint8
    stretch to size x size ("head") -> (uint8 [3,h,w], resize_shape: (h,w) for "sam", else None)."""
    if mode not in SAM_MODES:
        raise ValueError(f"mode must be one of {SAM_MODES}, got {mode!r}")
    if mode == "head":  # the uint8 kernel (fixed-point) is what the official code ran; keep it on the CPU
        stretched = F.interpolate(_to_chw(image, "cpu")[None], (size, size), mode="bilinear", align_corners=False)
        return stretched[0], None
    resized = resize_longest_side(image, size)
    return _to_chw(resized, "cpu"), (resized.shape[0], resized.shape[1]) if mode == "sam" else None


def sam_float_steps(pixels: torch.Tensor, size: int, mode: str = "sam") -> torch.Tensor:
    """The float steps of `sam_input` on `pixels`' device: uint8 [3,h,w] from `sam_host_steps` -> normalised float32
    [3,size,size] (then a bilinear stretch for "legacy", zero padding bottom/right for "sam")."""
    pixels = normalize_sam(pixels.float())
    if mode == "legacy":
        return F.interpolate(pixels[None], (size, size), mode="bilinear", align_corners=False)[0]
    if mode == "sam":
        return F.pad(pixels, (0, size - pixels.shape[2], 0, size - pixels.shape[1]))
    return pixels


def sam_input(image: np.ndarray, size: int, mode: str = "sam", device: torch.device | str | None = None) -> SamInput:
    """uint8 RGB [H,W,3] -> the normalised SAM input [3,size,size] for `mode` ("sam" | "legacy" | "head")."""
    host, resize_shape = sam_host_steps(image, size, mode)
    return SamInput(sam_float_steps(host.to(device), size, mode), (int(image.shape[0]), int(image.shape[1])),
                    resize_shape)


def sam_mode(model: Any) -> str:
    """The preprocessing mode of a loaded model: "sam" for SAM-1, else the SAM-2 `generation` ("legacy" | "head")."""
    return "sam" if model.family == "sam" else model.generation


# ---------------------------------------------------------------------------------------------------- BEiT-3 input


def beit_input(image: np.ndarray, size: int = 224, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 RGB [H,W,3] -> float32 [3,size,size]: ToTensor, bicubic resize of the tensor (no antialias, no clamp),
    Normalize(0.5, 0.5). The aspect ratio is not preserved."""
    return beit_float_steps(_to_chw(image, device), size)


def beit_float_steps(pixels: torch.Tensor, size: int = 224) -> torch.Tensor:
    """`beit_input` from uint8 [3,H,W] on any device. The normalisation is TF.normalize's arithmetic without its
    std == 0 check, which would wait for a GPU on every image."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pixels = TF.resize(pixels.float().div(255), [size, size], interpolation=InterpolationMode.BICUBIC,
                       antialias=False)
    mean = torch.tensor(BEIT_MEAN, device=pixels.device).reshape(3, 1, 1)
    std = torch.tensor(BEIT_STD, device=pixels.device).reshape(3, 1, 1)
    return pixels.sub(mean).div(std)


# ---------------------------------------------------------------------------------------------------- text


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list, or PromptError naming the first problem (not a list, empty list, non-string, blank)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise PromptError(f"prompts must be a list of strings, got {type(prompts).__name__}"
                          + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else ""))
    if len(prompts) == 0:
        raise PromptError("no prompts given: pass at least one text prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {index} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise PromptError(f"prompt {index} is empty")
    return list(prompts)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_tokens: int, semantic: bool = False,
             multitask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> input_ids [T,L] (right-padded with the pad id, 1 for XLM-R) and attention_mask [T,L] (1 = real).

    Each row is `<s> pieces </s>`; longer texts are cut to `max_tokens` tokens (</s> kept) so that they fit BEiT-3's
    text position table. `semantic` prefixes "[semantic] " (multitask checkpoints only, else PromptError).
    """
    texts = check_prompts(prompts)
    if semantic:
        if not multitask:
            raise PromptError("semantic=True needs a -multitask checkpoint (its tokenizer has no '[semantic]' token)")
        texts = [t if t.startswith(SEMANTIC_PREFIX.strip()) else SEMANTIC_PREFIX + t for t in texts]
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, :len(tokens)] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------- masks


def postprocess_logits(low_res: torch.Tensor, original_size: tuple[int, int], sam_size: int,
                       resize_shape: tuple[int, int] | None) -> torch.Tensor:
    """Low-res logits [T,1,h,w] -> float32 logits [T,H,W] at `original_size`, on the input's device.

    SAM-1 (`resize_shape` given): bilinear to sam_size^2, crop the padding off, bilinear to (H,W).
    SAM-2 (`resize_shape` None): one bilinear resize to (H,W). The mask is `logits > 0`.
    """
    logits = low_res.float()
    if resize_shape is not None:
        logits = F.interpolate(logits, (sam_size, sam_size), mode="bilinear", align_corners=False)
        logits = logits[..., :resize_shape[0], :resize_shape[1]]
    return F.interpolate(logits, tuple(original_size), mode="bilinear", align_corners=False)[:, 0]
