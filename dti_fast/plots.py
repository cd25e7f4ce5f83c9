"""Image sheets and the benchmark report's plots, drawn with PIL alone.

The report needs three small figures (a metric trade-off scatter, learned-vector
norms against the vocabulary's norm histogram, image strips) and the generator
a contact sheet. PIL is already a dependency; drawing these by hand keeps
matplotlib (and its font cache and backends) out of the install, and the
output is the same on every machine. Every function returns a ``PIL.Image``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["image_grid", "image_strip", "line_plot", "scatter_plot", "norm_histogram", "PALETTE"]

#: Colours for series (methods), in order.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _fit(draw, text: str, font, width: float) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _tile(im, min_tile: int | None, max_tile: int | None):
    """``im`` scaled so its longer side is at most ``max_tile`` and its shorter side at least ``min_tile``."""
    from PIL import Image

    im = im.convert("RGB")
    if max_tile and max(im.size) > max_tile:
        f = max_tile / max(im.size)
        im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.Resampling.LANCZOS)
    if min_tile and min(im.size) < min_tile:
        f = math.ceil(min_tile / min(im.size))
        im = im.resize((im.size[0] * f, im.size[1] * f), Image.Resampling.NEAREST)
    return im


def image_grid(
    images: Sequence,
    columns: int,
    labels: Sequence[str] | None = None,
    label_size: int = 11,
    min_tile: int | None = None,
    max_tile: int | None = None,
):
    """Tiles in rows of ``columns``; ``labels`` (one per tile) are written under each tile.

    Tiles are scaled to at most ``max_tile`` px (longer side) and at least ``min_tile`` px
    (shorter side, nearest-neighbour, so tiny test images stay legible) when given.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid needs at least one image")
    images = [_tile(im, min_tile, max_tile) for im in images]
    columns = max(1, min(columns, len(images)))
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    font = _font(label_size)
    label_h = label_size + 6 if labels else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, im in enumerate(images):
        x, y = (k % columns) * w, (k // columns) * (h + label_h)
        sheet.paste(im.convert("RGB"), (x, y))
        if labels:
            draw.text((x + 2, y + h + 2), _fit(draw, str(labels[k]), font, w - 4), fill="black", font=font)
    return sheet


def image_strip(
    images: Sequence,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    min_tile: int = 128,
    max_tile: int = 384,
):
    """One row of images (scaled to ``min_tile``..``max_tile`` px) with labels and a title."""
    from PIL import Image, ImageDraw

    strip = image_grid(images, columns=len(images), labels=labels, min_tile=min_tile, max_tile=max_tile)
    if not title:
        return strip
    font = _font(13)
    out = Image.new("RGB", (strip.size[0], strip.size[1] + 20), "white")
    out.paste(strip, (0, 20))
    draw = ImageDraw.Draw(out)
    draw.text((4, 3), _fit(draw, title, font, strip.size[0] - 8), fill="black", font=font)
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    ticks, v = [], first
    while v <= hi + 1e-12 * abs(hi):
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 and float(v).is_integer() and a < 1e7:
        return str(int(v))
    if a >= 1000 or a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3g}"


class _Axes:
    """A plot area with linear (or log10) x and linear y, axes, ticks and labels."""

    def __init__(self, size=(640, 440), margin=(70, 30, 40, 55), title="", xlabel="", ylabel=""):
        from PIL import Image, ImageDraw

        self.im = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.im)
        self.left, self.top, self.right, self.bottom = margin[0], margin[1], size[0] - margin[2], size[1] - margin[3]
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.font, self.small = _font(13), _font(11)
        self.xlog = False

    def set_limits(self, x0, x1, y0, y1, xlog=False):
        self.xlog = xlog
        if xlog:
            x0, x1 = math.log10(x0), math.log10(x1)
        if x1 <= x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if y1 <= y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1

    def px(self, x: float, y: float) -> tuple[float, float]:
        if self.xlog:
            x = math.log10(max(x, 1e-30))
        fx = (x - self.x0) / (self.x1 - self.x0)
        fy = (y - self.y0) / (self.y1 - self.y0)
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)

    def frame(self):
        d = self.draw
        d.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        if self.xlog:
            xt = [10.0**e for e in range(math.floor(self.x0), math.ceil(self.x1) + 1)]
            for base in list(xt):
                xt += [base * 2, base * 5]
            xt = sorted(v for v in xt if self.x0 <= math.log10(v) <= self.x1)
        else:
            xt = _nice_ticks(self.x0, self.x1)
        for v in xt:
            x, _ = self.px(v, self.y0)
            d.line([x, self.bottom, x, self.bottom + 4], fill="black")
            label = _fmt(v)
            d.text((x - _text_width(d, label, self.small) / 2, self.bottom + 6), label, fill="black", font=self.small)
        for v in _nice_ticks(self.y0, self.y1):
            _, y = self.px(self.x0 if not self.xlog else 10**self.x0, v)
            d.line([self.left - 4, y, self.left, y], fill="black")
            label = _fmt(v)
            d.text((self.left - 6 - _text_width(d, label, self.small), y - 6), label, fill="black", font=self.small)
        if self.title:
            d.text((self.left, 8), self.title, fill="black", font=self.font)
        if self.xlabel:
            w = _text_width(d, self.xlabel, self.font)
            d.text(((self.left + self.right - w) / 2, self.im.size[1] - 22), self.xlabel, fill="black", font=self.font)
        if self.ylabel:
            from PIL import Image, ImageDraw

            w = int(_text_width(d, self.ylabel, self.font)) + 4
            tmp = Image.new("RGB", (w, 16), "white")
            ImageDraw.Draw(tmp).text((2, 1), self.ylabel, fill="black", font=self.font)
            tmp = tmp.rotate(90, expand=True)
            self.im.paste(tmp, (6, int((self.top + self.bottom - tmp.size[1]) / 2)))

    def legend(self, entries: Sequence[tuple[str, str]]):
        d = self.draw
        y = self.top + 6
        for label, colour in entries:
            w = _text_width(d, label, self.small)
            x = self.right - w - 22
            d.rectangle([x, y + 2, x + 10, y + 12], fill=colour)
            d.text((x + 14, y), label, fill="black", font=self.small)
            y += 16


def _padded(lo: float, hi: float, frac: float = 0.08) -> tuple[float, float]:
    if hi <= lo:
        pad = abs(lo) * 0.1 or 0.05
        return lo - pad, hi + pad
    pad = (hi - lo) * frac
    return lo - pad, hi + pad


def scatter_plot(series: dict[str, dict], title: str = "", xlabel: str = "", ylabel: str = "", size=(640, 440)):
    """Scatter of named series: ``{name: {"points": [(x, y), ...], "mean": (x, y) or None}}``.

    Small dots are the points (e.g. subjects), a large labelled dot the mean (e.g. the method).
    Non-finite points are skipped.
    """
    ax = _Axes(size=size, title=title, xlabel=xlabel, ylabel=ylabel)
    xs, ys = [], []
    for s in series.values():
        for x, y in list(s.get("points", [])) + ([s["mean"]] if s.get("mean") else []):
            if math.isfinite(x) and math.isfinite(y):
                xs.append(x)
                ys.append(y)
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    ax.set_limits(*_padded(min(xs), max(xs)), *_padded(min(ys), max(ys)))
    ax.frame()
    d = ax.draw
    legend = []
    for k, (name, s) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        legend.append((name, colour))
        for x, y in s.get("points", []):
            if math.isfinite(x) and math.isfinite(y):
                px, py = ax.px(x, y)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], outline=colour)
        if s.get("mean") and all(math.isfinite(v) for v in s["mean"]):
            px, py = ax.px(*s["mean"])
            d.ellipse([px - 7, py - 7, px + 7, py + 7], fill=colour, outline="black")
            d.text((px + 9, py - 7), name, fill=colour, font=ax.font)
    ax.legend(legend)
    return ax.im


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size=(640, 400),
):
    """Lines of named series ``{name: [(x, y), ...]}`` (e.g. a loss per concept over steps).

    Non-finite points are skipped.
    """
    ax = _Axes(size=size, title=title, xlabel=xlabel, ylabel=ylabel)
    clean = {name: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for name, pts in series.items()}
    xs = [x for pts in clean.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in clean.values() for _, y in pts] or [0.0, 1.0]
    ax.set_limits(min(xs), max(xs), *_padded(min(ys), max(ys)))
    ax.frame()
    legend = []
    for k, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[k % len(PALETTE)]
        legend.append((name, colour))
        if len(pts) == 1:
            px, py = ax.px(*pts[0])
            ax.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        elif pts:
            ax.draw.line([ax.px(x, y) for x, y in pts], fill=colour, width=2)
    ax.legend(legend)
    return ax.im


def norm_histogram(
    vocab_norms: Sequence[float],
    marks: dict[str, Sequence[float]],
    reference: float | None = None,
    title: str = "",
    bins: int = 60,
    size=(640, 400),
):
    """Histogram of the vocabulary's row norms (log10 x axis) with the learned norms of each series as ticks.

    ``marks`` maps a series name (method) to its learned vector norms; each is drawn as a coloured
    tick row under the histogram (one row per series), ``reference`` (m*) as a dashed vertical line.
    """
    values = [float(v) for v in vocab_norms if v > 0 and math.isfinite(v)]
    if not values:
        raise ValueError("norm_histogram: the vocabulary has no positive norms")
    all_marks = [float(v) for vs in marks.values() for v in vs if v > 0 and math.isfinite(v)]
    lo = min(values + all_marks)
    hi = max(values + all_marks)
    lo, hi = lo / 1.25, hi * 1.25
    lg_lo, lg_hi = math.log10(lo), math.log10(hi)
    counts = [0] * bins
    for v in values:
        k = int((math.log10(v) - lg_lo) / (lg_hi - lg_lo) * bins)
        counts[min(max(k, 0), bins - 1)] += 1
    top = max(counts)
    n_rows = max(1, len(marks))
    ax = _Axes(
        size=(size[0], size[1] + 14 * n_rows),
        margin=(70, 30, 40, 55 + 14 * n_rows),
        title=title,
        xlabel="L2 norm (log scale)",
        ylabel="vocabulary rows",
    )
    ax.set_limits(lo, hi, 0, top * 1.1, xlog=True)
    d = ax.draw
    for k, c in enumerate(counts):
        if c:
            x0, _ = ax.px(10 ** (lg_lo + k * (lg_hi - lg_lo) / bins), 0)
            x1, y = ax.px(10 ** (lg_lo + (k + 1) * (lg_hi - lg_lo) / bins), c)
            d.rectangle([x0, y, max(x0, x1 - 1), ax.bottom], fill="#b0b0b0")
    ax.frame()
    if reference is not None and reference > 0:
        x, _ = ax.px(reference, 0)
        for y in range(int(ax.top), int(ax.bottom), 8):
            d.line([x, y, x, min(y + 4, ax.bottom)], fill="black", width=1)
        d.text((x + 3, ax.top + 2), f"m* = {reference:.4g}", fill="black", font=ax.small)
    legend = []
    for r, (name, vs) in enumerate(marks.items()):
        colour = PALETTE[r % len(PALETTE)]
        legend.append((name, colour))
        y = ax.bottom + 22 + 14 * r + 14
        for v in vs:
            if v > 0 and math.isfinite(v):
                x, _ = ax.px(v, 0)
                d.line([x, y - 5, x, y + 5], fill=colour, width=2)
                d.line([x, ax.bottom - 6, x, ax.bottom], fill=colour, width=2)
    ax.legend(legend)
    return ax.im
