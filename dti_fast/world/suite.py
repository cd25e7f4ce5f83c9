"""``dti-fast suite --world toy``: TI, TI-rescaled, DTI and DTI + CrossInit on the toy world's novel concepts.

Stages: validate the scorers on fresh renders; the base-model sanity gate (held-out attribute
combinations, the base model alone); render the concepts' photos; one training job per method
with the project's trainer (all concepts concurrently, latent cache, the paper's defaults;
TI-rescaled is the TI job's ``rescaled/`` export); generate prompts of rising complexity x seeds
with the project's ``generate``; score every image from pixels; the slerp strip between two DTI
concepts and its subject-score curve; ``report.json`` and ``report.md`` with the table, the
per-level curves, the norms on the vocabulary's histogram and the strips.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..suite import METHOD_LABELS, METHOD_TRAINING
from . import concepts as C
from . import render as R
from . import scoring as S

GATE_SEED = 5150
GATE_PROMPTS = 96  # held-out captions of the gate (`dti-fast world gate --prompts`, the suite's gate_prompts)
LEVELS = ("concept alone", "+ background", "+ position", "+ second object")
METHODS = ("ti", "ti-rescaled", "dti", "dti-xinit")


@dataclass
class ToySuiteConfig:
    output_dir: Path
    model: str | None = None  # default: the shipped (cached) world base model
    quick: bool = False
    methods: tuple = METHODS
    steps: int = 400
    batch_size: int = 4
    seeds: tuple = (0, 1, 2)
    draws: int = 2  # attribute draws (prompts) per level and concept
    inference_steps: int = 20
    guidance: float = 4.0
    gate_prompts: int = GATE_PROMPTS  # held-out captions of the gate (a draw no base-model choice was made on)
    slerp_steps: int = 5
    slerp_pair: tuple = ("tealcircle", "roundsquare")
    concepts: tuple = tuple(c.name for c in C.ALL)
    seed: int = 0
    progress: bool = True
    threads: int | None = 1  # torch threads; on busy shared cores more threads cost up to 10x (measured)

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag and the fix for the first bad setting (before any work)."""
        for flag, value, low in (
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--world-draws", self.draws, 1),
            ("--inference-steps", self.inference_steps, 1),
            ("--slerp-steps", self.slerp_steps, 2),
            ("gate_prompts", self.gate_prompts, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an integer, at least {low} (got {value!r})")
        if not self.seeds:
            raise ValueError("--seeds must name at least one seed")
        if not (isinstance(self.guidance, (int, float)) and 0 <= self.guidance < float("inf")):
            raise ValueError(f"--guidance must be a number, at least 0 (got {self.guidance!r})")
        known = [c.name for c in C.ALL]
        unknown = [c for c in self.concepts if c not in known]
        if unknown:
            raise ValueError(f"unknown toy concept(s) {', '.join(unknown)}; the toy world has {', '.join(known)}")
        a, b = self.slerp_pair
        if "dti" in self.methods and (a == b or a not in self.concepts or b not in self.concepts):
            raise ValueError(
                f"--slerp-pair {a},{b}: give two different toy concepts this run trains ({', '.join(self.concepts)})"
            )

    @classmethod
    def quick_config(cls, output_dir: Path, model: str | None = None) -> ToySuiteConfig:
        return cls(
            output_dir=Path(output_dir),
            model=model,
            quick=True,
            steps=4,
            seeds=(0,),
            draws=1,
            inference_steps=2,
            gate_prompts=2,
            slerp_steps=3,
            concepts=("tealcircle", "roundsquare", "outlined"),
        )


def _prompts_for(c: C.WorldConcept, rng: np.random.Generator, draws: int) -> list[tuple[str, int, dict]]:
    """(prompt with {}, level, stated attributes) for concept ``c``: ``draws`` per level."""
    from ..data import OBJECT_TEMPLATES, STYLE_TEMPLATES

    # Level 0: one of the trainer's own templates per draw (draw i: the i-th), never the same twice.
    alone = OBJECT_TEMPLATES if c.kind == "object" else STYLE_TEMPLATES
    out = []
    for level in range(len(LEVELS)):
        for i in range(draws):
            if c.kind == "object":
                spec = C.concept_spec(c, rng, second=level >= 3)
                if level == 0:
                    out.append((alone[i % len(alone)], 0, {}))
                    continue
                flags = dict(position=level >= 2, background=True, texture=True, second=level >= 3)
                text = R.describe(spec, main_word="{}", **flags)
                attrs = R.stated_attributes(spec, main=False, **flags)
            else:
                spec = R.sample_spec(rng, held=None, count=1, second=level >= 3)
                if level == 0:
                    out.append((alone[i % len(alone)], 0, {}))
                    continue
                flags = dict(position=level >= 2, background=True, texture=True, second=level >= 3)
                text = R.describe(spec, size=False, **flags) + " in the style of {}"
                attrs = R.stated_attributes(spec, **flags)
                attrs.pop("count", None)
            out.append((text, level, attrs))
    return out


def gate_specs(n: int, seed: int) -> list[R.Spec]:
    """The gate's scenes: held-out (shape, colour, background) triples, what the base model never saw."""
    rng = np.random.default_rng(seed)
    return [R.sample_spec(rng, held=True) for _ in range(n)]


def gate_prompts(n: int, seed: int) -> list[tuple[str, dict]]:
    """Full captions of the gate's scenes (:func:`gate_specs`) and the attributes they state."""
    return [(R.describe(spec), R.stated_attributes(spec)) for spec in gate_specs(n, seed)]


def vae_ceiling(vae, scorer, n: int, seed: int) -> dict:
    """The gate's ceiling set by ``vae``: its scenes rendered, encoded, decoded and read by ``scorer``.

    A base model draws through its VAE's decoder and learns the encoder's latents of renders, so
    what the scorer reads on reconstructions is what a UNet that drew its training latents
    perfectly would reach: an estimate of the most the gate can read with this VAE, not a strict
    bound (a UNet's latents can decode cleaner than a render's; the shipped model: gate 0.862,
    ceiling 0.880, main shape 0.885 against 0.875). The renders themselves read 0.99. Returns the
    fidelity, per attribute, and the reconstruction error (0-255 scale).
    """
    from .base import _to_tensor

    specs = gate_specs(n, seed)
    images = np.stack([np.asarray(R.render(spec)) for spec in specs])
    param = next(vae.parameters())
    recs, err = [], 0.0
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            x = _to_tensor(images[i : i + 64]).to(param.device)
            rec = vae.decode(vae.encode(x.to(param.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
            err += float((rec - x).abs().sum())
            recs.append((rec.permute(0, 2, 3, 1).cpu().numpy() + 1.0) * 127.5)
    pixels = np.concatenate(recs).round().clip(0, 255).astype(np.uint8)
    checks = _attribute_checks(scorer, pixels, [R.stated_attributes(spec) for spec in specs])
    fid, per_attr = _fidelity(checks)
    return {
        "text_fidelity": fid,
        "per_attribute": per_attr,
        "reconstruction_mae_0_255": err / images.size * 127.5,
        "scenes": len(specs),
    }


def _attribute_checks(scorer, images, attrs: list[dict]) -> list[dict[str, bool]]:
    """Per image, which of its stated attributes ``scorer`` reads in it."""
    pred = S.predict(scorer, images)
    return [S.attribute_checks(S._row(pred, i), a) for i, a in enumerate(attrs)]


def _fidelity(checks: list[dict[str, bool]]) -> tuple[float | None, dict[str, float | None]]:
    """The mean per-image text fidelity of ``checks`` and the fraction met per attribute."""
    per_attr: dict[str, list] = {}
    for ok in checks:
        for a, v in ok.items():
            per_attr.setdefault(a, []).append(v)
    fid = _mean([float(np.mean(list(ok.values()))) for ok in checks])
    return fid, {a: _mean(v) for a, v in per_attr.items()}


def base_model_gate(
    pipe, scorer, n: int, seed: int, inference_steps: int = 20, guidance: float = 4.0, out_dir: Path | None = None
) -> dict:
    """The sanity gate: the base model alone on ``n`` full captions of held-out combinations.

    Image ``i`` is sampled with seed ``i``; each is read by ``scorer``. Returns the mean text
    fidelity, its pass (>= 0.8), the fidelity per attribute and per prompt, and the ceiling its
    VAE sets on the same scenes (:func:`vae_ceiling`); ``out_dir`` gets ``gate.png``, the
    images in a grid.
    """
    from ..plots import image_grid

    gate = gate_prompts(n, seed)
    images = []
    for i in range(0, len(gate), 8):
        chunk = gate[i : i + 8]
        gens = [torch.Generator().manual_seed(i + k) for k in range(len(chunk))]
        with torch.inference_mode():
            images += pipe(
                prompt=[p for p, _ in chunk],
                generator=gens,
                num_inference_steps=inference_steps,
                guidance_scale=guidance,
            ).images
    checks = _attribute_checks(scorer, images, [attrs for _, attrs in gate])
    rows = [
        {"prompt": p, "checks": ok, "fidelity": float(np.mean(list(ok.values())))} for (p, _), ok in zip(gate, checks)
    ]
    fid, per_attr = _fidelity(checks)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        labels = [str(i) for i in range(len(images))]
        image_grid(images, columns=8, labels=labels, min_tile=96).save(Path(out_dir) / "gate.png")
    return {
        "text_fidelity": fid,
        "pass": fid is not None and fid >= 0.8,
        "per_attribute": per_attr,
        "vae_ceiling": vae_ceiling(pipe.vae, scorer, n, seed),
        "rows": rows,
        "seed": seed,
    }


def paired_differences(rows: dict[str, list[dict]], base: str, seed: int = 0, resamples: int = 2000) -> dict:
    """Per method, its images' subject and text scores minus ``base``'s on the same (concept, prompt, seed).

    Returns ``{method: {"subject"|"text": {"mean", "low", "high", "pairs"}}}`` with a percentile
    bootstrap 95 % interval of the mean difference; empty when ``base`` did not run.
    """
    if base not in rows:
        return {}
    rng = np.random.default_rng(seed)

    def key(r):
        return r["concept"], r["prompt"], r["seed"]

    ref = {key(r): r for r in rows[base]}
    out = {}
    for m, rs in rows.items():
        if m == base:
            continue
        out[m] = {}
        for k in ("subject", "text"):
            d = np.array(
                [r[k] - ref[key(r)][k] for r in rs if key(r) in ref and r[k] is not None and ref[key(r)][k] is not None]
            )
            if len(d) == 0:
                out[m][k] = {"mean": None, "low": None, "high": None, "pairs": 0}
                continue
            boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
            low, high = np.percentile(boot, [2.5, 97.5])
            out[m][k] = {"mean": float(d.mean()), "low": float(low), "high": float(high), "pairs": len(d)}
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _curve_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str):
    """Lines through points per series, on the project's scatter axes."""
    from ..plots import scatter_plot

    img = scatter_plot(
        {k: {"points": v, "mean": None} for k, v in series.items()}, title=title, xlabel=xlabel, ylabel=ylabel
    )
    return img


def run_toy_suite(cfg: ToySuiteConfig) -> dict:
    from PIL import Image

    from ..concept_files import read_concept
    from ..data import Concept
    from ..generate import generate, load_pipeline, read_manifest
    from ..interpolate import interpolate_concepts
    from ..plots import norm_histogram, scatter_plot
    from ..train import TrainConfig, train
    from .base import world_model_path

    cfg.check()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = print if cfg.progress else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(cfg.model) if cfg.model else world_model_path()
    seconds: dict[str, float] = {}
    torch.manual_seed(cfg.seed)

    # 1. scorers, validated on fresh renders before they score anything
    t = time.perf_counter()
    scorer = S.load_scorer(model / "world_scorer")
    validation = S.validate(scorer, seed=777 + cfg.seed, n=200 if cfg.quick else 1200)
    seconds["validate_scorers"] = time.perf_counter() - t
    log(
        f"[toy] scorer on fresh renders: text fidelity {validation['text_fidelity_on_renders']:.3f}, "
        + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in validation["subject"].items())
    )

    pipe = load_pipeline(str(model), device="cpu", dtype="fp32")

    # 2. the base model's sanity gate
    t = time.perf_counter()
    g = base_model_gate(
        pipe, scorer, cfg.gate_prompts, GATE_SEED + cfg.seed, cfg.inference_steps, cfg.guidance, out / "gate"
    )
    seconds["gate"] = time.perf_counter() - t
    log(
        f"[toy] base-model gate on held-out combinations: text fidelity {g['text_fidelity']:.3f} "
        f"({'PASS' if g['pass'] else 'FAIL: the world measures nothing'}; its VAE's ceiling "
        f"{g['vae_ceiling']['text_fidelity']:.3f})"
    )

    # 3. concept photos
    concepts = [C.BY_NAME[n] for n in cfg.concepts]
    photos = C.write_photos(out / "data", n=5, seed=cfg.seed, concepts=concepts)
    job_concepts = [
        Concept(name=c.name, images=photos[c.name], init=c.init, class_noun=c.init, kind=c.kind) for c in concepts
    ]

    # 4. one training job per method (TI-rescaled = the TI job's rescaled export)
    trained: dict[str, dict] = {}
    for tm in dict.fromkeys(METHOD_TRAINING[m][0] for m in cfg.methods):
        t = time.perf_counter()
        _, method, init = next(METHOD_TRAINING[m] for m in cfg.methods if METHOD_TRAINING[m][0] == tm)
        job = TrainConfig(
            model=str(model),
            output_dir=out / "train" / tm,
            concepts=job_concepts,
            method=method,
            init=init,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            resolution=R.SIZE,
            seed=cfg.seed,
            export_ti_rescaled=(tm == "ti" and "ti-rescaled" in cfg.methods),
            progress=False,
            device="cpu",
            checkpoint_every=max(cfg.steps, 1),
        )
        res = train(job)
        seconds[f"train:{tm}"] = time.perf_counter() - t
        trained[tm] = {"seconds": res.seconds, "samples": res.samples, "scales": res.scales}
        log(f"[toy] trained {tm}: {len(concepts)} concepts x {cfg.steps} steps in {seconds[f'train:{tm}']:.0f} s")

    def concept_dir(method: str, name: str) -> Path:
        if method == "ti-rescaled":
            return out / "train" / "ti" / name / "rescaled"
        return out / "train" / METHOD_TRAINING[method][0] / name

    # 5. prompts (the same for every method) and generation
    rng = np.random.default_rng(cfg.seed + 5)
    prompts = {c.name: _prompts_for(c, rng, cfg.draws) for c in concepts}
    results: dict[str, dict] = {}
    for m in cfg.methods:
        t = time.perf_counter()
        embs = [read_concept(concept_dir(m, c.name)) for c in concepts]
        folder = out / "images" / m
        generate(
            None,
            embs,
            {c.name: [p for p, _, _ in prompts[c.name]] for c in concepts},
            folder,
            seeds=list(cfg.seeds),
            steps=cfg.inference_steps,
            guidance=cfg.guidance,
            batch_size=8,
            pipe=pipe,
            skip_existing=False,  # every run trains afresh: images of an earlier run are not this one's
        )
        seconds[f"generate:{m}"] = time.perf_counter() - t
        # 6. score
        records = read_manifest(folder)
        ims = []
        for r in records:
            with Image.open(folder / r.file) as im:
                ims.append(im.convert("RGB"))
        pred = S.predict(scorer, ims)
        feats = S.features(scorer, ims)
        ref_feats = {
            c.name: S.features(scorer, [Image.open(f).convert("RGB") for f in sorted(photos[c.name].glob("*.png"))])
            for c in concepts
        }
        rows = []
        for i, r in enumerate(records):
            c = C.BY_NAME[r.concept]
            _, level, attrs = prompts[c.name][r.prompt_index]
            p = S._row(pred, i)
            rows.append(
                {
                    "concept": c.name,
                    "level": level,
                    "prompt": r.prompt,
                    "seed": r.seed,
                    "file": r.file,
                    "subject": S.subject_score(p, c.name),
                    "subject_cos": float((ref_feats[c.name] @ feats[i]).mean()),
                    "text": S.text_fidelity(p, attrs, subject=c.name if c.kind == "object" else None),
                    "checks": S.attribute_checks(p, attrs, subject=c.name if c.kind == "object" else None),
                }
            )
        results[m] = {"rows": rows}
        log(f"[toy] {m}: generated and scored {len(rows)} images in {seconds[f'generate:{m}']:.0f} s")

    # aggregate: per method x level, and per concept
    table: dict[str, dict] = {}
    for m in cfg.methods:
        rows = results[m]["rows"]
        lv = {}
        for level in range(len(LEVELS)):
            sel = [r for r in rows if r["level"] == level]
            lv[LEVELS[level]] = {
                "subject": _mean([r["subject"] for r in sel]),
                "text": _mean([r["text"] for r in sel]),
                "subject_cos": _mean([r["subject_cos"] for r in sel]),
                "images": len(sel),
            }
        table[m] = {
            "levels": lv,
            "subject": _mean([r["subject"] for r in rows]),
            "subject_cos": _mean([r["subject_cos"] for r in rows]),
            "text": _mean([r["text"] for r in rows]),
            "per_concept": {
                c.name: {
                    "subject": _mean([r["subject"] for r in rows if r["concept"] == c.name]),
                    "subject_cos": _mean([r["subject_cos"] for r in rows if r["concept"] == c.name]),
                    "text": _mean([r["text"] for r in rows if r["concept"] == c.name]),
                }
                for c in concepts
            },
        }

    # paired differences against TI: the same prompts and seeds for every method
    paired = paired_differences({m: results[m]["rows"] for m in cfg.methods}, "ti", seed=cfg.seed)

    # norms
    norms = {
        m: {
            c.name: [
                float(x) for x in torch.linalg.vector_norm(read_concept(concept_dir(m, c.name)).vectors[0], dim=-1)
            ]
            for c in concepts
        }
        for m in cfg.methods
    }
    from safetensors import safe_open

    with safe_open(str(model / "text_encoder" / "model.safetensors"), "pt") as fh:
        key = next(k for k in fh.keys() if k.endswith("token_embedding.weight"))
        vn = torch.linalg.vector_norm(fh.get_tensor(key).float(), dim=-1)
    vocab_norms = [float(x) for x in vn[vn > 0]]
    m_star = (
        read_concept(concept_dir("dti", concepts[0].name)).info.get("encoders", [{}])[0].get("vocab_scale")
        if "dti" in cfg.methods
        else None
    )

    # 7. slerp between two DTI concepts, and its subject-score curve
    slerp: dict = {}
    a, b = cfg.slerp_pair
    if "dti" in cfg.methods and a in cfg.concepts and b in cfg.concepts:
        t = time.perf_counter()
        res = interpolate_concepts(
            read_concept(concept_dir("dti", a)),
            read_concept(concept_dir("dti", b)),
            out / "slerp",
            steps=cfg.slerp_steps,
            mode="slerp",
            images=True,
            pipe=pipe,
            prompt="a photo of a {}",
            seed=cfg.seed,
            inference_steps=cfg.inference_steps,
            guidance=cfg.guidance,
        )
        folders = res.folders["slerp"]
        embs = [read_concept(f) for f in folders]
        gen = generate(
            None,
            embs,
            ["a photo of a {}"],
            out / "slerp" / "seeds",  # every seed per t (the strip itself is in slerp/images/)
            seeds=list(cfg.seeds),
            steps=cfg.inference_steps,
            guidance=cfg.guidance,
            batch_size=8,
            pipe=pipe,
            grid=False,
            skip_existing=False,
        )
        by_t: dict[str, list] = {}
        for r in gen.records:
            with Image.open(out / "slerp" / "seeds" / r.file) as im:
                by_t.setdefault(r.concept, []).append(im.convert("RGB"))
        curve = []
        for ti, e in zip(res.times, embs):
            p = S.predict(scorer, by_t[e.name])
            sa = [S.subject_score(S._row(p, i), a) for i in range(len(by_t[e.name]))]
            sb = [S.subject_score(S._row(p, i), b) for i in range(len(by_t[e.name]))]
            any_obj = [max(float(1 - p[f"shape{s}"][i][0]) for s in range(len(R.POSITIONS))) for i in range(len(sa))]
            curve.append(
                {
                    "t": ti,
                    "subject_a": _mean(sa),
                    "subject_b": _mean(sb),
                    "subject_max": _mean([max(x, y) for x, y in zip(sa, sb)]),
                    "object_present": _mean(any_obj),
                }
            )
        img = scatter_plot(
            {
                f"P({a})": {"points": [(c["t"], c["subject_a"]) for c in curve]},
                f"P({b})": {"points": [(c["t"], c["subject_b"]) for c in curve]},
                "an object at all": {"points": [(c["t"], c["object_present"]) for c in curve]},
            },
            title=f"DTI slerp {a} -> {b}: subject scores",
            xlabel="t",
            ylabel="score",
        )
        (out / "plots").mkdir(exist_ok=True)
        img.save(out / "plots" / "slerp_curve.png")
        slerp = {
            "pair": [a, b],
            "curve": curve,
            "strips": {k: str(Path(v).relative_to(out)) for k, v in res.strips.items()},
            "plot": "plots/slerp_curve.png",
        }
        seconds["slerp"] = time.perf_counter() - t

    # plots
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    series = {}
    for m in cfg.methods:
        pts = [
            (float(i), table[m]["levels"][LEVELS[i]]["text"])
            for i in range(1, len(LEVELS))
            if table[m]["levels"][LEVELS[i]]["text"] is not None
        ]
        series[m] = {"points": pts}
    scatter_plot(
        series,
        title="Text fidelity vs prompt complexity (1 bg, 2 +position, 3 +second object)",
        xlabel="complexity level",
        ylabel="text fidelity",
    ).save(plots_dir / "text_by_level.png")
    series = {
        m: {"points": [(float(i), table[m]["levels"][LEVELS[i]]["subject"]) for i in range(len(LEVELS))]}
        for m in cfg.methods
    }
    scatter_plot(
        series, title="Subject similarity vs prompt complexity", xlabel="complexity level", ylabel="subject score"
    ).save(plots_dir / "subject_by_level.png")
    series = {
        m: {
            "points": [
                (v["text"] or float("nan"), v["subject"] or float("nan")) for v in table[m]["per_concept"].values()
            ],
            "mean": (table[m]["text"] or float("nan"), table[m]["subject"] or float("nan")),
        }
        for m in cfg.methods
    }
    scatter_plot(
        series,
        title="Subject similarity vs text fidelity (dots: concepts, discs: mean)",
        xlabel="Text fidelity (pixels)",
        ylabel="Subject score (classifier)",
    ).save(plots_dir / "tradeoff.png")
    norm_histogram(
        vocab_norms,
        {m: [x for v in norms[m].values() for x in v] for m in cfg.methods},
        reference=m_star,
        title="World vocabulary norms (grey) and learned vectors (ticks)",
    ).save(plots_dir / "norms_encoder1.png")

    report = {
        "title": "dti_fast toy world: " + " vs ".join(_label(m) for m in cfg.methods),
        "quick": cfg.quick,
        "model": str(model),
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "config": {
            k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in asdict(cfg).items()
        },
        "scorer_validation": validation,
        "gate": {
            "text_fidelity": g["text_fidelity"],
            "pass": g["pass"],
            "per_attribute": g["per_attribute"],
            "prompts": g["rows"],
            "prompt_seed": g["seed"],
            "grid": "gate/gate.png",
            "vae_ceiling": g["vae_ceiling"],
        },
        "table": {m: {k: v for k, v in t.items()} for m, t in table.items()},
        "paired_vs_ti": paired,
        "norms": norms,
        "m_star": m_star,
        "vocab_norm_stats": {
            "mean": float(np.mean(vocab_norms)),
            "std": float(np.std(vocab_norms)),
            "rows": len(vocab_norms),
        },
        "slerp": slerp,
        "trained": trained,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "images": {m: results[m]["rows"] for m in cfg.methods},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    log(f"[toy] report: {out / 'report.md'} ({report['total_seconds']:.0f} s)")
    return report


def _f(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def _label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def _markdown(r: dict) -> str:
    L = [f"# {r['title']}\n"]
    if r["quick"]:
        L.append(
            "> **Smoke test (`--quick`), not a measurement**: a handful of training steps, one seed, two "
            "sampling steps. It checks that the pipeline runs end to end; the numbers mean nothing.\n"
        )
    g = r["gate"]
    if not g["pass"]:
        L.append(
            f"> **The base-model sanity gate FAILED** (text fidelity {_f(g['text_fidelity'])} < 0.8 on held-out "
            "combinations): the base model does not follow this world's prompts well enough, so the comparison "
            "below measures nothing about TI or DTI.\n"
        )
    c = r["config"]
    L.append("## Setup\n")
    L.append(f"- Model: `{r['model']}` (toy world base model, SD 1.x layout); device {r['device']}")
    L.append(
        f"- Concepts: {', '.join(c['concepts'])}; training {c['steps']} steps, batch {c['batch_size']} per concept, "
        "all concepts in one job per method, the paper's defaults (DTI lr 0.01, kappa 1e-4, init token; "
        "TI AdamW 5e-3; both scaled by the batch); DTI + CrossInit: DTI started from the direction of the "
        "text encoder's output at the initializer's tokens (its vMF prior too)"
    )
    L.append(
        f"- Generation: {c['draws']} prompts per level and concept x seeds {c['seeds']}, {c['inference_steps']} "
        f"DDIM steps, guidance {c['guidance']}\n"
    )
    v = r["scorer_validation"]
    L.append("## Scorers on fresh renders\n")
    L.append("| head | accuracy |\n| --- | ---: |")
    for k, a in v["heads"].items():
        L.append(f"| {k} | {a:.3f} |")
    for k, a in v["attributes"].items():
        L.append(f"| attribute check: {k} | {a:.3f} |")
    L.append(f"| text fidelity of full captions on their renders | {v['text_fidelity_on_renders']:.3f} |")
    for k, s in v["subject"].items():
        L.append(
            f"| subject {k}: concept vs look-alike (threshold 0.5) | {s['accuracy']:.3f} "
            f"(mean {s['mean_pos']:.2f} vs {s['mean_lookalike']:.2f}) |"
        )
        L.append(
            f"| subject-cos {k}: P(concept render closer to the photos than a look-alike) | {s['cos_auc']:.3f} "
            f"(mean cos {s['cos_pos']:.2f} vs {s['cos_lookalike']:.2f}) |"
        )
    L.append("")
    L.append("## Base-model sanity gate\n")
    L.append(
        f"Text fidelity of the base model alone on {len(g['prompts'])} full captions of held-out (shape, colour, "
        f"background) combinations: **{_f(g['text_fidelity'])}** ({'pass' if g['pass'] else 'FAIL'}; needs 0.8). "
        "Per attribute: "
        + ", ".join(f"{k} {_f(x, 2)}" for k, x in g["per_attribute"].items())
        + f". Images: [{g['grid']}]({g['grid']}).\n"
    )
    ceiling = g.get("vae_ceiling")
    if ceiling:
        L.append(
            f"Its VAE's ceiling on the same scenes (each rendered, encoded, decoded and read by the scorer: what a "
            f"UNet that drew its training latents exactly would reach): **{_f(ceiling['text_fidelity'])}**; per "
            "attribute: " + ", ".join(f"{k} {_f(x, 2)}" for k, x in ceiling["per_attribute"].items()) + ".\n"
        )
    L.append("## Results\n")
    L.append(
        "Subject = the scorer's probability that the concept is in the image (max over slots; styles: P(style)); "
        "text = fraction of the prompt's stated attributes the image shows (level 0 states none).\n"
    )
    aucs = [x["cos_auc"] for x in r["scorer_validation"]["subject"].values() if "cos_auc" in x]
    L.append(
        f"A graded alternative, subject-cos (mean cosine of the scorer's features to each concept photo, the "
        f"paper's DINO protocol), is computed per image in report.json but not tabled: on fresh renders it "
        f"ranks a concept above its look-alike with probability {min(aucs):.2f}-{max(aucs):.2f}, so it does not "
        f"measure the subject here.\n"
    )
    head = (
        "| Method | "
        + " | ".join(f"L{i} {n} subj / text" for i, n in enumerate(LEVELS))
        + " | all subj / text | mean norm |"
    )
    L.append(head)
    L.append("| --- |" + " ---: |" * (len(LEVELS) + 2))
    for m, t in r["table"].items():
        ns = [x for v in r["norms"][m].values() for x in v]
        L.append(
            f"| {_label(m)} | "
            + " | ".join(f"{_f(t['levels'][n]['subject'])} / {_f(t['levels'][n]['text'])}" for n in LEVELS)
            + f" | {_f(t['subject'])} / {_f(t['text'])} | {_f(float(np.mean(ns)), 3)} |"
        )
    L.append("")
    L.append(
        f"m* (mean norm of the {r['vocab_norm_stats']['rows']} non-zero vocabulary rows): {_f(r['m_star'], 4)}; "
        f"vocabulary norms mean {r['vocab_norm_stats']['mean']:.4f}, std {r['vocab_norm_stats']['std']:.4f}.\n"
    )
    if r.get("paired_vs_ti"):
        L.append("### Paired differences against TI\n")
        L.append(
            "Each image against TI's image of the same concept, prompt and seed: the mean difference and a 95 % "
            "bootstrap interval (2000 resamples of the pairs). An interval that contains 0 is no difference.\n"
        )
        L.append("| Method | subject - TI's [95 %] | text - TI's [95 %] | pairs (subject / text) |")
        L.append("| --- | ---: | ---: | ---: |")
        for m, d in r["paired_vs_ti"].items():
            cells = []
            for k in ("subject", "text"):
                x = d[k]
                cells.append(f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]" if x["pairs"] else "n/a")
            L.append(f"| {_label(m)} | {cells[0]} | {cells[1]} | {d['subject']['pairs']} / {d['text']['pairs']} |")
        L.append("")
    L.append("### Per concept (subject / text)\n")
    names = list(next(iter(r["table"].values()))["per_concept"])
    L.append(
        "| Concept | "
        + " | ".join(_label(m) for m in r["table"])
        + " | norms "
        + " / ".join(_label(m) for m in r["table"])
        + " |"
    )
    L.append("| --- |" + " ---: |" * (len(r["table"]) + 1))
    for n in names:
        L.append(
            f"| {n} | "
            + " | ".join(
                f"{_f(t['per_concept'][n]['subject'])} / {_f(t['per_concept'][n]['text'])}" for t in r["table"].values()
            )
            + " | "
            + " / ".join(_f(float(np.mean(r["norms"][m][n])), 3) for m in r["table"])
            + " |"
        )
    L.append("")
    L.append("## Plots\n")
    L.append("![text by level](plots/text_by_level.png)\n\n![subject by level](plots/subject_by_level.png)\n")
    L.append("![tradeoff](plots/tradeoff.png)\n\n![norms](plots/norms_encoder1.png)\n")
    if r["slerp"]:
        s = r["slerp"]
        L.append(f"### DTI slerp {s['pair'][0]} -> {s['pair'][1]}\n")
        for k, p in s["strips"].items():
            L.append(f"![slerp {k}]({p})\n")
        L.append("| t | P(a) | P(b) | max | an object at all |\n| ---: | ---: | ---: | ---: | ---: |")
        for c in s["curve"]:
            L.append(
                f"| {c['t']:.2f} | {_f(c['subject_a'])} | {_f(c['subject_b'])} | {_f(c['subject_max'])} | "
                f"{_f(c['object_present'])} |"
            )
        L.append(f"\n![slerp curve]({s['plot']})\n")
    L.append(
        "Stage times (s): "
        + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())
        + f"; total {r['total_seconds']} s.\n"
    )
    return "\n".join(L)
