"""Synthetic scenes: coloured, textured shapes on a cluttered background, with pixel-exact per-object masks.

A scene is sampled and rendered from one numpy Generator, so it is a pure function of the seed.
Ground truth is the VISIBLE part of each object: shapes are painted bottom to top (z-order = list order) and an
object's mask is its rasterised shape minus the shapes above it. The painted pixels of an object are exactly its
visible mask (the shape is composited through the same boolean raster), so image and mask agree pixel for pixel.
Every object keeps at least `MIN_VISIBLE` of its area visible and lies fully inside the image.
A `SceneStyle` narrows or shifts the visual domain (a project's own look: fewer shapes or colours, other object
sizes, muted colours, another background); without one, scenes are exactly those of the default generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ellipse")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 210, 30),
    "orange": (245, 135, 25),
    "purple": (135, 55, 195),
    "cyan": (35, 200, 215),
}
TEXTURES = ("solid", "striped", "dotted", "gradient")
# Object radius as a fraction of the image's shorter side; the gaps between classes keep them visibly distinct.
SIZES = {"small": (0.06, 0.085), "medium": (0.115, 0.15), "large": (0.19, 0.24)}
MIN_VISIBLE = 0.6
BACKGROUNDS = ("gradient", "dark", "tiles")


@dataclasses.dataclass(frozen=True)
class SceneStyle:
    """A visual domain: the shapes, colours and size classes that occur, a radius scale, how saturated the object
    colours are (1 = the palette, 0 = grey) and the background ("gradient": the default look; "dark": a low-key
    gradient; "tiles": a two-tone grey tiling). The default instance draws exactly the default scenes."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    size_scale: float = 1.0
    saturation: float = 1.0
    background: str = "gradient"

    def __post_init__(self) -> None:
        for name, chosen, known in (("shapes", self.shapes, SHAPES), ("colours", self.colours, tuple(COLOURS)),
                                    ("sizes", self.sizes, tuple(SIZES)), ("background", (self.background,),
                                                                          BACKGROUNDS)):
            unknown = [v for v in chosen if v not in known]
            if unknown or not chosen:
                raise ValueError(f"style {name} {unknown or list(chosen)!r} not among {', '.join(known)}")
        if not 0.25 <= self.size_scale <= 1.5:
            raise ValueError(f"style size_scale must be in [0.25, 1.5], got {self.size_scale}")
        if not 0 <= self.saturation <= 1:
            raise ValueError(f"style saturation must be in [0, 1], got {self.saturation}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_STYLE = SceneStyle()


@dataclasses.dataclass
class SceneObject:
    """One shape: its attributes (the words can name), geometry (pixels) and areas (pixels)."""

    id: int
    shape: str
    colour: str
    texture: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int  # full shape
    visible_area: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Scene:
    """A rendered scene: RGB image (H, W, 3) uint8, objects bottom to top, and their visible masks (H, W) bool."""

    image: np.ndarray
    objects: list[SceneObject]
    masks: list[np.ndarray]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    def union(self, ids: list[int]) -> np.ndarray:
        """Union of the visible masks of the objects with these ids."""
        out = np.zeros(self.image.shape[:2], bool)
        for i in ids:
            out |= self.masks[i]
        return out


def _polygon(shape: str, r: float, rot: float, rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Vertices around (0, 0), or None for a circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "ellipse":
        aspect = rng.uniform(1.6, 2.2)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x, y = r * np.cos(t), r / aspect * np.sin(t)
    else:
        count, start, radii = {
            "square": (4, np.pi / 4, [r]),
            "triangle": (3, -np.pi / 2, [r]),
            "hexagon": (6, 0.0, [r]),
            "star": (10, -np.pi / 2, [r, 0.45 * r]),
        }[shape]
        t = start + np.arange(count) * 2 * np.pi / count
        rad = np.resize(np.array(radii), count)
        x, y = rad * np.cos(t), rad * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return list(zip(x * c - y * s, x * s + y * c))


def _raster(shape: str, cx: float, cy: float, r: float, rot: float, rng: np.random.Generator):
    """(bbox, local bool mask) of a shape; callers keep the centre >= r + 3 px from every image edge,
    so the bbox lies inside the image."""
    x0, y0 = int(math.floor(cx - r)) - 1, int(math.floor(cy - r)) - 1
    w = h = int(math.ceil(2 * r)) + 3
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    pts = _polygon(shape, r, rot, rng)
    if pts is None:
        draw.ellipse([cx - r - x0, cy - r - y0, cx + r - x0, cy + r - y0], fill=255)
    else:
        draw.polygon([(px + cx - x0, py + cy - y0) for px, py in pts], fill=255)
    return (x0, y0, x0 + w, y0 + h), np.asarray(canvas) > 0


def _texture(texture: str, rgb: np.ndarray, h: int, w: int, r: float, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8 fill: the object's colour, patterned with a darker or lighter shade of the same hue."""
    shade = rgb * 0.62 if rng.random() < 0.5 else rgb + (255 - rgb) * 0.5
    if texture == "solid":
        return np.broadcast_to(rgb.astype(np.uint8), (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if texture == "gradient":
        t = ((u - u.min()) / max(float(np.ptp(u)), 1.0))[..., None]
        return (rgb + (shade - rgb) * t).astype(np.uint8)
    period = max(4.0, r * rng.uniform(0.3, 0.45))
    if texture == "striped":
        pattern = (u // (period / 2)) % 2 == 1
    else:  # dotted
        dx, dy = xx % period - period / 2, yy % period - period / 2
        pattern = dx * dx + dy * dy < (0.3 * period) ** 2
    return np.where(pattern[..., None], shade, rgb).astype(np.uint8)


def _background(h: int, w: int, rng: np.random.Generator, style: str = "gradient") -> Image.Image:
    """Low-saturation two-colour gradient (low-key for "dark"; a two-tone tiling for "tiles") with distractor lines
    and small blobs."""
    grey = rng.uniform(15, 60) if style == "dark" else rng.uniform(70, 200)
    c1, c2 = (grey + rng.uniform(-30, 30, 3)), (grey + rng.uniform(-45, 45, 3))
    angle = rng.uniform(0, 2 * np.pi)
    u = (np.arange(w, dtype=np.float32)[None, :] * math.cos(angle)
         + np.arange(h, dtype=np.float32)[:, None] * math.sin(angle))
    u -= u.min()
    index = (u * (255.0 / max(float(u.max()), 1.0))).astype(np.uint8)
    lut = np.clip(c1 + (c2 - c1) * np.linspace(0, 1, 256)[:, None], 0, 255).astype(np.uint8)
    pixels = lut[index]
    if style == "tiles":
        cell = int(rng.integers(12, 33))
        yy, xx = np.mgrid[0:h, 0:w]
        odd = ((yy // cell + xx // cell) % 2 == 1)[..., None]
        pixels = np.clip(pixels.astype(np.int16) + np.where(odd, 35, -35), 0, 255).astype(np.uint8)
    bg = Image.fromarray(pixels)
    draw = ImageDraw.Draw(bg)
    for _ in range(rng.integers(0, 7)):
        x, y = rng.uniform(0, w, 2), rng.uniform(0, h, 2)
        tone = tuple(int(v) for v in np.clip(grey + rng.uniform(-90, 90) + rng.uniform(-20, 20, 3), 0, 255))
        draw.line([(x[0], y[0]), (x[1], y[1])], fill=tone, width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(0, 13)):
        bx, by, br = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 4.5)
        t = rng.uniform(0, 2 * np.pi, 5)
        tone = tuple(int(v) for v in rng.integers(30, 226, 3))
        draw.polygon([(bx + br * math.cos(a), by + br * math.sin(a)) for a in np.sort(t)], fill=tone)
    return bg


def sample_scene(rng: np.random.Generator, min_side: int = 160, max_side: int = 640, max_objects: int = 6,
                 style: SceneStyle = DEFAULT_STYLE) -> Scene:
    """Sample and render one scene: 2..max_objects shapes drawn from small per-scene attribute pools, so that
    several objects share a shape or colour and the words are needed to tell them apart; `style` sets the domain."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    side = min(w, h)
    pools = {
        "shape": rng.choice(style.shapes, rng.integers(1, min(4, len(style.shapes) + 1)), replace=False),
        "colour": rng.choice(list(style.colours), rng.integers(1, min(4, len(style.colours) + 1)), replace=False),
        "texture": rng.choice(TEXTURES, rng.integers(1, 4), replace=False),
    }
    canvas = np.asarray(_background(h, w, rng, style.background)).copy()
    full: list[tuple[tuple[int, int, int, int], np.ndarray]] = []
    objects: list[SceneObject] = []
    fills: list[np.ndarray] = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        shape, colour, texture = (str(rng.choice(pools[k])) for k in ("shape", "colour", "texture"))
        size = str(rng.choice(list(style.sizes)))
        for _attempt in range(15):
            r = rng.uniform(*SIZES[size]) * side * style.size_scale
            cx, cy = rng.uniform(r + 3, w - r - 3), rng.uniform(r + 3, h - r - 3)
            rot = rng.uniform(-0.3, 0.3) if shape in ("square", "triangle") else rng.uniform(0, np.pi)
            bbox, local = _raster(shape, cx, cy, r, rot, rng)
            if all(_visible_fraction(full[j], [*full[j + 1:], (bbox, local)]) >= MIN_VISIBLE
                   for j in range(len(full))):
                break
        else:
            continue
        full.append((bbox, local))
        objects.append(SceneObject(len(objects), shape, colour, texture, size, float(cx), float(cy), float(r),
                                   float(rot), bbox, int(local.sum())))
        rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
        if style.saturation != 1:
            rgb = rgb.mean() + (rgb - rgb.mean()) * np.float32(style.saturation)
        fills.append(_texture(texture, rgb, local.shape[0], local.shape[1], r, rng))
    masks = []
    for k, ((x0, y0, x1, y1), local) in enumerate(full):
        region = canvas[y0:y1, x0:x1]
        region[local] = fills[k][local]
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = local
        masks.append(m)
    for k in range(len(masks)):
        for above in masks[k + 1:]:
            masks[k] &= ~above
        objects[k].visible_area = int(masks[k].sum())
    amplitude = int(rng.integers(1, 13))
    image = canvas.astype(np.int16)
    image += rng.integers(-amplitude, amplitude + 1, (h, w, 1), dtype=np.int16)
    image = np.clip(image, 0, 255, out=image).astype(np.uint8)
    return Scene(image, objects, masks)


def _visible_fraction(obj, occluders) -> float:
    (x0, y0, x1, y1), local = obj
    covered = np.zeros_like(local)
    for (a0, b0, a1, b1), other in occluders:
        ix0, iy0, ix1, iy1 = max(x0, a0), max(y0, b0), min(x1, a1), min(y1, b1)
        if ix0 < ix1 and iy0 < iy1:
            covered[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] |= other[iy0 - b0:iy1 - b0, ix0 - a0:ix1 - a0]
    total = local.sum()
    return float((local & ~covered).sum() / total) if total else 0.0
