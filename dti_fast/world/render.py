"""Scene specs, the renderer and the caption grammar of the toy world.

A scene is a background (colour, texture) with up to five objects placed on five slots
(four corners and the center): the *main* object (``count`` copies, one shape, colour and
size), optionally a *second* object of another shape and colour, optionally drawn in a
*style*. Objects may also be a novel *concept* (see :mod:`.concepts`), drawn by its own
function. Rendering is deterministic given the spec (``seed`` sets the jitter).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SS = 4  # supersampling factor (anti-aliased shapes)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}
COLOURS = {  # object colours (saturated)
    "red": (225, 30, 30),
    "green": (30, 175, 45),
    "blue": (35, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (150, 45, 190),
    "orange": (250, 135, 20),
    "cyan": (40, 215, 225),
    "pink": (250, 130, 200),
}
COLOUR_NAMES = tuple(COLOURS)
# Background colours: the same words, muted (darker, greyer), so an object never vanishes into them.
BG_COLOURS = {k: tuple(int(0.45 * c + 0.55 * 95) for c in v) for k, v in COLOURS.items()}
TEXTURES = ("plain", "striped", "checkered")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SLOT_XY = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}
SIZES = {"small": 7.5, "large": 11.5}  # radius in pixels
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
STYLES = ("plain", "outlined")  # "plain" is the world's only named-by-default rendering; "outlined" is novel


@dataclass
class Obj:
    shape: str  # a SHAPES word, or a concept name
    colour: str | None  # a COLOUR_NAMES word; None for concepts (they carry their own colours)
    size: str = "large"
    slot: str = "center"


@dataclass
class Spec:
    """One scene. ``main`` objects are ``count`` copies of one thing; ``second`` is optional."""

    bg: str
    texture: str
    main: list[Obj]
    second: Obj | None = None
    style: str = "plain"
    seed: int = 0

    @property
    def count(self) -> int:
        return len(self.main)

    @property
    def objects(self) -> list[Obj]:
        return self.main + ([self.second] if self.second is not None else [])


# --------------------------------------------------------------------------- drawing


def _star_points(cx, cy, r, n=5, inner=0.45, rot=-math.pi / 2):
    pts = []
    for i in range(2 * n):
        rr = r if i % 2 == 0 else r * inner
        a = rot + i * math.pi / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def shape_polygon(shape: str, cx: float, cy: float, r: float):
    """("ellipse", box) or ("polygon", points) or ("cross", [boxes]) for a base shape."""
    if shape == "circle":
        return "ellipse", [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        s = r * 0.88
        return "polygon", [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return "polygon", [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return "polygon", [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        w = r * 0.36
        return "polygon", [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    if shape == "star":
        return "polygon", _star_points(cx, cy, r * 1.1)
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, style: str = "plain"):
    """Draw a base shape at supersampled coordinates; ``style`` "outlined" draws only its outline."""
    kind, geo = shape_polygon(shape, cx, cy, r)
    if style == "outlined":
        width = max(1, int(round(r * 0.22)))
        if kind == "ellipse":
            draw.ellipse(geo, outline=fill, width=width)
        else:
            draw.line(list(geo) + [geo[0]], fill=fill, width=width, joint="curve")
    elif kind == "ellipse":
        draw.ellipse(geo, fill=fill)
    else:
        draw.polygon(geo, fill=fill)


def _background(bg: str, texture: str, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BG_COLOURS[bg], dtype=np.float32)
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    if texture == "plain":
        return img
    alt = base * 0.55 + 255 * 0.25  # a lighter, paler band colour
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    off = int(rng.integers(0, 8))
    if texture == "striped":
        mask = ((yy + off) // 4) % 2 == 0
    elif texture == "checkered":
        mask = (((yy + off) // 8) + ((xx + off) // 8)) % 2 == 0
    else:
        raise ValueError(f"unknown texture {texture!r}")
    img[mask] = alt
    return img


# Concept drawers are registered by :mod:`.concepts`: name -> fn(draw, cx, cy, r, style)
CONCEPT_DRAWERS: dict[str, Callable] = {}


def render(spec: Spec) -> Image.Image:
    """The spec as a 64x64 RGB image (deterministic)."""
    rng = np.random.default_rng(spec.seed)
    bg = _background(spec.bg, spec.texture, rng)
    big = Image.fromarray(bg.astype(np.uint8)).resize((SIZE * SS, SIZE * SS), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for obj in spec.objects:
        x, y = SLOT_XY[obj.slot]
        jx, jy = rng.uniform(-3, 3, size=2)
        r = SIZES[obj.size] * rng.uniform(0.92, 1.08)
        cx, cy, rr = (x + jx) * SS, (y + jy) * SS, r * SS
        if obj.shape in CONCEPT_DRAWERS:
            CONCEPT_DRAWERS[obj.shape](draw, cx, cy, rr, spec.style)
        else:
            draw_shape(draw, obj.shape, cx, cy, rr, COLOURS[obj.colour], spec.style)
    return big.resize((SIZE, SIZE), Image.LANCZOS)


# --------------------------------------------------------------------------- grammar


def shape_words(obj: Obj, count: int) -> str:
    return PLURALS[obj.shape] if count > 1 else obj.shape


def describe(
    spec: Spec,
    *,
    colour=True,
    size=True,
    position=True,
    background=True,
    texture=True,
    second=True,
    main_word: str | None = None,
) -> str:
    """Caption of ``spec``; flags drop attributes. ``main_word`` replaces the main object's noun phrase."""
    m = spec.main[0]
    if main_word is not None:
        head = f"{COUNT_WORDS[spec.count]} {main_word}" if spec.count == 1 else f"{COUNT_WORDS[spec.count]} {main_word}"
    else:
        words = [COUNT_WORDS[spec.count]]
        if size:
            words.append(m.size)
        if colour and m.colour is not None:
            words.append(m.colour)
        words.append(shape_words(m, spec.count))
        head = " ".join(words)
    parts = [head]
    if position and spec.count == 1:
        parts.append("in the center" if m.slot == "center" else f"at the {m.slot}")
    if background:
        tex = f"{spec.texture} " if texture and spec.texture != "plain" else ""
        parts.append(f"on a {tex}{spec.bg} background")
    if second and spec.second is not None:
        parts.append(f"and a {spec.second.colour} {spec.second.shape}")
    return " ".join(parts)


def stated_attributes(spec: Spec, *, position=True, background=True, texture=True, second=True, main=True) -> dict:
    """The attributes a caption made with the same flags states (what text fidelity checks)."""
    out: dict = {}
    m = spec.main[0]
    if main:
        out["main_shape"] = m.shape
        if m.colour is not None:
            out["main_colour"] = m.colour
        out["count"] = spec.count
    if position and spec.count == 1:
        out["position"] = m.slot
    if background:
        out["bg"] = spec.bg
        if texture:
            out["texture"] = spec.texture
    if second and spec.second is not None:
        out["second_shape"] = spec.second.shape
        out["second_colour"] = spec.second.colour
    return out


# --------------------------------------------------------------------------- sampling


def held_out(shape: str, colour: str, bg: str) -> bool:
    """Main (shape, colour, background colour) triples never shown to the base model (the sanity gate's)."""
    i, j, k = SHAPES.index(shape), COLOUR_NAMES.index(colour), COLOUR_NAMES.index(bg)
    return (i + 2 * j + 3 * k) % 7 == 0


def sample_spec(
    rng: np.random.Generator,
    *,
    held: bool | None = False,
    main_shape: str | None = None,
    main_colour: str | None = None,
    count: int | None = None,
    second: bool | None = None,
    style: str = "plain",
) -> Spec:
    """A random scene. ``held``: False = never a held-out triple, True = always one, None = either."""
    for _ in range(1000):
        shape = main_shape or SHAPES[rng.integers(len(SHAPES))]
        colour = main_colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        bg = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        if colour == bg:
            continue
        if shape in SHAPES and held is not None and held_out(shape, colour, bg) != held:
            continue
        break
    else:
        raise RuntimeError("could not sample a spec with these constraints")
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    n = count or int(rng.choice([1, 1, 1, 1, 2, 3]))
    has_second = bool(rng.random() < 0.45) if second is None else second
    slots = list(rng.permutation(POSITIONS))
    if n > 1:  # several copies sit on the corners, never with a stated position
        slots = [s for s in slots if s != "center"] + ["center"]
    size = "small" if rng.random() < 0.4 else "large"
    main = [Obj(shape, colour, size, slots[i]) for i in range(n)]
    sec = None
    if has_second:
        s2 = [s for s in SHAPES if s != shape]
        c2 = [c for c in COLOUR_NAMES if c not in (colour, bg)]
        sec = Obj(
            s2[rng.integers(len(s2))], c2[rng.integers(len(c2))], "small" if rng.random() < 0.5 else "large", slots[n]
        )
    return Spec(bg=bg, texture=texture, main=main, second=sec, style=style, seed=int(rng.integers(2**31)))


def with_main(spec: Spec, shape: str, colour: str | None) -> Spec:
    return replace(spec, main=[replace(o, shape=shape, colour=colour) for o in spec.main])
