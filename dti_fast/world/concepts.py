"""Novel concepts: objects and a style that no caption of the base model names.

Each object concept is drawn by its own function (registered in
:data:`dti_fast.world.render.CONCEPT_DRAWERS`): a base shape with a pattern, a two-colour
scheme or an extra part. Its "photos" (the DreamBooth analogue) show it alone, at varied
slots, sizes and backgrounds. The style concept renders ordinary scenes outlined only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from . import render as R


@dataclass(frozen=True)
class WorldConcept:
    name: str
    kind: str  # "object" or "style"
    init: str  # initializer word (a world word)
    base_shape: str | None  # objects: the shape word it looks most like
    colours: tuple  # colour words it uses (second objects in prompts avoid them)
    lookalike_colour: str | None  # objects: the plain base shape in this colour is its look-alike


def _band_circle(draw: ImageDraw.ImageDraw, cx, cy, r, style):
    R.draw_shape(draw, "circle", cx, cy, r, R.COLOURS["red"], style)
    if style != "outlined":  # a white band through the middle (the pattern)
        draw.chord([cx - r, cy - r, cx + r, cy + r], 200, 340, fill=R.COLOURS["red"])
        h = r * 0.28
        draw.rectangle([cx - r * 0.96, cy - h, cx + r * 0.96, cy + h], fill=(250, 250, 250))


def _split_square(draw, cx, cy, r, style):
    s = r * 0.88
    if style == "outlined":
        R.draw_shape(draw, "square", cx, cy, r, R.COLOURS["blue"], style)
        return
    draw.rectangle([cx - s, cy - s, cx, cy + s], fill=R.COLOURS["blue"])  # two-colour scheme
    draw.rectangle([cx, cy - s, cx + s, cy + s], fill=R.COLOURS["yellow"])


def _eyed_triangle(draw, cx, cy, r, style):
    R.draw_shape(draw, "triangle", cx, cy, r, R.COLOURS["green"], style)
    e = r * 0.24  # an extra part: a black eye with a white rim
    draw.ellipse([cx - e * 1.5, cy + r * 0.05 - e * 1.5, cx + e * 1.5, cy + r * 0.05 + e * 1.5], fill=(250, 250, 250))
    draw.ellipse([cx - e, cy + r * 0.05 - e, cx + e, cy + r * 0.05 + e], fill=(10, 10, 10))


def _capped_star(draw, cx, cy, r, style):
    R.draw_shape(draw, "star", cx, cy, r, R.COLOURS["orange"], style)
    c = r * 0.42  # a purple core (pattern + second colour)
    draw.ellipse([cx - c, cy - c, cx + c, cy + c], fill=R.COLOURS["purple"])


OBJECTS = (
    WorldConcept("bandcircle", "object", "circle", "circle", ("red",), "red"),
    WorldConcept("splitsquare", "object", "square", "square", ("blue", "yellow"), "blue"),
    WorldConcept("eyetriangle", "object", "triangle", "triangle", ("green",), "green"),
    WorldConcept("corestar", "object", "star", "star", ("orange", "purple"), "orange"),
)
STYLES = (WorldConcept("outlined", "style", "painting", None, (), None),)
ALL = OBJECTS + STYLES
BY_NAME = {c.name: c for c in ALL}
for _c, _fn in zip(OBJECTS, (_band_circle, _split_square, _eyed_triangle, _capped_star)):
    R.CONCEPT_DRAWERS[_c.name] = _fn


def concept_spec(c: WorldConcept, rng: np.random.Generator, *, second: bool | None = False, held=None) -> R.Spec:
    """A scene showing concept ``c``: the object alone (or with a second object), or a scene in the style."""
    if c.kind == "style":
        return R.sample_spec(rng, held=held, style=c.name, second=second)
    spec = R.sample_spec(rng, held=None, count=1, second=second)
    while spec.bg in c.colours or (
        spec.second is not None and (spec.second.colour in c.colours or spec.second.shape == c.base_shape)
    ):
        spec = R.sample_spec(rng, held=None, count=1, second=second)
    spec.main[0].shape, spec.main[0].colour = c.name, None
    return spec


def photo_specs(c: WorldConcept, n: int = 5, seed: int = 0) -> list[R.Spec]:
    """The specs of concept ``c``'s ``n`` training photos."""
    i = [x.name for x in ALL].index(c.name)
    rng = np.random.default_rng(seed * 1000 + 17 + i)
    specs = []
    for k in range(n):
        spec = concept_spec(c, rng)
        if c.kind == "object":
            spec.main[0].size = "large"  # photos show the object's details
            spec.main[0].slot = R.POSITIONS[(k + i) % len(R.POSITIONS)]  # varied placement
        specs.append(spec)
    return specs


def write_photos(folder: Path, n: int = 5, seed: int = 0, concepts=ALL) -> dict[str, Path]:
    """Render ``n`` training photos per concept into ``folder/<name>/``; returns the folders."""
    out = {}
    for c in concepts:
        d = Path(folder) / c.name
        d.mkdir(parents=True, exist_ok=True)
        for k, spec in enumerate(photo_specs(c, n, seed)):
            R.render(spec).save(d / f"{k:02d}.png")
        out[c.name] = d
    return out
