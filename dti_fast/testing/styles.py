"""Procedural style reference images for tests and ``dti-fast suite --quick``.

Two made-up styles drawn with PIL from a fixed seed, so the style half of the benchmark runs end
to end without a style dataset (StyleDrop's images are not shipped):

- ``stained_glass``: random convex tiles in a jewel palette, separated by thick dark leading;
- ``pointillism``: dense round dots of a warm palette on a pale ground.

They exercise the code path only; nothing is learned about real styles from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..models import build_once

__all__ = ["STYLES_VERSION", "TINY_STYLES", "make_style_images", "tiny_styles_path"]

STYLES_VERSION = 1
#: name -> (class words, initializer words)
TINY_STYLES = {
    "stained_glass": ("stained glass", "stained glass"),
    "pointillism": ("pointillism painting", "pointillism"),
}


def _stained_glass(rng: np.random.Generator, size: int):
    from PIL import Image, ImageDraw

    palette = [(156, 20, 40), (20, 60, 150), (30, 120, 60), (200, 150, 20), (110, 30, 120), (20, 130, 140)]
    img = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    step = size // 6
    for gy in range(-1, 7):
        for gx in range(-1, 7):
            cx, cy = gx * step + rng.integers(0, step), gy * step + rng.integers(0, step)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
            radius = rng.uniform(0.6, 1.0, 6) * step
            pts = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radius)]
            draw.polygon(pts, fill=palette[rng.integers(len(palette))], outline=(15, 15, 15), width=max(2, size // 40))
    return img


def _pointillism(rng: np.random.Generator, size: int):
    from PIL import Image, ImageDraw

    palette = [(230, 120, 40), (240, 190, 60), (200, 60, 60), (90, 140, 200), (120, 170, 80)]
    img = Image.new("RGB", (size, size), (245, 238, 220))
    draw = ImageDraw.Draw(img)
    dot = max(2, size // 32)
    for _ in range(size * size // (dot * dot * 3)):
        x, y = rng.uniform(0, size, 2)
        c = palette[rng.integers(len(palette))]
        draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=c)
    return img


_DRAW = {"stained_glass": _stained_glass, "pointillism": _pointillism}


def make_style_images(folder: Path, size: int = 96, per_style: int = 3, seed: int = 0) -> Path:
    """Write ``<folder>/<style>/NN.png`` for each of :data:`TINY_STYLES` and ``<folder>/styles.json``."""
    folder = Path(folder)
    for k, name in enumerate(sorted(TINY_STYLES)):
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed * 1000 + k)
        for i in range(per_style):
            _DRAW[name](rng, size).save(sub / f"{i:02d}.png")
    table = {n: {"class": c, "initialization": i} for n, (c, i) in TINY_STYLES.items()}
    source = "procedural made-up styles for tests (dti_fast.testing.styles); not real style references"
    (folder / "styles.json").write_text(json.dumps({"source": source, "styles": table}, indent=1), encoding="utf-8")
    return folder


def tiny_styles_path(cache_dir: str | Path | None = None) -> Path:
    """The procedural style folder in dti_fast's cache (``<cache>/tiny-styles-v<N>/``), built once."""
    return build_once(f"tiny-styles-v{STYLES_VERSION}", "styles.json", make_style_images, cache_dir)
