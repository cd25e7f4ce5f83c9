"""The training job as plain data: :class:`TrainConfig`, its checks, its job file and its fingerprint.

Every setting is declared once, with :func:`dti_fast.settings.setting`; the
``dti-fast train`` flags, the TOML job-file keys, the type and range checks and
the concept fingerprint all derive from these declarations.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from .. import settings as S
from ..concept_files import validate_export_names
from ..data import Concept
from ..embedding import INIT_MODES
from ..models import resolve_device
from .errors import JobError
from .tracking import REPORT_TO, check_report_to

__all__ = ["TrainConfig", "METHODS", "DEFAULT_LR", "validate_config", "load_job_file", "read_job_file"]

METHODS = ("dti", "ti")
DEFAULT_LR = {"dti": 0.01, "ti": 5e-3}
PERF = "throughput and memory"


def _norm_scale(value: Any, from_text: bool) -> str | float:
    if value in ("mean", "min", "max"):
        return value
    try:
        return S.POSITIVE_FLOAT(value, from_text)
    except ValueError:
        raise ValueError(f"must be mean, min, max or a positive finite number, got {value!r}") from None


_SCALE = S.Kind("mean, min, max or a positive finite number", _norm_scale)
_MAX_BATCH = S.optional(S.either(S.literal("auto"), S.POSITIVE_INT))
_TEXT_CACHE = S.either(S.BOOL, S.literal("auto"))


def _model_source(value: Any, from_text: bool) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"must be a model folder or hub id, got {value!r}")
    return str(value)


_MODEL = S.Kind("a model folder or hub id", _model_source)


@dataclass
class TrainConfig:
    """A training job. Defaults are the paper's (SDXL: resolution 768 is set per model by the caller)."""

    model: str = S.setting(
        kind=_MODEL,
        help="diffusers model: a local folder or a hub id (SD 1.x/2.x, SDXL, SANA or Wan 2.1)",
        fingerprint=True,
    )
    output_dir: Path = S.setting(
        kind=S.PATH, flag="--output", path_base=True, help="output folder (one sub-folder per concept)"
    )
    concepts: list[Concept] = field(default_factory=list)
    method: str = S.setting(
        "dti",
        kind=S.choice(*METHODS),
        fingerprint=True,
        help="dti: fixed norm m*, Riemannian SGD on the direction with a vMF prior; "
        "ti: plain Textual Inversion (AdamW on a free vector)",
        default_text="default dti",
    )
    steps: int = S.setting(400, kind=S.POSITIVE_INT, help="optimizer steps per concept")
    batch_size: int = S.setting(4, kind=S.POSITIVE_INT, fingerprint=True, help="images per concept per step")
    max_batch: int | str | None = S.setting(
        None,
        kind=_MAX_BATCH,
        help="most images in one forward pass; concepts take turns when the job has more; "
        "'auto' measures the step's memory and fills the device",
        default_text="default: every concept in every step",
    )
    resolution: int = S.setting(512, kind=S.POSITIVE_INT, fingerprint=True, help="training resolution in pixels")
    lr: float | None = S.setting(
        None,
        kind=S.optional(S.POSITIVE_FLOAT),
        fingerprint=True,
        help="learning rate before batch scaling",
        default_text="default: dti 0.01, ti 5e-3",
    )
    scale_lr: bool = S.setting(
        True,
        kind=S.BOOL,
        flag="--no-scale-lr",
        action="false",
        fingerprint=True,
        help="do not multiply the learning rate by --batch-size (scaled by default, as in the paper)",
    )
    kappa: float = S.setting(1e-4, kind=S.NONNEG_FLOAT, fingerprint=True, help="DTI: vMF prior concentration")
    beta: float = S.setting(
        0.0, kind=S.UNIT_INTERVAL, fingerprint=True, help="DTI: decay of the squared-gradient average"
    )
    norm_scale: str | float = S.setting(
        "mean",
        kind=_SCALE,
        flag="--scale",
        fingerprint=True,
        help="DTI: the fixed norm m*: mean, min or max of the vocabulary's norms, or a number",
    )
    init: str = S.setting(
        "token",
        kind=S.choice(*INIT_MODES),
        fingerprint=True,
        help="start of the learned rows: the initializer's embedding (token), random, the vocabulary mean, "
        "or xinit (CrossInit: the text encoder's last hidden state at the initializer's tokens; TI keeps "
        "its norm, DTI its direction at m*, and DTI's prior is that direction)",
    )
    weight_decay: float = S.setting(1e-2, kind=S.NONNEG_FLOAT, fingerprint=True, help="TI: AdamW weight decay")
    seed: int = S.setting(0, kind=S.INT, fingerprint=True, help="random seed; seeded CPU runs repeat exactly")
    checkpoint_every: int = S.setting(100, kind=S.POSITIVE_INT, help="job steps between checkpoints")
    keep_checkpoints: int = S.setting(2, kind=S.POSITIVE_INT, help="checkpoints kept")
    resume: bool = S.setting(
        False,
        kind=S.BOOL,
        action="true",
        help="continue from the newest checkpoint in the output folder (same settings required)",
    )
    precision: str = S.setting(
        "auto",
        kind=S.choice("auto", "fp32", "bf16"),
        help="frozen weights: auto = bf16 on a GPU, fp32 on a CPU; with bf16 the text encoders run under "
        "bf16 autocast and the UNet in plain bf16 (no autocast)",
    )
    device: str = S.setting(
        "auto", kind=S.TEXT, help="torch device", default_text="default: cuda if available, else cpu"
    )
    validation_prompts: list[str] = S.setting(
        kind=S.TEXTS,
        default_factory=list,
        flag="--validation-prompt",
        action="append",
        help="prompt for a sample grid after training ({} stands for the concept); repeatable",
    )
    validation_inference_steps: int = S.setting(25, kind=S.POSITIVE_INT, help="denoising steps of the samples")
    validation_every: int | None = S.setting(
        None,
        kind=S.optional(S.POSITIVE_INT),
        help="also render the validation prompts every N job steps into "
        "<concept>/samples/step-N.png, to watch a concept learn",
        default_text="default: only after training",
    )
    export_ti_rescaled: bool = S.setting(
        False,
        kind=S.BOOL,
        action="true",
        help="TI: also export vectors rescaled to m* (the paper's TI-rescaled baseline) under rescaled/",
    )
    progress: bool = S.setting(
        True,
        kind=S.BOOL,
        flag="--no-progress",
        action="false",
        help="no progress output (a bar on a terminal, plain lines in a log)",
    )
    progress_interval: float = S.setting(
        30.0, kind=S.NONNEG_FLOAT, help="seconds between plain progress lines when stderr is not a terminal"
    )
    log_every: int = S.setting(
        10,
        kind=S.POSITIVE_INT,
        help="job steps between points of the training curves "
        "(per-concept loss, norm, angle from the start, learning rate)",
    )
    report_to: str = S.setting(
        "none",
        kind=S.choice(*REPORT_TO),
        help="also send the curves to TensorBoard (<output>/logs) or Weights & Biases through "
        "accelerate's trackers (optional packages); curves.png is written either way",
    )
    max_bad_steps: int = S.setting(
        3,
        kind=S.POSITIVE_INT,
        help="stop a concept after this many steps in a row with a NaN/inf loss, gradient or update",
    )
    parallel: str = S.setting(
        "shard",
        kind=S.choice("shard", "data"),
        help="under torchrun / accelerate launch: shard splits the concepts over the ranks; "
        "data trains every concept on every rank with different samples and all-reduced "
        "gradients (W ranks = one rank with W times the batch)",
    )
    # Throughput and memory levers. Only the latent cache changes what is sampled (crops on a fixed grid).
    latent_cache: bool = S.setting(
        True,
        kind=S.BOOL,
        flag="--no-latent-cache",
        action="false",
        group=PERF,
        fingerprint=True,
        help="VAE-encode every sampled crop every step, at any pixel offset (default: a "
        "fixed set of crops per image on the 8-pixel grid is encoded once and reused)",
    )
    latent_cache_crops: int = S.setting(
        16,
        kind=S.POSITIVE_INT,
        group=PERF,
        help="most cached crops per image, evenly spaced 8-pixel offsets along the longer side",
    )
    text_cache: bool | str = S.setting(
        "auto",
        kind=_TEXT_CACHE,
        action="optional_bool",
        group=PERF,
        help="reuse the text encoders' states before the first learned token and skip "
        "layers whose output is unused (exact)",
        default_text="default: on for SDXL, off for SD, as measured; SANA: off unless asked (unmeasured on a "
        "GPU); Wan: not available (bidirectional encoder)",
    )
    attention: str = S.setting(
        "sdpa",
        kind=S.choice("sdpa", "xformers"),
        group=PERF,
        help="attention kernels: sdpa (PyTorch's fused attention) or xformers (CUDA, needs the xformers package)",
    )
    gradient_checkpointing: bool = S.setting(
        False,
        kind=S.BOOL,
        action="true",
        group=PERF,
        help="recompute UNet and text-encoder activations in backward: less memory, more time",
    )
    channels_last: bool = S.setting(
        False, kind=S.BOOL, action="true", group=PERF, help="run the UNet in channels-last memory format"
    )
    tf32: bool = S.setting(
        True,
        kind=S.BOOL,
        flag="--no-tf32",
        action="false",
        group=PERF,
        help="with --precision fp32 on a GPU that has them, do not use TF32 matmuls and "
        "convolutions (on by default: about 8x the fp32 matmul rate, 10-bit mantissa inputs)",
    )
    deterministic: bool = S.setting(
        False,
        kind=S.BOOL,
        action="true",
        group=PERF,
        help="deterministic CUDA algorithms and the math attention backend, so a resumed "
        "GPU job repeats an uninterrupted one (slower); CPU runs are deterministic anyway",
    )
    compile: bool = S.setting(
        False,
        kind=S.BOOL,
        action="true",
        group=PERF,
        help="torch.compile the UNet: faster steps after a compile of a minute or more, so for "
        "long jobs (see the README's measurements)",
    )
    optim_bits: int = S.setting(
        32,
        kind=S.Kind("32 or 8", S.either(S.literal(32), S.literal(8)).convert, choices=(32, 8)),
        group=PERF,
        fingerprint=True,
        help="TI: keep AdamW's two moments blockwise in 8 bits (bitsandbytes); DTI's "
        "optimizer keeps one fp32 scalar per row, which this does not change",
    )

    def effective_lr(self, data_world: int = 1) -> float:
        """The learning rate, scaled by the global batch per concept unless ``scale_lr`` is off."""
        base = self.lr if self.lr is not None else DEFAULT_LR[self.method]
        return base * self.batch_size * data_world if self.scale_lr else base

    def concept_steps(self, concept: Concept) -> int:
        return concept.steps if concept.steps is not None else self.steps

    def concept_fingerprint(self, concept: Concept, data_world: int = 1) -> str:
        """A hash of everything that shapes one concept's vectors (not step counts or output options).

        Concepts train independently of their batch-mates, so a checkpoint of a
        concept stays valid whichever job or shard it was trained in.
        """
        data = {k: getattr(self, k) for k in S.fingerprint_fields(TrainConfig)}
        if self.latent_cache:
            data["latent_cache_crops"] = self.latent_cache_crops
        data["data_world"] = data_world
        data["concept"] = {
            "name": concept.name,
            "images": str(concept.images),
            "init": concept.init,
            "placeholder": concept.placeholder,
            "kind": concept.kind,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate_config(cfg: TrainConfig) -> None:
    """Refuse a bad job before anything expensive happens (types and ranges from the schema, then the rest)."""
    S.check_fields(cfg)
    if isinstance(cfg.max_batch, int) and cfg.max_batch < cfg.batch_size:
        raise ValueError(f"max_batch ({cfg.max_batch}) must be at least batch_size ({cfg.batch_size})")
    if cfg.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ValueError(
            "--attention xformers needs the xformers package, which is not installed: "
            "pip install 'dti-fast[xformers]' (a CUDA build matching torch), or use --attention sdpa"
        )
    if cfg.optim_bits == 8 and cfg.method == "ti" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--optim-bits 8 needs bitsandbytes (pip install bitsandbytes), or use --optim-bits 32")
    check_report_to(cfg.report_to)
    resolve_device(cfg.device)  # "cuda" without CUDA, "gpu0": refused before the photos and the model load
    if cfg.validation_every and not cfg.validation_prompts:
        raise ValueError(
            "validation_every needs validation prompts: add --validation-prompt (or validation_prompts in the job file)"
        )
    if cfg.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8 (the VAE's factor), got {cfg.resolution}")
    if not cfg.concepts:
        raise ValueError("the job has no concepts; add at least one (name, image folder, initializer)")
    seen_names, seen_placeholders = set(), set()
    for c in cfg.concepts:
        if not isinstance(c, Concept):
            raise ValueError(f"concepts must be Concept records, got {type(c).__name__}")
        if c.name in seen_names:
            raise ValueError(f"two concepts are named {c.name!r}; names must be unique (they name output folders)")
        if c.placeholder in seen_placeholders:
            raise ValueError(f"placeholder {c.placeholder!r} is used by two concepts; give each its own")
        seen_names.add(c.name)
        seen_placeholders.add(c.placeholder)
    validate_export_names(cfg.concepts, cfg.method, rescaled=cfg.export_ti_rescaled and cfg.method == "ti")
    out = Path(cfg.output_dir)
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe_dir.is_dir():
        raise ValueError(f"output folder {out} cannot be made: {probe_dir} is not a folder; choose another --output")
    if not os.access(probe_dir, os.W_OK):
        raise PermissionError(f"output folder {out} is not writable; choose another --output")


_CONCEPT_KEYS = {f.name for f in fields(Concept)} | {"class"}


def read_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into TrainConfig keyword arguments; raises JobError naming the file and key.

    Relative paths (output_dir, concept images, and a model folder that exists
    there) are taken relative to the job file; ``~`` is expanded.
    """
    path = Path(path)
    where = f"job file {path}"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{where} does not exist") from None
    except UnicodeDecodeError:
        raise JobError(f"{where} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise JobError(f"{where} is not valid TOML: {err}") from None
    except OSError as err:
        raise JobError(f"{where} cannot be read ({err.strerror})") from None
    base = path.parent
    try:
        job = S.from_mapping(TrainConfig, raw, where, base=base, skip=("concept",))
    except ValueError as err:
        raise JobError(str(err)) from None
    if "model" in job:
        local = (base / job["model"]).expanduser()
        if not Path(job["model"]).expanduser().is_absolute() and local.exists():
            job["model"] = str(local)
        elif job["model"].startswith("~"):
            job["model"] = str(Path(job["model"]).expanduser())
    entries = raw.get("concept", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise JobError(f"{where}: write concepts as [[concept]] tables")
    concepts = []
    for n, entry in enumerate(entries, 1):
        unknown = set(entry) - _CONCEPT_KEYS
        if unknown:
            raise JobError(f"{where}: concept #{n} has unknown key(s) {', '.join(sorted(unknown))}")
        missing = {"name", "images", "init"} - set(entry)
        if missing:
            raise JobError(f"{where}: concept #{n} lacks {', '.join(sorted(missing))}")
        entry = dict(entry)
        if "class" in entry:
            entry["class_noun"] = entry.pop("class")
        for key in ("name", "init", "class_noun", "placeholder", "kind"):
            if key in entry and not isinstance(entry[key], str):
                raise JobError(f"{where}: concept #{n}: {key} must be a string, got {entry[key]!r}")
        if not isinstance(entry["images"], str):
            raise JobError(f"{where}: concept #{n}: images must be a folder path (a string), got {entry['images']!r}")
        if "steps" in entry and (isinstance(entry["steps"], bool) or not isinstance(entry["steps"], int)):
            raise JobError(f"{where}: concept #{n}: steps must be an integer, got {entry['steps']!r}")
        images = Path(entry["images"]).expanduser()
        entry["images"] = images if images.is_absolute() else base / images
        try:
            concepts.append(Concept(**entry))
        except (TypeError, ValueError) as err:
            raise JobError(f"{where}: concept #{n}: {err}") from None
    job["concepts"] = concepts
    return job


def load_job_file(path: Path) -> dict[str, Any]:
    """:func:`read_job_file` for the command line: a bad file exits with its message."""
    try:
        return read_job_file(path)
    except JobError as err:
        raise SystemExit(f"dti-fast: {err}") from None
