"""Interpolating between two learned concepts: slerp on the sphere (DTI) and lerp/slerp for TI.

DTI vectors are ``m* * v`` with ``v`` a unit direction, so the natural path between two
concepts is the great circle between their directions at the fixed norm:
``e(t) = m* * slerp(a / |a|, b / |b|; t)``, vector by vector and text encoder by text
encoder (SDXL: both encoders with the same t). TI vectors have free norms; for them two paths
are offered, so the difference can be seen:

- ``"lerp"``: ``(1 - t) a + t b`` (the straight line; its norm sags in the middle when the
  directions differ),
- ``"slerp"``: slerp of the directions with the norm interpolated linearly per vector
  (for DTI both norms are m*, so this is the DTI path).

:func:`interpolate_concepts` writes one concept folder per t, in the same files training
exports (``learned_embeds.safetensors``, ``learned_embeds_2.safetensors`` for SDXL,
``concept.json``), with the placeholder ``<a-b-t0.25>`` (``<a-b-lerp-t0.25>`` for lerp), so
:func:`dti_fast.generate.generate` and diffusers' ``load_textual_inversion`` load them as they
load any concept; and optionally an image strip (one image per t, same seed and prompt).
Near-identical directions fall back to a normalized lerp, (nearly) antipodal ones are refused
(:func:`dti_fast.sphere.slerp`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .concept_files import ConceptEmbeddings, read_concept
from .io import write_json
from .sphere import SLERP_ANTIPODAL_THRESHOLD, slerp

__all__ = [
    "MODES",
    "InterpolationResult",
    "interpolate_concepts",
    "interpolate_vectors",
    "interpolation_times",
    "interpolation_vectors",
]

MODES = ("slerp", "lerp")
#: Relative difference below which two concepts' m* count as the same.
SCALE_RTOL = 1e-5


def interpolation_times(steps: int) -> list[float]:
    """``steps`` evenly spaced t in [0, 1], both ends included (steps >= 2)."""
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (t = 0 and t = 1 included), got {steps!r}")
    return [round(k / (steps - 1), 6) for k in range(steps)]


def interpolate_vectors(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    mode: str = "slerp",
    scale: float | None = None,
) -> torch.Tensor:
    """Interpolate two stacks of vectors ``(n, dim)`` row by row.

    ``mode="slerp"``: slerp of the directions; the norm is ``scale`` (m*, DTI) when given, else
    ``(1 - t) |a| + t |b|`` per row. ``mode="lerp"``: ``(1 - t) a + t b``. Raises ``ValueError``
    for different shapes or (slerp) a pair of (nearly) antipodal rows.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate vectors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    a32, b32 = a.detach().float(), b.detach().float()
    if mode == "lerp":
        return (1.0 - t) * a32 + t * b32
    direction = slerp(a32, b32, float(t))
    if scale is not None:
        return direction * float(scale)
    na = torch.linalg.vector_norm(a32, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b32, dim=-1, keepdim=True)
    return direction * ((1.0 - t) * na + t * nb)


def _scales(c: ConceptEmbeddings) -> list[float | None]:
    """m* per encoder for a DTI concept (concept.json), None for TI-like vectors."""
    encs = c.info.get("encoders") or []
    out: list[float | None] = []
    for e in range(len(c.vectors)):
        s = encs[e].get("scale") if e < len(encs) and isinstance(encs[e], dict) else None
        out.append(float(s) if s is not None and c.method in (None, "dti") else None)
    return out


def _check_pair(a: ConceptEmbeddings, b: ConceptEmbeddings) -> None:
    if len(a.vectors) != len(b.vectors):
        raise ValueError(
            f"concept {a.source} has vectors for {len(a.vectors)} text encoder(s) and {b.source} for "
            f"{len(b.vectors)}: they were trained on different model families; interpolate concepts of one model"
        )
    if a.n_vectors != b.n_vectors:
        raise ValueError(
            f"concept {a.source} has {a.n_vectors} vector(s) per text encoder ({' '.join(a.tokens)}) and {b.source} "
            f"has {b.n_vectors} ({' '.join(b.tokens)}); slerp pairs vectors one to one, so both need the same count: "
            "retrain one with an initializer of as many tokenizer pieces as the other's"
        )
    for e, (va, vb) in enumerate(zip(a.vectors, b.vectors)):
        if va.shape[-1] != vb.shape[-1]:
            raise ValueError(
                f"text encoder {e + 1}: {a.source} has vectors of size {va.shape[-1]} and {b.source} of size "
                f"{vb.shape[-1]}: they belong to different models; interpolate concepts of one model"
            )
    ma, mb = a.info.get("model"), b.info.get("model")
    if ma and mb and ma != mb:
        import warnings

        warnings.warn(f"interpolating concepts trained on different models ({ma} and {mb})", stacklevel=3)


def _check_antipodal(a: ConceptEmbeddings, b: ConceptEmbeddings) -> None:
    for e, (va, vb) in enumerate(zip(a.vectors, b.vectors)):
        cos = torch.nn.functional.cosine_similarity(va.float(), vb.float(), dim=-1).clamp(-1, 1)
        theta = torch.arccos(cos)
        bad = (theta > math.pi - SLERP_ANTIPODAL_THRESHOLD).nonzero().flatten().tolist()
        if bad:
            k = bad[0]
            raise ValueError(
                f"vector {k} of text encoder {e + 1} of {a.source} and of {b.source} point in (nearly) opposite "
                f"directions (angle {float(theta[k]):.4f} rad, pi = {math.pi:.4f}): the great circle between them is "
                "not unique, so slerp is undefined. Interpolate through a third concept (A -> C -> B), or use "
                "--mode lerp"
            )


def interpolation_vectors(
    a: ConceptEmbeddings, b: ConceptEmbeddings, t: float, mode: str = "slerp"
) -> list[torch.Tensor]:
    """Per text encoder, the ``(n, dim)`` vectors at ``t`` (same t for every encoder)."""
    _check_pair(a, b)
    if mode == "slerp":
        _check_antipodal(a, b)
    out = []
    for va, vb, sa, sb in zip(a.vectors, b.vectors, _scales(a), _scales(b)):
        scale = None
        if sa is not None and sb is not None:
            # Both DTI: the norm is m*; if the two were trained with different m*, it moves linearly.
            scale = sa if abs(sa - sb) <= SCALE_RTOL * max(sa, sb) else (1.0 - t) * sa + t * sb
        out.append(interpolate_vectors(va, vb, t, mode, scale=scale if mode == "slerp" else None))
    return out


def _mode_note(mode: str, concepts: Sequence[ConceptEmbeddings]) -> str:
    if mode == "lerp":
        return "lerp"
    if all(c.method == "dti" for c in concepts):
        return "slerp, |e| = m*"
    return "slerp of directions, norms lerped"


def _t_label(t: float) -> str:
    return f"{round(t, 4):g}"


#: The most t values whose folder names (t rounded to 4 decimals) stay distinct at even spacing.
MAX_STEPS = 1001


def _check_strip_model(model: str | None, concept: ConceptEmbeddings) -> None:
    """Refuse, before anything is written, a strip model of another family than ``concept``'s."""
    if model is None:
        raise ValueError("no model to draw the strip with: pass --model (concept.json names none)")
    from .models import resolve_source

    family = resolve_source(str(model), None, None).family
    if family != concept.family:
        raise ValueError(
            f"--model {model} is a {family} model but {concept.source} was trained on a {concept.family} model; "
            f"give a {concept.family} model (or --no-images)"
        )


@dataclass
class InterpolationResult:
    output_dir: Path
    times: list[float]
    modes: list[str]
    folders: dict[str, list[Path]]  # per mode, one concept folder per t
    strips: dict[str, Path] = field(default_factory=dict)  # per mode (and "all" when several)


def interpolate_concepts(
    a: str | Path | ConceptEmbeddings,
    b: str | Path | ConceptEmbeddings,
    output_dir: str | Path,
    *,
    steps: int = 5,
    times: Sequence[float] | None = None,
    mode: str = "auto",
    images: bool = False,
    model: str | None = None,
    prompt: str = "a photo of {}",
    seed: int = 0,
    inference_steps: int = 30,
    guidance: float = 7.5,
    resolution: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    pipe=None,
) -> InterpolationResult:
    """Write a concept folder per t (and per mode) between concepts ``a`` and ``b``; optionally an image strip.

    ``mode``: "slerp", "lerp", "both", or "auto" (slerp for two DTI concepts; both for TI, so
    the two paths can be compared). Folders: ``<output>/<mode>/t<t>/``. With ``images`` the
    strip ``<output>/strip_<mode>.png`` shows ``prompt`` (``{}`` = the interpolated concept)
    at every t with one seed; ``model`` defaults to the model in ``a``'s concept.json.
    """
    import shutil

    from .concept_files import write_concept_files
    from .io import check_output_folder

    ca = a if isinstance(a, ConceptEmbeddings) else read_concept(a)
    cb = b if isinstance(b, ConceptEmbeddings) else read_concept(b)
    if ca.source.resolve() == cb.source.resolve() or (
        len(ca.vectors) == len(cb.vectors) and all(torch.equal(x, y) for x, y in zip(ca.vectors, cb.vectors))
    ):
        raise ValueError(f"A and B are the same concept ({ca.source}); give two different concepts")
    ts = [float(t) for t in times] if times is not None else interpolation_times(steps)
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"interpolation times must lie in [0, 1], got {ts}")
    if len({_t_label(t) for t in ts}) < len(ts):
        raise ValueError(
            "two interpolation times are closer than 1e-4 (their folders would share a name); "
            f"give fewer steps (at most {MAX_STEPS})"
        )
    if images:
        if resolution is not None and (resolution <= 0 or resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {resolution}")
        if pipe is None:
            _check_strip_model(model or ca.info.get("model"), ca)
    if mode == "auto":
        both_dti = ca.method == "dti" and cb.method == "dti"
        modes = ["slerp"] if both_dti else ["lerp", "slerp"]
    elif mode == "both":
        modes = ["lerp", "slerp"]
    elif mode in MODES:
        modes = [mode]
    else:
        raise ValueError(f"mode must be auto, slerp, lerp or both, got {mode!r}")
    _check_pair(ca, cb)
    if "slerp" in modes:
        _check_antipodal(ca, cb)
    out = check_output_folder(output_dir, owner="dti-fast interpolate", marks=("interpolation.json",))
    if (out / "interpolation.json").is_file():  # an earlier interpolation: its folders go, none stays stale
        for name in ("slerp", "lerp", "images"):
            shutil.rmtree(out / name, ignore_errors=True)
        for strip in out.glob("strip*.png"):
            strip.unlink()
    family = ca.family
    methods = {ca.method, cb.method}
    method = ca.method if len(methods) == 1 else "mixed"
    noun = ca.class_noun if ca.class_noun == cb.class_noun else None
    folders: dict[str, list[Path]] = {}
    for m in modes:
        folders[m] = []
        for t in ts:
            vectors = interpolation_vectors(ca, cb, t, m)
            tag = f"{ca.name}-{cb.name}" + ("-lerp" if m == "lerp" else "") + f"-t{_t_label(t)}"
            placeholder = f"<{tag}>"
            folder = out / m / f"t{_t_label(t)}"
            write_concept_files(folder, tag, placeholder, vectors, family, steps=0)
            tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, vectors[0].shape[0])]
            enc_a = ca.info.get("encoders") or [{} for _ in vectors]
            info = {
                "name": tag,
                "placeholder": placeholder,
                "tokens": tokens,
                "prompt_string": " ".join(tokens),
                "init": None,
                "class_noun": noun,
                "kind": ca.info.get("kind", "object"),
                "method": method,
                "steps": 0,
                "model": ca.info.get("model"),
                "family": family,
                "encoders": [
                    {
                        "scale": (
                            float(torch.linalg.vector_norm(v, dim=-1).mean())
                            if m == "slerp" and s_a is not None and s_b is not None
                            else None
                        ),
                        "vocab_scale": (enc_a[e].get("vocab_scale") if e < len(enc_a) else None),
                        "dim": int(v.shape[-1]),
                        "norms": [float(n) for n in torch.linalg.vector_norm(v, dim=-1)],
                    }
                    for e, (v, s_a, s_b) in enumerate(zip(vectors, _scales(ca), _scales(cb)))
                ],
                "interpolation": {"a": str(ca.source), "b": str(cb.source), "t": t, "mode": m},
            }
            write_json(info, folder / "concept.json")
            folders[m].append(folder)
    result = InterpolationResult(out, ts, modes, folders)
    write_json(
        {
            "a": str(ca.source),
            "b": str(cb.source),
            "times": ts,
            "modes": modes,
            "folders": {m: [str(f) for f in fs] for m, fs in folders.items()},
        },
        out / "interpolation.json",
    )
    if images:
        result.strips = interpolation_strips(
            result,
            model=model or ca.info.get("model"),
            prompt=prompt,
            seed=seed,
            inference_steps=inference_steps,
            guidance=guidance,
            resolution=resolution,
            device=device,
            dtype=dtype,
            pipe=pipe,
            title=f"{ca.name} -> {cb.name}",
        )
    return result


def interpolation_strips(
    result: InterpolationResult,
    *,
    model: str | None,
    prompt: str = "a photo of {}",
    seed: int = 0,
    inference_steps: int = 30,
    guidance: float = 7.5,
    resolution: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    pipe=None,
    title: str = "",
) -> dict[str, Path]:
    """Generate one image per t (one seed, one prompt) per mode; save ``strip_<mode>.png`` (and ``strip.png``)."""
    from PIL import Image

    from .generate import generate, load_pipeline
    from .io import atomic_write
    from .plots import image_strip

    if "{}" not in prompt:
        raise ValueError(f"the strip prompt {prompt!r} needs {{}} where the interpolated concept goes")
    if model is None:
        raise ValueError("no model to draw the strip with: pass --model (concept.json names none)")
    own = pipe is None
    if own:
        pipe = load_pipeline(model, device=device, dtype=dtype)
    strips: dict[str, Path] = {}
    rows = []
    for m in result.modes:
        concepts = [read_concept(f) for f in result.folders[m]]
        gen = generate(
            None,
            concepts,
            [prompt],
            result.output_dir / "images" / m,
            seeds=[seed],
            steps=inference_steps,
            guidance=guidance,
            height=resolution,
            width=resolution,
            pipe=pipe,
            batch_size=min(4, len(concepts)),
            grid=False,
        )
        imgs = []
        for r in gen.records:
            with Image.open(gen.output_dir / r.file) as im:
                imgs.append(im.convert("RGB"))
        strip = image_strip(
            imgs,
            labels=[f"t={_t_label(t)}" for t in result.times],
            title=f"{title} ({_mode_note(m, concepts)}) | {prompt} | seed {seed}",
        )
        path = result.output_dir / f"strip_{m}.png"
        atomic_write(path, lambda tmp, s=strip: s.save(tmp, format="PNG"))
        strips[m] = path
        rows.append(strip)
    if len(rows) > 1:
        w = max(r.size[0] for r in rows)
        sheet = Image.new("RGB", (w, sum(r.size[1] for r in rows)), "white")
        y = 0
        for r in rows:
            sheet.paste(r, (0, y))
            y += r.size[1]
        path = result.output_dir / "strip.png"
        atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
        strips["all"] = path
    return strips
