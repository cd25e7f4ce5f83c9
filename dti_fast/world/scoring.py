"""Scorers that read the toy world's attributes back from pixels.

One small CNN, trained only on renders of the world (ordinary scenes, the novel concepts, their
look-alikes and the outlined style), predicts: the background colour and texture, the style,
and for each of the five slots which shape (or concept, or nothing) sits there and in which
colour. From these, :func:`text_fidelity` checks the attributes a prompt states and
:func:`subject_score` says how much the image shows a concept. :func:`validate` measures the
scorer on fresh renders (other seeds) before it scores any model.

The renders it learns from are noised and blurred at random so that it reads generated
images too; how well it does on renders is reported, on generations it can only be trusted
as far as those look like renders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import concepts as C
from . import render as R

SHAPE_CLASSES = ("empty",) + R.SHAPES + tuple(c.name for c in C.OBJECTS)
COLOUR_CLASSES = ("empty",) + R.COLOUR_NAMES + ("concept",)
STYLE_CLASSES = R.STYLES
HEADS = {"bg": len(R.COLOUR_NAMES), "texture": len(R.TEXTURES), "style": len(STYLE_CLASSES)}
for _i in range(len(R.POSITIONS)):
    HEADS[f"shape{_i}"] = len(SHAPE_CLASSES)
    HEADS[f"colour{_i}"] = len(COLOUR_CLASSES)


class Scorer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        ch = (24, 48, 64, 64)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, ch[0], 3, 2, 1),
            torch.nn.BatchNorm2d(ch[0]),
            torch.nn.ReLU(),
            torch.nn.Conv2d(ch[0], ch[1], 3, 2, 1),
            torch.nn.BatchNorm2d(ch[1]),
            torch.nn.ReLU(),
            torch.nn.Conv2d(ch[1], ch[2], 3, 2, 1),
            torch.nn.BatchNorm2d(ch[2]),
            torch.nn.ReLU(),
            torch.nn.Conv2d(ch[2], ch[3], 3, 1, 1),
            torch.nn.BatchNorm2d(ch[3]),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(ch[3] * 64, 256),
            torch.nn.ReLU(),
        )
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(256, n) for k, n in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {k: head(h) for k, head in self.heads.items()}


def labels(spec: R.Spec) -> dict[str, int]:
    out = {
        "bg": R.COLOUR_NAMES.index(spec.bg),
        "texture": R.TEXTURES.index(spec.texture),
        "style": STYLE_CLASSES.index(spec.style),
    }
    at = {o.slot: o for o in spec.objects}
    for i, slot in enumerate(R.POSITIONS):
        o = at.get(slot)
        out[f"shape{i}"] = SHAPE_CLASSES.index(o.shape) if o else 0
        out[f"colour{i}"] = (
            0 if o is None else (COLOUR_CLASSES.index(o.colour) if o.colour else len(COLOUR_CLASSES) - 1)
        )
    return out


def scorer_specs(n: int, seed: int) -> list[R.Spec]:
    """The scorer's data: ordinary scenes, concept scenes, look-alikes and outlined scenes."""
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(n):
        u = rng.random()
        if u < 0.45:
            specs.append(R.sample_spec(rng, held=None))
        elif u < 0.70:
            c = C.OBJECTS[rng.integers(len(C.OBJECTS))]
            specs.append(C.concept_spec(c, rng, second=None))
        elif u < 0.85:  # look-alike: a named thing next to a concept (its shape in a neighbour colour, ...)
            specs.append(C.lookalike_spec(C.OBJECTS[rng.integers(len(C.OBJECTS))], rng))
        else:
            specs.append(R.sample_spec(rng, held=None, style="outlined"))
        if specs[-1].style == "plain" and rng.random() < 0.1:
            specs[-1].style = "outlined"
    return specs


def to_input(images) -> torch.Tensor:
    """PIL images or a uint8 NHWC array -> float NCHW in [0, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB").resize((R.SIZE, R.SIZE))) for im in images])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    blur = torch.rand(n, generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        w = k.expand(3, 1, 3, 3)
        x = torch.where(blur.view(-1, 1, 1, 1), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, groups=3), x)
    x = x * (1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5))
    x = x + torch.rand(n, 1, 1, 1, generator=gen) * 0.06 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def train_scorer(
    steps: int = 1500,
    n: int = 12000,
    batch: int = 64,
    seed: int = 0,
    log: Callable = print,
    minutes: float | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[Scorer, dict]:
    """The scorer trained on ``n`` fresh renders, and what its training did (steps, images, seconds).

    ``check`` (a build's stop check, which may raise) is called every 256 renders and every 20 steps.
    """
    t0 = time.perf_counter()
    specs = scorer_specs(n, seed)
    images = []
    for i, spec in enumerate(specs):
        if check is not None and i % 256 == 0:
            check()
        images.append(np.asarray(R.render(spec)))
    images = np.stack(images)
    y = {k: torch.tensor([labels(s)[k] for s in specs]) for k in HEADS}
    x_all = to_input(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Scorer()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    total = steps
    model.train()
    t1 = time.perf_counter()
    for step in range(steps):
        if minutes and step == 20:
            fit = int(minutes * 60 / ((time.perf_counter() - t1) / 20))
            total = min(total, max(100, fit))
        if step >= total:
            break
        if check is not None and step % 20 == 0:
            check()
        for g in opt.param_groups:
            g["lr"] = 2e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / total)))
        idx = torch.randint(0, n, (batch,), generator=gen)
        out = model(_augment(x_all[idx], gen))
        loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0:
            log(f"scorer step {step}/{total} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return model, {"steps": total, "images": n, "seconds": time.perf_counter() - t0}


def save_scorer(model: Scorer, folder: Path, meta: dict) -> None:
    """The scorer's weights (fp16 safetensors) and ``scorer.json`` (classes, training, validation), atomically."""
    from ..io import save_safetensors, write_json

    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        {k: v.detach().half() for k, v in model.state_dict().items() if v.is_floating_point()},
        folder / "scorer.safetensors",
    )
    write_json({"shape_classes": SHAPE_CLASSES, "colour_classes": COLOUR_CLASSES, **meta}, folder / "scorer.json")


def load_scorer(folder: Path) -> Scorer:
    from safetensors.torch import load_file

    model = Scorer()
    state = {k: v.float() for k, v in load_file(str(Path(folder) / "scorer.safetensors")).items()}
    model.load_state_dict(state, strict=False)  # BatchNorm's num_batches_tracked is not saved
    model.eval()
    return model


@torch.no_grad()
def predict(model: Scorer, images, batch: int = 256) -> dict[str, np.ndarray]:
    x = images if isinstance(images, torch.Tensor) else to_input(images)
    outs: dict[str, list] = {k: [] for k in HEADS}
    for i in range(0, len(x), batch):
        o = model(x[i : i + batch])
        for k in HEADS:
            outs[k].append(o[k].softmax(-1))
    return {k: torch.cat(v).numpy() for k, v in outs.items()}


@torch.no_grad()
def features(model: Scorer, images, batch: int = 256) -> np.ndarray:
    """The scorer's 256-d penultimate features, L2-normalized (a DINO-like descriptor of the image)."""
    x = images if isinstance(images, torch.Tensor) else to_input(images)
    out = [F.normalize(model.body(x[i : i + batch]), dim=-1) for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()


def reference_similarity(model: Scorer, images, references) -> np.ndarray:
    """Per image: the mean cosine of its features to each reference image's (the paper's DINO protocol)."""
    return (features(model, images) @ features(model, references).T).mean(-1)


def _row(pred: dict, i: int) -> dict:
    return {k: v[i] for k, v in pred.items()}


def read_scene(p: dict) -> dict:
    """The argmax reading of one image's predictions: bg, texture, style, and per slot (shape, colour)."""
    slots = [
        (SHAPE_CLASSES[int(p[f"shape{s}"].argmax())], COLOUR_CLASSES[int(p[f"colour{s}"].argmax())])
        for s in range(len(R.POSITIONS))
    ]
    return {
        "bg": R.COLOUR_NAMES[int(p["bg"].argmax())],
        "texture": R.TEXTURES[int(p["texture"].argmax())],
        "style": STYLE_CLASSES[int(p["style"].argmax())],
        "slots": slots,
    }


def attribute_checks(p: dict, attrs: dict, subject: str | None = None) -> dict[str, bool]:
    """Which stated attributes the image shows. ``subject``: the concept standing in for the main object
    (then main shape and colour are not text attributes; position means the slot holds something
    that is not the second object)."""
    s = read_scene(p)
    slots = s["slots"]
    ok: dict[str, bool] = {}
    if "bg" in attrs:
        ok["bg"] = s["bg"] == attrs["bg"]
    if "texture" in attrs:
        ok["texture"] = s["texture"] == attrs["texture"]
    if subject is None and "main_shape" in attrs:
        main = [i for i, (sh, _) in enumerate(slots) if sh == attrs["main_shape"]]
        ok["main_shape"] = bool(main)
        if "main_colour" in attrs:
            ok["main_colour"] = any(slots[i][1] == attrs["main_colour"] for i in main)
        if "count" in attrs:
            ok["count"] = len(main) == attrs["count"]
    if "position" in attrs:
        sh = slots[R.POSITIONS.index(attrs["position"])][0]
        if subject is None:
            ok["position"] = sh == attrs["main_shape"]
        else:
            ok["position"] = sh not in ("empty", attrs.get("second_shape"))
    if "second_shape" in attrs:
        ok["second_shape"] = any(sh == attrs["second_shape"] for sh, _ in slots)
        ok["second_colour"] = any(c == attrs["second_colour"] for sh, c in slots if sh != "empty")
    return ok


def text_fidelity(p: dict, attrs: dict, subject: str | None = None) -> float | None:
    ok = attribute_checks(p, attrs, subject)
    return float(np.mean(list(ok.values()))) if ok else None


def subject_score(p: dict, concept: str) -> float:
    """Objects: the highest probability over the slots that the concept sits there; styles: P(style)."""
    if concept in STYLE_CLASSES:
        return float(p["style"][STYLE_CLASSES.index(concept)])
    k = SHAPE_CLASSES.index(concept)
    return float(max(p[f"shape{s}"][k] for s in range(len(R.POSITIONS))))


def _subject_validation(model, c, pos: list, neg: list) -> dict:
    """How the subject scores separate renders of concept ``c`` (``pos``) from look-alikes (``neg``)."""
    ims = np.stack([np.asarray(R.render(s)) for s in pos + neg])
    pr = predict(model, ims)
    sc = np.array([subject_score(_row(pr, i), c.name) for i in range(len(ims))])
    y = np.array([1] * len(pos) + [0] * len(neg))
    refs = np.stack([np.asarray(R.render(s)) for s in C.photo_specs(c)])
    cos = reference_similarity(model, ims, refs)
    n = len(pos)
    return {
        "accuracy": float(((sc > 0.5) == y).mean()),
        "mean_pos": float(sc[:n].mean()),
        "mean_lookalike": float(sc[n:].mean()),
        "cos_pos": float(cos[:n].mean()),
        "cos_lookalike": float(cos[n:].mean()),
        "cos_auc": float((cos[:n, None] > cos[None, n:]).mean()),
    }


def validate(model: Scorer, seed: int = 12345, n: int = 1200) -> dict:
    """Accuracy on fresh renders (seeds never used in training): per head, the attribute checks of
    full captions, and concept-vs-look-alike discrimination of the subject score."""
    specs = scorer_specs(n, seed)
    images = np.stack([np.asarray(R.render(s)) for s in specs])
    pred = predict(model, images)
    report: dict = {"renders": n, "heads": {}}
    for k in ("bg", "texture", "style"):
        y = np.array([labels(s)[k] for s in specs])
        report["heads"][k] = float((pred[k].argmax(-1) == y).mean())
    for kind in ("shape", "colour"):
        accs = []
        for i in range(len(R.POSITIONS)):
            y = np.array([labels(s)[f"{kind}{i}"] for s in specs])
            accs.append((pred[f"{kind}{i}"].argmax(-1) == y).mean())
        report["heads"][f"slot_{kind}"] = float(np.mean(accs))
    # attribute checks on plain scenes with full captions: what text fidelity reads on perfect images
    checks: dict[str, list] = {}
    for i, s in enumerate(specs):
        if s.style != "plain" or s.main[0].shape not in R.SHAPES:
            continue
        for a, v in attribute_checks(_row(pred, i), R.stated_attributes(s)).items():
            checks.setdefault(a, []).append(v)
    report["attributes"] = {a: float(np.mean(v)) for a, v in checks.items()}
    report["text_fidelity_on_renders"] = float(np.mean([x for v in checks.values() for x in v]))
    # subject: concept renders vs look-alike renders (and other scenes), threshold 0.5
    rng = np.random.default_rng(seed + 1)
    subj = {}
    for c in C.OBJECTS:
        pos = [C.concept_spec(c, rng, second=None) for _ in range(60)]
        neg = [C.lookalike_spec(c, rng) for _ in range(60)]
        subj[c.name] = _subject_validation(model, c, pos, neg)
    for c in C.STYLES:
        pos = [C.concept_spec(c, rng) for _ in range(60)]
        neg = [R.sample_spec(rng, held=None) for _ in range(60)]
        subj[c.name] = _subject_validation(model, c, pos, neg)
    report["subject"] = subj
    return report
