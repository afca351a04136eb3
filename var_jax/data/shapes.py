"""An embedded, procedurally generated, class-conditional dataset that does not run out: coloured shapes.

Image `index` is drawn from a generator seeded with (seed, index) alone, so any image can be made on its own, in
any order, on any host, with no download, and the same (seed, index) always gives the same pixels. The class is
`index % 10`, so every run of ten consecutive indices holds each class once (exact balance).

Ten classes (CLASS_NAMES): circle, square, triangle, star, cross, ring, half-disc, crescent, bar, arrow. Each
image draws a size, a position (the shape stays inside the frame), a rotation, and a background and foreground
colour at least MIN_CONTRAST apart. Shapes are drawn with PIL at SUPERSAMPLE× the resolution and area-averaged
down (BOX filter), so edges are anti-aliased.

Splits: the first HELD_OUT_SIZE indices are the held-out set ('val'; 'test' is the same range, the name the
digits dataset uses) and are never trained on; 'train' is the next `train_size` indices (default: up to index
2**31 - 2, far more images than any sweep here sees).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "half_disc", "crescent", "bar", "arrow")
NUM_CLASSES = len(CLASS_NAMES)
DATA_SEED = 0                    # the dataset's own seed: fixed, so every run sees the same images
HELD_OUT_SIZE = 10_000           # indices [0, HELD_OUT_SIZE) are the held-out split
MAX_INDEX = 2 ** 31 - 1          # int32 range: exclusive upper bound of the index space
DEFAULT_TRAIN_SIZE = MAX_INDEX - HELD_OUT_SIZE
SPLITS = ("train", "val", "test")
MIN_RESOLUTION = 8
SUPERSAMPLE = 4                  # drawn at 4× then area-averaged: 16 sub-samples per pixel
RADIUS_RANGE = (0.22, 0.42)      # circumradius as a fraction of the image side
MIN_CONTRAST = 120.0             # Euclidean RGB distance (0..255 scale) between shape and background

# Unit outlines (circumradius 1, centred at 0, y up) of the polygon classes.
_STAR_INNER = 0.42               # inner / outer radius of the five-pointed star
_CROSS_HALF_WIDTH = 0.32         # half-width of a cross arm, relative to its half-length
_BAR_HALF_HEIGHT = 0.3           # the bar is a 1 × 0.3 (half-extents) rectangle
_RING_INNER = 0.55               # inner / outer radius of the ring
_CRESCENT_CUT = (0.8, 0.5)       # radius and centre offset of the disc cut out of the crescent (× radius)


def _regular(n: int, start_deg: float, radii=(1.0,)) -> np.ndarray:
    angles = np.deg2rad(start_deg) + np.arange(n * len(radii)) * 2 * np.pi / (n * len(radii))
    r = np.resize(np.asarray(radii, np.float64), len(angles))
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


_a, _b = 1.0, _CROSS_HALF_WIDTH
_POLYGONS = {
    "square": _regular(4, 45.0),
    "triangle": _regular(3, 90.0),
    "star": _regular(5, 90.0, radii=(1.0, _STAR_INNER)),
    "cross": np.array([(_b, _b), (_b, _a), (-_b, _a), (-_b, _b), (-_a, _b), (-_a, -_b), (-_b, -_b), (-_b, -_a),
                       (_b, -_a), (_b, -_b), (_a, -_b), (_a, _b)]),
    "bar": np.array([(1.0, _BAR_HALF_HEIGHT), (-1.0, _BAR_HALF_HEIGHT), (-1.0, -_BAR_HALF_HEIGHT),
                     (1.0, -_BAR_HALF_HEIGHT)]),
    "arrow": np.array([(1.0, 0.0), (0.15, 0.6), (0.15, 0.22), (-1.0, 0.22), (-1.0, -0.22), (0.15, -0.22),
                       (0.15, -0.6)]),
}
del _a, _b


def label_of(index: int) -> int:
    return int(index) % NUM_CLASSES


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    background = rng.integers(0, 256, size=3)
    while True:    # rejection sampling: terminates quickly (most colour pairs qualify), deterministic per rng
        foreground = rng.integers(0, 256, size=3)
        if np.linalg.norm((foreground - background).astype(np.float64)) >= MIN_CONTRAST:
            return tuple(int(c) for c in background), tuple(int(c) for c in foreground)


def render(index: int, resolution: int = 32, seed: int = DATA_SEED) -> np.ndarray:
    """Image `index` of the dataset: uint8 (resolution, resolution, 3); its class is label_of(index)."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"shapes resolution must be at least {MIN_RESOLUTION}, got {resolution}")
    rng = np.random.default_rng([int(seed), int(index)])
    name = CLASS_NAMES[label_of(index)]
    radius = rng.uniform(*RADIUS_RANGE)
    centre = rng.uniform(radius, 1.0 - radius, size=2)
    angle = rng.uniform(0.0, 2 * np.pi)
    background, foreground = _colours(rng)

    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    scale = radius * side
    cx, cy = centre * side

    def to_pixels(points: np.ndarray) -> list[tuple[float, float]]:
        c, s = np.cos(angle), np.sin(angle)
        rotated = points @ np.array([[c, s], [-s, c]])
        return [(cx + x * scale, cy - y * scale) for x, y in rotated]   # image y grows downwards

    def disc(x: float, y: float, r: float, colour):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)

    if name in _POLYGONS:
        draw.polygon(to_pixels(_POLYGONS[name]), fill=foreground)
    elif name == "circle":
        disc(cx, cy, scale, foreground)
    elif name == "ring":
        disc(cx, cy, scale, foreground)
        disc(cx, cy, scale * _RING_INNER, background)
    elif name == "half_disc":
        start = np.rad2deg(angle)
        draw.pieslice([cx - scale, cy - scale, cx + scale, cy + scale], start, start + 180.0, fill=foreground)
    elif name == "crescent":
        cut_radius, offset = _CRESCENT_CUT
        (ox, oy), = to_pixels(np.array([[offset, 0.0]]))
        disc(cx, cy, scale, foreground)
        disc(ox, oy, scale * cut_radius, background)
    else:  # pragma: no cover - CLASS_NAMES and the drawing code are kept in step
        raise AssertionError(name)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def split_range(split: str, train_size: int = DEFAULT_TRAIN_SIZE) -> tuple[int, int]:
    """[start, stop) of `split` in the index space; the held-out range and the training range are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
    if split != "train":
        return 0, HELD_OUT_SIZE
    if not 1 <= train_size <= MAX_INDEX - HELD_OUT_SIZE:
        raise ValueError(f"shapes train_size must be in [1, {MAX_INDEX - HELD_OUT_SIZE}], got {train_size}")
    return HELD_OUT_SIZE, HELD_OUT_SIZE + train_size


class ShapesSource:
    """Random-access source of {'image': uint8 (R, R, 3), 'label': int32} for grain; item i of a split is
    image start + i of the index space."""

    num_classes = NUM_CLASSES

    def __init__(self, resolution: int = 32, split: str = "train", seed: int = DATA_SEED,
                 train_size: int = DEFAULT_TRAIN_SIZE):
        if resolution < MIN_RESOLUTION:
            raise ValueError(f"shapes resolution must be at least {MIN_RESOLUTION}, got {resolution}")
        self.resolution, self.split, self.seed = int(resolution), split, int(seed)
        self.start, self.stop = split_range(split, int(train_size))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"shapes {self.split} index {index} out of range [0, {len(self)})")
        global_index = self.start + index
        return {"image": render(global_index, self.resolution, self.seed),
                "label": np.int32(label_of(global_index))}

    def __repr__(self) -> str:
        return f"ShapesSource(resolution={self.resolution}, split={self.split!r}, seed={self.seed}, len={len(self)})"
