"""Novel concepts: objects and a style that no caption of the base model names.

Each object concept is drawn by its own function (registered in
:data:`dti_fast.world.render.CONCEPT_DRAWERS`) and is something the base model never saw but
its vocabulary can approach, as a real subject is approached by the words near it: a known
shape in an unnamed colour halfway between two named ones (``tealcircle``, ``magentadiamond``)
or an unnamed shape halfway between two named ones (``roundsquare``, ``fatcross``). Its
"photos" (the DreamBooth analogue) show it alone, at varied slots and backgrounds. The style
concept renders ordinary scenes outlined only, which no world word approaches.
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
    colours: tuple  # colour words it is made of or lies between (backgrounds and second objects avoid them)
    lookalikes: tuple = ()  # objects: (shape, colour) pairs of named things it could be mistaken for


# Unnamed colours: each lies halfway between two named ones, so the base model has seen both neighbours
# but never this colour, and no caption can name it.
TEAL = tuple((a + b) // 2 for a, b in zip(R.COLOURS["green"], R.COLOURS["cyan"]))
MAGENTA = tuple((a + b) // 2 for a, b in zip(R.COLOURS["pink"], R.COLOURS["purple"]))


def _teal_circle(draw: ImageDraw.ImageDraw, cx, cy, r, style):
    R.draw_shape(draw, "circle", cx, cy, r, TEAL, style)  # an unnamed colour on a known shape


def _round_square(draw, cx, cy, r, style):
    s = r * 0.9  # an unnamed shape between a square and a circle: a square with round corners
    box = [cx - s, cy - s, cx + s, cy + s]
    if style == "outlined":
        draw.rounded_rectangle(box, radius=s * 0.55, outline=R.COLOURS["orange"], width=max(1, int(round(r * 0.22))))
    else:
        draw.rounded_rectangle(box, radius=s * 0.55, fill=R.COLOURS["orange"])


def _magenta_diamond(draw, cx, cy, r, style):
    R.draw_shape(draw, "diamond", cx, cy, r, MAGENTA, style)


def _fat_cross(draw, cx, cy, r, style):
    w = r * 0.62  # a cross whose arms are so thick it is halfway to a square
    pts = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
           (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
           (cx - r, cy - w), (cx - w, cy - w)]  # fmt: skip
    if style == "outlined":
        draw.line(pts + [pts[0]], fill=R.COLOURS["blue"], width=max(1, int(round(r * 0.22))), joint="curve")
    else:
        draw.polygon(pts, fill=R.COLOURS["blue"])


OBJECTS = (
    WorldConcept(
        "tealcircle", "object", "circle", "circle", ("green", "cyan"), (("circle", "green"), ("circle", "cyan"))
    ),
    WorldConcept(
        "roundsquare", "object", "square", "square", ("orange",), (("square", "orange"), ("circle", "orange"))
    ),
    WorldConcept(
        "magentadiamond",
        "object",
        "diamond",
        "diamond",
        ("pink", "purple"),
        (("diamond", "pink"), ("diamond", "purple")),
    ),  # fmt: skip
    WorldConcept("fatcross", "object", "cross", "cross", ("blue",), (("cross", "blue"), ("square", "blue"))),
)
STYLES = (WorldConcept("outlined", "style", "painting", None, ()),)
ALL = OBJECTS + STYLES
BY_NAME = {c.name: c for c in ALL}
for _c, _fn in zip(OBJECTS, (_teal_circle, _round_square, _magenta_diamond, _fat_cross)):
    R.CONCEPT_DRAWERS[_c.name] = _fn


def lookalike_spec(c: WorldConcept, rng: np.random.Generator, **kw) -> R.Spec:
    """A scene whose main object is one of ``c``'s named look-alikes (what the subject scorer must reject)."""
    shape, colour = c.lookalikes[rng.integers(len(c.lookalikes))]
    return R.sample_spec(rng, held=None, main_shape=shape, main_colour=colour, **kw)


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
