"""Build the toy world's base text-to-image model from scratch, in diffusers' SD 1.x layout.

Stages (all seeded): render a training set of scenes (no held-out triple, no novel concept),
train a small ``AutoencoderKL`` (64x64x3 -> 16x16x4) to reconstruct them, encode every render
once (the latent cache), then train a pre-norm ``CLIPTextModel`` (world-word tokenizer) and a
small ``UNet2DConditionModel`` jointly (by default on zero terminal SNR with the v target, the
objective the trainer then follows from the saved scheduler config; else SD's epsilon), with 10 %
empty captions for classifier-free guidance. The folder loads with
``StableDiffusionPipeline.from_pretrained`` and :func:`dti_fast.models.load_model_parts`.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .. import settings as S
from ..data import OBJECT_TEMPLATES, STYLE_TEMPLATES
from ..io import write_json
from . import render as R
from .tokenizer import MAX_LENGTH, word_ids, write_tokenizer

WORLD_VERSION = 3  # 2: concepts between named things (and their scorer); 3: zero-terminal-SNR base model
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "world_base"


@dataclass
class BuildConfig:
    """A base-model build. The defaults are the from-scratch recipe sized to 30 minutes on a 2-core
    AMD EPYC, 53 on a 2-core Intel Xeon (README: what it reaches); the shipped model was made in
    stages (README: the commands).

    Each setting is declared once (:func:`dti_fast.settings.setting`): its ``world build-base``
    flag, help and check derive from it. README: what the recipe alternatives measured.
    """

    seed: int = S.setting(0, kind=S.NONNEG_INT, help="seed of the renders, weights and every random draw")
    images: int = S.setting(12000, kind=S.POSITIVE_INT, help="renders in the training set")
    vae_steps: int = S.setting(1900, kind=S.POSITIVE_INT, help="VAE steps")
    vae_batch: int = S.setting(12, kind=S.POSITIVE_INT, help="VAE batch")
    # The objects are a small part of each image, so a plain L1 is mostly about the background;
    # what the gate reads (shapes, colours, counts) is in the objects (README: the VAE's ceiling).
    vae_object_weight: float = S.setting(
        3.0,
        kind=S.NONNEG_FLOAT,
        help="extra weight of object pixels in the VAE's L1 loss (3: an object pixel counts 4x a background "
        "one; 0: plain L1, as builds before 2026-12-02 and the shipped model's)",
    )
    # The same for the UNet's loss: an object covers a few latent cells, the background the rest.
    unet_object_weight: float = S.setting(
        0.0,
        kind=S.NONNEG_FLOAT,
        help="extra weight of the latent cells under objects in the UNet's loss (a cell counts 1 + this "
        "times the fraction of its pixels an object covers; 0: plain MSE)",
    )
    steps: int = S.setting(4200, kind=S.POSITIVE_INT, help="text encoder + UNet steps")
    batch: int = S.setting(48, kind=S.POSITIVE_INT, help="text encoder + UNet batch")
    lr: float = S.setting(2e-3, kind=S.POSITIVE_FLOAT, help="text encoder + UNet peak learning rate")
    empty_caption: float = S.setting(
        0.1, kind=S.UNIT_INTERVAL, help="fraction of empty captions (what classifier-free guidance needs)"
    )
    # One torch thread: on busy shared cores more threads cost up to 10x (measured).
    threads: int | None = S.setting(1, kind=S.optional(S.POSITIVE_INT), help="torch threads of the VAE and scorer")
    resume_from: str | None = S.setting(
        None,
        kind=S.optional(S.TEXT),
        help="continue this built model: keep its VAE, train its text encoder + UNet --steps more "
        "(a further stage; the shipped model was made in seven)",
    )
    minutes: float | None = S.setting(
        None, kind=S.optional(S.POSITIVE_FLOAT), help="wall budget of the UNet stage: fewer steps if needed (logged)"
    )
    vae_minutes: float | None = S.setting(None, kind=S.optional(S.POSITIVE_FLOAT), help="wall budget of the VAE stage")
    offset_noise: float = S.setting(
        0.0,
        kind=S.NONNEG_FLOAT,
        help="std of a per-image, per-channel constant added to the training noise, e.g. 0.3 (0: white)",
    )
    pyramid: float = S.setting(
        0.0,
        kind=S.NONNEG_FLOAT,
        help="instead of offset noise: noise at every coarser octave, this weight ratio per octave (0: off)",
    )
    ema: float = S.setting(
        0.999, kind=S.UNIT_INTERVAL, help="save a weight average with this decay (0: the raw weights)"
    )
    # Zero terminal SNR (betas rescaled so t = 999 is pure noise) with v-prediction, sampled on
    # trailing timesteps: nothing of the image survives at the start, so the layout has to come
    # from the caption (README: what it measured). Saved in the folder's scheduler config.
    zero_snr: bool = S.setting(
        True,
        kind=S.BOOL,
        action="optional_bool",
        default_text="default on",
        help="zero terminal SNR with v-prediction (trailing sampling steps), saved in the scheduler config; "
        "--no-zero-snr: SD's schedule and the epsilon target",
    )
    # Steps on SD's schedule first: some of the image survives the noisiest step there, so the
    # model can take where an object sits from its noisy input and learn what it looks like, which
    # zero terminal SNR, where the caption alone must place it, teaches slowly (README: measured).
    epsilon_fraction: float = S.setting(
        0.0,
        kind=S.UNIT_INTERVAL,
        help="train this fraction of the text encoder + UNet steps first on SD's schedule with the epsilon "
        "target and uniform timesteps (the objects' shapes come faster there), the rest with zero terminal "
        "SNR and v; e.g. 0.667 (0: zero terminal SNR throughout; with --no-zero-snr every step is on SD's "
        "schedule anyway)",
    )
    # > 1 draws training timesteps toward the noisy end, where the layout is decided (SD3's shift).
    timestep_shift: float = S.setting(
        3.0,
        kind=S.POSITIVE_FLOAT,
        help="draw training timesteps toward the noisy end: t/T = s*u/(1+(s-1)*u), u uniform (1: uniform)",
    )
    # The text encoder + UNet stage runs alone (build_world joins the scorer's process first), so
    # it may use both cores of a 2-core machine: 1.55x one thread's steps per second there when
    # the machine is quiet (on busy shared cores use 1).
    unet_threads: int | None = S.setting(
        2,
        kind=S.optional(S.POSITIVE_INT),
        help="torch threads of the text encoder + UNet stage, which runs alone",
    )
    # Every random draw is made on the CPU with the seeded generators, so a device changes only
    # the arithmetic.
    device: str = S.setting(
        "auto", kind=S.TEXT, help="where the VAE, text encoder and UNet train: auto, cpu, cuda, cuda:N"
    )
    checkpoint_minutes: float = S.setting(
        2.0,
        kind=S.NONNEG_FLOAT,
        help="minutes between checkpoints of the VAE and text encoder + UNet stages (0: every step). A build "
        "stopped by Ctrl-C, SIGTERM, kill -9 or a full disk continues from its last checkpoint when the "
        "same command runs again",
    )
    # Min-SNR-gamma (Hang et al. 2023) in the form that keeps the noisiest steps at full weight:
    # v loss times (min(SNR, g) + 1) / (SNR + 1), epsilon loss times min(SNR, g) / SNR.
    min_snr: float = S.setting(
        0.0,
        kind=S.NONNEG_FLOAT,
        help="min-SNR-gamma loss weights with this gamma, the noisiest steps kept at full weight (0: off)",
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the setting, its value and what it must be, for the first bad one."""
        S.check_fields(self)
        if self.offset_noise and self.pyramid:
            raise ValueError("--offset-noise and --pyramid are two kinds of training noise: give one of them")
        if self.resume_from:
            src = Path(self.resume_from)
            if not (src / "model_index.json").is_file() or not (src / "world_build.json").is_file():
                raise ValueError(
                    f"--resume-from {src}: not a model that dti-fast world build-base wrote (it needs "
                    "model_index.json and world_build.json); give such a folder"
                )


# Settings that change how fast a build runs, not what it learns: a build may be resumed with
# other values of these (the last bits of CPU sums can differ with the thread count).
RUN_ONLY = ("threads", "unet_threads", "device", "checkpoint_minutes")
CHECKPOINTS = "checkpoints"  # in the folder being built: the stages' checkpoints and build.json


class BuildInterrupted(Exception):
    """SIGINT/SIGTERM stopped a build after its checkpoint was written."""

    def __init__(self, signum: int, folder: Path) -> None:
        import signal

        self.signum = signum
        self.folder = folder
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; the build so far is kept in {folder}; "
            "run the same command again to continue it"
        )


def _halt_if_stopped(stop, folder: Path) -> None:
    """Raise :class:`BuildInterrupted` when ``stop`` (a StopSignals, or None) has caught a signal."""
    if stop is not None and stop.signum is not None:
        raise BuildInterrupted(stop.signum, folder)


class _Checkpoint:
    """One stage's resumable state: a safetensors file of tensors with its JSON in the metadata.

    Written atomically (:func:`dti_fast.io.save_safetensors`), so a kill at any moment leaves the
    previous checkpoint or the new one, never half of one.
    """

    def __init__(self, path: Path, minutes: float, stop=None) -> None:
        self.path = Path(path)
        self.every_s = minutes * 60.0
        self.stop = stop  # a train.run.StopSignals, or None
        self.last = time.perf_counter()

    def due(self) -> bool:
        """Whether to write one now: its interval has passed, or a signal asks the build to stop."""
        return self.stopping() or time.perf_counter() - self.last >= self.every_s

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.signum is not None

    def save(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        from ..io import save_safetensors

        save_safetensors(tensors, self.path, metadata={"state": json.dumps(state)})
        self.last = time.perf_counter()
        if self.stopping():
            raise BuildInterrupted(self.stop.signum, self.path.parent.parent)

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as fh:  # tensors and state in one read
                state = json.loads(fh.metadata()["state"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as err:  # safetensors raises several types for a damaged file
            raise ValueError(
                f"the build's checkpoint {self.path} is damaged ({type(err).__name__}: {err}); "
                "add --force to start the build afresh"
            ) from err
        return tensors, state


def _module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load_module(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    n = len(prefix) + 1
    module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-param state as flat tensors (``opt.<param index>.<name>``)."""
    return {f"opt.{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _json_form(settings: dict) -> dict:
    """``settings`` as ``build.json`` records them (tuples as lists), to compare with a recorded set."""
    return json.loads(json.dumps(settings))


#: Settings whose default is not what builds did before the setting existed: a record without one
#: (an unfinished build of an older version) was built with this value (the README's ``$THEN`` and
#: stage commands spell the same values out).
LEGACY_VALUES = {"zero_snr": False, "timestep_shift": 1.0, "ema": 0.0, "vae_object_weight": 0.0}


def changed_settings(before: dict, now: dict) -> list[str]:
    """The keys whose values differ between two recorded sets of settings (either side may lack one).

    A :class:`BuildConfig` setting that ``before`` lacks was recorded by a version without it: it
    counts as what builds did then, its :data:`LEGACY_VALUES` entry or else its default (a setting
    added without changing what builds do), so a build left unfinished before an upgrade continues
    after it, and one that the upgrade would build differently is refused.
    """
    defaults = _json_form({f.name: f.default for f in fields(BuildConfig) if f.default is not MISSING})
    defaults.update(_json_form(LEGACY_VALUES))
    missing = object()

    def then(key: str):
        return before[key] if key in before else defaults.get(key, missing)

    return sorted(k for k in set(before) | set(now) if then(k) != now.get(k, missing))


def build_fingerprint(cfg: BuildConfig, **extra) -> dict:
    """What a build learns from: its settings but the :data:`RUN_ONLY` ones, plus ``extra`` (the scorer's),
    in the JSON form ``build.json`` records (tuples as lists), so it compares equal to a recorded one."""
    return _json_form({**{k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}, **extra})


def scheduler_config(cfg: BuildConfig) -> dict:
    """The model's scheduler config: SD 1.x's, or with ``cfg.zero_snr`` rescaled betas, v-prediction, trailing."""
    from ..models import SD_SCHEDULER_CONFIG

    if not cfg.zero_snr:
        return dict(SD_SCHEDULER_CONFIG)
    return dict(
        SD_SCHEDULER_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )


def training_noise(shape, gen: torch.Generator, cfg: BuildConfig) -> torch.Tensor:
    """The base model's training noise: white, plus what hides an image's low frequencies from the model.

    With white noise, SD's schedule leaves 7 % of the signal in the noisiest sample (t = 999) and a
    16x16 latent averages 256 pixels, so the image's mean colour stays readable in the noisy input:
    a model learns to take the background colour from the noise it is given instead of from the
    caption, and at sampling time takes it from the random start (the v1 model's background colour
    followed the caption in 12 % of held-out prompts: chance). Offset noise (a constant per sample
    and channel, std ``cfg.offset_noise``) hides the mean; ``cfg.pyramid`` adds every coarser octave
    instead (then renormalised). The sampler still starts from white noise.
    """
    if cfg.pyramid:
        return pyramid_noise(shape, gen, cfg.pyramid)
    noise = torch.randn(shape, generator=gen)
    if cfg.offset_noise:
        noise = noise + cfg.offset_noise * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    return noise


def pyramid_noise(shape, gen: torch.Generator, discount: float) -> torch.Tensor:
    """Gaussian noise with extra power at every coarser octave (weights ``discount``, ``discount**2``, ...),
    renormalised to unit variance per sample (so its white part is weaker than the sampler's start)."""
    b, c, h, w = shape
    n = torch.randn(shape, generator=gen)
    weight, size = 1.0, h // 2
    while size >= 1:
        weight *= discount
        coarse = torch.randn((b, c, size, size), generator=gen)
        n = n + weight * torch.nn.functional.interpolate(
            coarse, size=(h, w), mode="bilinear" if size > 1 else "nearest"
        )
        size //= 2
    return n / n.std(dim=(1, 2, 3), keepdim=True)


def epsilon_steps(cfg: BuildConfig, total: int) -> int:
    """How many of a UNet stage of ``total`` steps train first on SD's schedule (``cfg.epsilon_fraction``
    of them, so a ``--minutes`` budget that shortens the stage shortens them in proportion; none
    without ``cfg.zero_snr``, whose every step is on SD's schedule)."""
    # at least the last step on zero SNR: the model is saved with that schedule and target
    return min(round(cfg.epsilon_fraction * total), total - 1) if cfg.zero_snr else 0


def average_weight(step: int, switch: int, ema: float) -> float:
    """How far the weight average moves toward the weights after ``step``: a warm-started decay,
    so the first steps are not averaged with the random init, restarted at ``switch`` (the end of
    the epsilon steps), so the zero-SNR weights are not averaged with those of another objective."""
    k = step - switch if step >= switch else step
    return 1.0 - min(ema, (1 + k) / (10 + k))


def training_timesteps(n: int, gen: torch.Generator, shift: float, num_train: int) -> torch.Tensor:
    """``n`` training timesteps: uniform, or with ``shift`` > 1 drawn toward the noisy end.

    ``shift`` maps a uniform ``u`` to ``s u / (1 + (s - 1) u)`` (the fraction of the schedule), so
    with ``s = 3`` half the draws fall in the noisiest quarter. ``shift == 1`` keeps the original
    draw (``torch.randint``), so builds made before the option reproduce exactly.
    """
    if shift == 1.0:
        return torch.randint(0, num_train, (n,), generator=gen)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    u = shift * u / (1 + (shift - 1) * u)
    return (u * num_train).long().clamp_(0, num_train - 1)


def training_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    min_snr: float,
    prediction: str,
    cell_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's MSE; with ``min_snr`` > 0 each sample's weighted by min-SNR-gamma (``BuildConfig.min_snr``).

    ``cell_weight`` (broadcastable to ``pred``, e.g. (B, 1, h, w)) weighs each latent cell's squared
    error; each sample's error is then the weighted mean, so the loss keeps the plain MSE's scale.
    """
    if not min_snr and cell_weight is None:
        return torch.nn.functional.mse_loss(pred, target)
    err = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, pred.dim()))
    if cell_weight is None:
        per_sample = err.mean(dim=dims)
    else:
        w = cell_weight.float().expand_as(err)
        per_sample = (err * w).mean(dim=dims) / w.mean(dim=dims)
    if not min_snr:
        return per_sample.mean()
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp_min(1e-12)
    capped = snr.clamp(max=min_snr)
    weight = (capped + 1) / (snr + 1) if prediction == "v_prediction" else capped / snr.clamp_min(1e-12)
    return (per_sample * weight).mean()


def _templates():
    # Templates whose size word would contradict the scene's are left out; every template word
    # still appears (small/large in the descriptions).
    return [t for t in OBJECT_TEMPLATES + STYLE_TEMPLATES if "small" not in t and "large" not in t]


def training_caption(spec: R.Spec, rng: np.random.Generator) -> str:
    """A caption of ``spec`` with random attributes left out and a random template framing half the time."""
    desc = R.describe(
        spec,
        colour=rng.random() < 0.9,
        size=rng.random() < 0.6,
        position=rng.random() < 0.8,
        background=rng.random() < 0.85,
        texture=rng.random() < 0.9,
        second=rng.random() < 0.9,
    )
    if rng.random() < 0.5:
        tpl = _templates()
        desc = tpl[rng.integers(len(tpl))].format(desc)
    return desc


def make_modules(vocab_size: int, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            sample_size=R.SIZE,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            mid_block_add_attention=False,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=128,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                hidden_act="quick_gelu",
                projection_dim=128,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=R.SIZE // 4,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 128),
            norm_num_groups=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=8,
        )
    return vae, te, unet


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def object_masks(
    specs: list[R.Spec], images: np.ndarray | None = None, check: Callable[[], None] | None = None
) -> np.ndarray:
    """Per scene, the pixels its objects cover, grown by one pixel: bool (N, H, W).

    Each scene is rendered again without its objects (the background draws the same random
    numbers first, so it comes out identical) and compared with the full render: ``images``
    (uint8 (N, H, W, 3), the renders of ``specs``) when given, else rendered again. ``check``
    is called every :data:`_CHECK_EVERY` scenes (a build's stop check: it may raise).
    """
    import dataclasses

    out = np.zeros((len(specs), R.SIZE, R.SIZE), dtype=bool)
    for i, spec in enumerate(specs):
        if check is not None and i % _CHECK_EVERY == 0:
            check()
        full = np.asarray(R.render(spec) if images is None else images[i], dtype=np.int16)
        bare = np.asarray(R.render(dataclasses.replace(spec, main=[], second=None)), dtype=np.int16)
        m = np.abs(full - bare).sum(-1) > 0
        grown = m.copy()
        grown[1:] |= m[:-1]
        grown[:-1] |= m[1:]
        grown[:, 1:] |= m[:, :-1]
        grown[:, :-1] |= m[:, 1:]
        out[i] = grown
    return out


# Scenes (or latent batches of 256) between two stop checks of a build: well under a second.
_CHECK_EVERY = 256


def render_set(n: int, seed: int, check: Callable[[], None] | None = None, **kw) -> tuple[list[R.Spec], np.ndarray]:
    """``n`` scenes drawn with ``seed`` (``kw``: :func:`render.sample_spec`'s) and their renders, uint8
    (N, H, W, 3); ``check`` is called every :data:`_CHECK_EVERY` scenes (a build's stop check)."""
    rng = np.random.default_rng(seed)
    specs = [R.sample_spec(rng, **kw) for _ in range(n)]
    images = []
    for i, spec in enumerate(specs):
        if check is not None and i % _CHECK_EVERY == 0:
            check()
        images.append(np.asarray(R.render(spec)))
    return specs, np.stack(images)


def train_vae(
    vae,
    images: np.ndarray,
    steps: int,
    batch: int,
    seed: int,
    log: Callable,
    minutes: float | None = None,
    device: str = "cpu",
    ckpt: _Checkpoint | None = None,
    masks: Callable[[], np.ndarray] | None = None,
    object_weight: float = 0.0,
) -> tuple[float, int, float, int | None]:
    """Train ``vae`` to reconstruct ``images``; returns the last loss, the steps run, the seconds and
    the step it continued from (None: it started afresh).

    With ``masks`` (called, only when steps remain to train, for bool (N, H, W): :func:`object_masks`)
    and ``object_weight`` > 0 an object pixel's L1 error weighs ``1 + object_weight``, a background
    pixel's 1 (a weighted mean, so the loss keeps plain L1's scale); without them the loss is plain L1.

    With ``ckpt`` it continues from that checkpoint (a finished stage is not run again) and writes
    one when due and at the end: same seeds, so a resumed stage ends with the same weights.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    total = steps
    warm = 50

    def lr_at(s: int) -> float:  # warmup, then linear decay to 10 % (the first ``warm`` steps ignore ``total``)
        return 2e-3 * ((s + 1) / warm if s < warm else 0.1 + 0.9 * (1 - (s - warm) / max(1, total - warm)))

    step, before, loss_value = 0, 0.0, float("nan")
    saved = ckpt.load() if ckpt is not None else None
    if saved is not None:
        tensors, state = saved
        _load_module("vae", vae, tensors)
        _load_optimizer(opt, tensors)
        gen.set_state(tensors["gen"])
        step, total, before, loss_value = state["step"], state["total"], state["seconds"], state["loss"]
        log(f"vae: resuming at step {step}/{total} from {ckpt.path}" if step < total else "vae: trained before")

    def save() -> None:
        tensors = {**_module_tensors("vae", vae), **_optimizer_tensors(opt), "gen": gen.get_state()}
        state = {"step": step, "total": total, "seconds": before + time.perf_counter() - t0, "loss": loss_value}
        ckpt.save(tensors, state)

    object_pixels = masks() if masks is not None and object_weight and step < total else None
    vae.train()
    t0 = time.perf_counter()
    while step < total:
        if minutes and step == 10:
            fit = int(minutes * 60 / ((before + time.perf_counter() - t0) / 10))
            if fit < total:
                total = max(min(total, warm + 1), fit)
                log(f"vae: {total} steps fit in {minutes} min (of {steps} asked)")
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = _to_tensor(images[idx.numpy()]).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        if object_pixels is None:
            l1 = (rec - x).abs().mean()
        else:
            on_object = torch.from_numpy(object_pixels[idx.numpy()]).to(device, torch.float32).unsqueeze(1)
            w = 1.0 + object_weight * on_object
            l1 = ((rec - x).abs() * w).mean() / w.mean()
        loss = l1 + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if step % 50 == 0 or step == total - 1:
            log(f"vae step {step}/{total} l1 {loss_value:.4f} ({before + time.perf_counter() - t0:.0f} s)")
        step += 1
        if ckpt is not None and step < total and ckpt.due():
            save()
    if ckpt is not None and (saved is None or saved[1]["step"] < total):
        save()  # the finished stage: a resumed build does not train it again
    vae.eval()
    return loss_value, total, before + time.perf_counter() - t0, (saved[1]["step"] if saved is not None else None)


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 256, check: Callable[[], None] | None = None) -> torch.Tensor:
    """The latent means of ``images``, on the VAE's device (``check`` called before each batch)."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        if check is not None:
            check()
        out.append(vae.encode(_to_tensor(images[i : i + batch]).to(device)).latent_dist.mean)
    return torch.cat(out)


def write_folder(out: Path, vae, te, unet, tok, extra: dict, scheduler: dict | None = None) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from ..models import SD_SCHEDULER_CONFIG, prefix_text_encoder_keys

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=DDPMScheduler(**(scheduler or SD_SCHEDULER_CONFIG)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out / "tokenizer"))
    prefix_text_encoder_keys(out / "text_encoder")
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index.update(extra)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    from ..io import umask_modes

    umask_modes(out)  # safetensors writes its files 0600
    return out


def build_base(
    out,
    cfg: BuildConfig | None = None,
    log: Callable = print,
    fp16: bool = True,
    before_unet: Callable[[], None] | None = None,
    stop=None,
    check_vae: Callable | None = None,
) -> dict:
    """Train the base model into folder ``out``; returns a summary (losses, wall times).

    ``before_unet`` runs between the latent cache and the text encoder + UNet stage
    (:func:`build_world` waits there for the scorer's process, so that stage has the cores).
    The VAE and text encoder + UNet stages write checkpoints into ``out/checkpoints`` every
    ``cfg.checkpoint_minutes`` and continue from them when ``out`` holds some (the caller checks
    that they come from the same settings); ``stop`` (a :class:`dti_fast.train.run.StopSignals`)
    makes them write one and raise :class:`BuildInterrupted`. The rendered scenes and the latent
    cache are made again on a resume (seeded: the same ones).
    """
    from diffusers import DDPMScheduler

    cfg = cfg or BuildConfig()
    cfg.check()
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    summary: dict = {"config": asdict(cfg)}
    ck_dir = out / CHECKPOINTS
    resumed = []  # the stages continued from a checkpoint, and where
    t_all = time.perf_counter()
    tokdir = Path(tempfile.mkdtemp(prefix="world-tok-"))
    tok = write_tokenizer(tokdir)
    vocab = tok.get_vocab()
    used = word_ids(vocab)
    vae, te, unet = make_modules(len(vocab), cfg.seed)
    if cfg.resume_from:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        src = Path(cfg.resume_from)
        vae = AutoencoderKL.from_pretrained(str(src), subfolder="vae", torch_dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(str(src), subfolder="text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(str(src), subfolder="unet", torch_dtype=torch.float32)
        vae, te, unet = vae.float(), te.float(), unet.float()
        prev = json.loads((src / "world_build.json").read_text(encoding="utf-8"))
        summary["resumed_from"] = {
            "folder": str(src),
            "config": prev.get("config"),
            "steps_done": prev.get("steps_done"),
            "vae_heldout_mae_0_255": prev.get("vae_heldout_mae_0_255"),
        }
    with torch.no_grad():  # rows BPE needs but no world text ever uses: exactly zero, forever
        emb = te.get_input_embeddings().weight
        keep = torch.zeros(len(emb), dtype=torch.bool)
        keep[used] = True
        emb[~keep] = 0.0
        if not cfg.resume_from:
            emb[keep] *= 0.02 / emb[keep].std()
    from ..models import resolve_device

    device = resolve_device(cfg.device)
    summary["device"] = str(device)
    vae, te, unet = vae.to(device), te.to(device), unet.to(device)
    log(
        f"params: vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, text encoder "
        f"{sum(p.numel() for p in te.parameters()) / 1e6:.2f}M, "
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M; "
        f"vocab {len(vocab)} ({len(used)} word rows)"
    )

    # A signal during the renders, the object masks or the latent cache (a minute or more at the
    # default size) stops the build there: what the stages learned is in their checkpoints.
    halt = functools.partial(_halt_if_stopped, stop, out)

    t = time.perf_counter()
    specs, images = render_set(cfg.images, cfg.seed, check=halt, held=False)
    summary["render_s"] = time.perf_counter() - t
    log(f"rendered {len(images)} scenes in {summary['render_s']:.1f} s")

    @functools.cache
    def masks() -> np.ndarray:  # made once, only when a stage that weighs objects has steps left
        t_mask = time.perf_counter()
        m = object_masks(specs, images, check=halt)
        summary["object_fraction"] = float(m.mean())
        summary["mask_s"] = time.perf_counter() - t_mask
        log(f"object masks: {summary['object_fraction']:.1%} of pixels ({summary['mask_s']:.1f} s)")
        return m

    t = time.perf_counter()
    if cfg.resume_from:
        summary["vae_l1"], summary["vae_steps_done"], vae_train_s = None, 0, 0.0
    else:
        ck = _Checkpoint(ck_dir / "vae.safetensors", cfg.checkpoint_minutes, stop)
        summary["vae_l1"], summary["vae_steps_done"], vae_train_s, vae_from = train_vae(
            vae,
            images,
            cfg.vae_steps,
            cfg.vae_batch,
            cfg.seed + 1,
            log,
            cfg.vae_minutes,
            device,
            ck,
            masks,
            cfg.vae_object_weight,
        )
        if vae_from is not None:
            resumed.append({"stage": "vae", "step": vae_from})
    t_eval = time.perf_counter()
    with torch.no_grad():  # reconstruction error on renders the VAE never saw
        _, test = render_set(256 if cfg.images >= 2000 else 16, cfg.seed + 99, held=None)
        x = _to_tensor(test).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        summary["vae_heldout_mae_0_255"] = float((rec - x).abs().mean() * 127.5)
    log(f"vae held-out mean abs error {summary['vae_heldout_mae_0_255']:.2f} / 255")
    summary["vae_s"] = vae_train_s + time.perf_counter() - t_eval  # training (every run of it) + the check
    t = time.perf_counter()
    latents = encode_all(vae, images, check=halt)
    scale = float(vae.config.scaling_factor) if cfg.resume_from else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    summary["encode_s"] = time.perf_counter() - t
    log(f"latent cache {tuple(latents.shape)}, scaling_factor {scale:.4f} ({summary['encode_s']:.1f} s)")

    if before_unet is not None:
        before_unet()
    if check_vae is not None:  # (build_world: the gate's ceiling this VAE sets, once the scorer is there)
        ceiling = check_vae(vae)
        if ceiling is not None:
            summary["vae_gate_ceiling"] = ceiling
    if cfg.unet_threads:
        torch.set_num_threads(cfg.unet_threads)
    # Captions: drawn per step from each spec with the seeded stream, tokenized on the fly.
    rng = np.random.default_rng(cfg.seed + 2 + (100 if cfg.resume_from else 0))
    gen = torch.Generator().manual_seed(cfg.seed + 3 + (100 if cfg.resume_from else 0))
    sched = DDPMScheduler(**scheduler_config(cfg))
    # (scheduler, its alphas_cumprod, timestep shift) of the late steps and of the epsilon steps
    late = (sched, sched.alphas_cumprod.to(device), cfg.timestep_shift)
    early = late
    if epsilon_steps(cfg, cfg.steps):
        from ..models import SD_SCHEDULER_CONFIG

        sd = DDPMScheduler(**SD_SCHEDULER_CONFIG)
        early = (sd, sd.alphas_cumprod.to(device), 1.0)
    params = list(te.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warm = 100
    total = cfg.steps

    def lr_at(s: int) -> float:  # linear warmup, then cosine to 10 % (the first ``warm`` steps ignore ``total``)
        if s < warm:
            return cfg.lr * (s + 1) / warm
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))

    te.train()
    unet.train()
    emb = te.get_input_embeddings().weight
    avg = [p.detach().clone() for p in params] if cfg.ema else None
    loss_avg = None
    step, before = 0, 0.0
    ck = _Checkpoint(ck_dir / "unet.safetensors", cfg.checkpoint_minutes, stop)
    saved = ck.load()
    if saved is not None:
        tensors, state = saved
        _load_module("te", te, tensors)
        _load_module("unet", unet, tensors)
        _load_optimizer(opt, tensors)
        if avg is not None:
            with torch.no_grad():
                torch._foreach_copy_(avg, [tensors[f"avg.{i}"] for i in range(len(avg))])
        gen.set_state(tensors["gen"])
        rng.bit_generator.state = state["rng"]
        step, total, before, loss_avg = state["step"], state["total"], state["seconds"], state["loss_avg"]
        resumed.append({"stage": "unet", "step": step})
        log(f"unet: resuming at step {step}/{total} from {ck.path}" if step < total else "unet: trained before")

    def save() -> None:
        tensors = {**_module_tensors("te", te), **_module_tensors("unet", unet), **_optimizer_tensors(opt)}
        tensors.update({f"avg.{i}": a for i, a in enumerate(avg or ())})
        tensors["gen"] = gen.get_state()
        state = {
            "step": step,
            "total": total,
            "seconds": before + time.perf_counter() - t,
            "loss_avg": loss_avg,
            "rng": rng.bit_generator.state,
        }
        ck.save(tensors, state)

    cells = None  # per training latent, the fraction of each cell's pixels under an object: (N, 1, h, w)
    if cfg.unet_object_weight and step < total:
        factor = images.shape[1] // latents.shape[-1]
        on_object = torch.from_numpy(masks()).unsqueeze(1).float()
        cells = torch.nn.functional.avg_pool2d(on_object, factor).to(device)
    t = time.perf_counter()
    while step < total:
        if cfg.minutes and step == 20:
            per = (before + time.perf_counter() - t) / 20
            fit = int(cfg.minutes * 60 / per)
            if fit < total:
                total = max(min(total, warm + 1), fit)
                log(f"{per:.2f} s/step: {total} steps fit in {cfg.minutes} min (of {cfg.steps} asked)")
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        caps = ["" if rng.random() < cfg.empty_caption else training_caption(specs[i], rng) for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        ids, idx = ids.to(device), idx.to(device)
        x0 = latents[idx]
        noise = training_noise(x0.shape, gen, cfg).to(device)
        switch = epsilon_steps(cfg, total) or total
        s_sched, acp, shift = early if step < switch else late
        if step == switch and step < total:
            log(f"unet: step {step}: the epsilon steps are done; zero terminal SNR and the v target from here")
        ts = training_timesteps(cfg.batch, gen, shift, s_sched.config.num_train_timesteps).to(device)
        a = acp[ts].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = te(ids)[0]
        pred = unet(xt, ts, cond).sample
        prediction = s_sched.config.prediction_type
        target = s_sched.get_velocity(x0, noise, ts) if prediction == "v_prediction" else noise
        weight = None if cells is None else 1.0 + cfg.unet_object_weight * cells[idx]
        loss = training_loss(pred, target, acp[ts], cfg.min_snr, prediction, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if avg is not None:
            with torch.no_grad():
                torch._foreach_lerp_(avg, params, average_weight(step, switch, cfg.ema))
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if step % 100 == 0 or step == total - 1:
            el = before + time.perf_counter() - t
            log(
                f"unet step {step}/{total} loss {loss_avg:.4f} lr {lr_at(step):.2e} ({el:.0f} s, "
                f"{el / (step + 1):.2f} s/step)"
            )
        step += 1
        if step < total and ck.due():
            save()
    if saved is None or saved[1]["step"] < total:
        save()  # the finished stage: a build stopped after it (its serial scorer, the write) does not train it again
    summary["steps_done"] = total
    summary["unet_s"] = before + time.perf_counter() - t
    summary["resumed"] = resumed
    summary["unet_threads"] = torch.get_num_threads()
    summary["unet_loss"] = loss_avg
    if avg is not None:  # the saved model is the weight average
        with torch.no_grad():
            torch._foreach_copy_(params, avg)
    te.eval()
    unet.eval()
    with torch.no_grad():
        zero_rows = int((emb.norm(dim=-1) == 0).sum())
    summary["zero_rows"] = zero_rows
    summary["word_rows"] = len(used)
    if fp16:
        vae, te, unet = vae.cpu().half(), te.cpu().half(), unet.cpu().half()
    else:
        vae, te, unet = vae.cpu(), te.cpu(), unet.cpu()
    summary["total_s"] = time.perf_counter() - t_all
    write_folder(out, vae, te, unet, tok, {"_dti_fast_world": WORLD_VERSION}, scheduler_config(cfg))
    for name in ("vocab.json", "merges.txt"):  # the BPE files themselves too (transformers 4.x's slow tokenizer)
        shutil.copyfile(tokdir / name, out / "tokenizer" / name)
    write_json(summary, out / "world_build.json")
    shutil.rmtree(tokdir, ignore_errors=True)
    log(f"wrote {out} in {summary['total_s']:.0f} s")
    return summary


def _scorer_job(
    folder: str, steps: int, seed: int, minutes: float | None, n: int, n_val: int, threads, check=None
) -> None:
    """Train, validate and save the world's scorer into ``folder`` (in its own process, or in the build's
    with ``check``, its stop check)."""
    from .scoring import save_scorer, train_scorer, validate

    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    model, meta = train_scorer(
        steps=steps, seed=seed, log=lambda m: print(m, flush=True), minutes=minutes, n=n, check=check
    )
    rep = validate(model, n=n_val)
    save_scorer(model, Path(folder), {**meta, "validation": rep, "wall_s": time.perf_counter() - t})


def _scorer_process(*args) -> None:
    """:func:`_scorer_job` in the scorer's own process.

    Ctrl-C is the build's to handle (it ends this process). If the build dies without ending it
    (kill -9), this process ends too, within half a second, rather than writing into the build's
    folder later, when a rerun may have finished and moved it.
    """
    import os
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="world-scorer-watch", daemon=True).start()
    _scorer_job(*args)


def build_world(
    out,
    cfg: BuildConfig | None = None,
    log: Callable = print,
    scorer_steps: int = 2000,
    scorer_minutes: float | None = None,
    parallel: bool = True,
    stop=None,
) -> dict:
    """The base model plus the world's scorer (``world_scorer/``, validated on fresh renders) in ``out``.

    The scorer learns from renders only, so it does not wait for the base model: with ``parallel``
    it trains in a second process (one more core) beside the render, VAE and latent-cache stages,
    same seeds, same result; the text encoder + UNet stage starts once it has finished, so that
    stage can use every core (``cfg.unet_threads``).

    A build that stopped before it finished (a signal, a crash, kill -9, a full disk) continues
    when called again on the same ``out`` with the same settings: from the last checkpoint of the
    VAE or text encoder + UNet stage (:func:`build_base`; seeded, so it ends with the weights an
    uninterrupted build has), and with the scorer if that had finished. ``out/checkpoints/build.json``
    records the settings (:func:`build_fingerprint`); other settings raise ``ValueError`` before
    any work. The checkpoints are removed once the model is written.
    """
    import multiprocessing

    cfg = cfg or BuildConfig()
    cfg.check()
    out = Path(out)
    fingerprint = build_fingerprint(cfg, scorer_steps=scorer_steps, scorer_minutes=scorer_minutes)
    recorded = out / CHECKPOINTS / "build.json"
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            before = None
        if not isinstance(before, dict):
            raise ValueError(
                f"{recorded} (the settings of the unfinished build in {out}) is damaged, so it cannot be "
                "continued; add --force to discard it and build afresh"
            )
        changed = changed_settings(before, fingerprint)
        if changed:
            diff = ", ".join(
                f"{k} {repr(before[k]) if k in before else '(not recorded)'} -> {fingerprint.get(k)!r}" for k in changed
            )
            raise ValueError(
                f"{out} holds an unfinished build made with other settings ({diff}); run it again with its "
                "settings to continue it, or add --force to discard it"
            )
    else:
        write_json(fingerprint, recorded)
    scorer_dir = out / "world_scorer"
    scorer_done = (scorer_dir / "scorer.json").is_file()  # written last, atomically
    small = cfg.images < 2000
    args = (str(scorer_dir), scorer_steps, cfg.seed, scorer_minutes, 500 if small else 12000)
    args += (300 if small else 1200, cfg.threads)
    t = time.perf_counter()
    proc = None
    if scorer_done:
        log(f"scorer: trained before ({scorer_dir})")
    elif parallel:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_scorer_process, args=args, name="world-scorer")
        proc.start()

    halt = functools.partial(_halt_if_stopped, stop, out)  # (the VAE and UNet stages check at their checkpoints)

    def join_scorer() -> None:
        if proc is None:
            return
        waited = time.perf_counter()
        while proc.is_alive():
            proc.join(0.5)
            halt()
        if proc.exitcode != 0:
            raise RuntimeError(
                f"the scorer's training process failed (exit code {proc.exitcode}); see its output above"
            )
        log(f"scorer finished (waited {time.perf_counter() - waited:.0f} s for it)")

    def vae_check(vae) -> dict | None:
        """The gate's ceiling set by ``vae`` (suite.vae_ceiling), logged; None before the scorer exists."""
        if not (scorer_dir / "scorer.json").is_file():
            return None
        from .scoring import load_scorer
        from .suite import GATE_PROMPTS, GATE_SEED, vae_ceiling

        c = vae_ceiling(vae, load_scorer(scorer_dir), GATE_PROMPTS, GATE_SEED)
        low = c["text_fidelity"] < 0.8
        log(
            f"vae: the gate's ceiling (its {c['scenes']} scenes through this VAE, read by the scorer) "
            f"{c['text_fidelity']:.3f}"
            + (": below the gate's 0.8, which a UNet drawing its training latents would then miss too" if low else "")
        )
        return c

    try:
        summary = build_base(out, cfg, log=log, before_unet=join_scorer, stop=stop, check_vae=vae_check)
        if proc is None and not scorer_done:
            _scorer_job(*args, check=halt)
        if "vae_gate_ceiling" not in summary:  # the scorer was trained after the base model
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(str(out), subfolder="vae", torch_dtype=torch.float32)
            summary["vae_gate_ceiling"] = vae_check(vae)
    finally:
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join()
    meta = json.loads((out / "world_scorer" / "scorer.json").read_text(encoding="utf-8"))
    rep = meta["validation"]
    summary["scorer_s"] = meta["wall_s"]
    summary["scorer_parallel"] = parallel
    summary["scorer_validation"] = rep
    summary["total_s"] = time.perf_counter() - t  # wall clock of the whole build, scorer included
    write_json(summary, out / "world_build.json")  # atomically: the model's record is never half written
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the model is written: nothing left to resume
    log(
        f"scorer: text fidelity of captions on fresh renders {rep['text_fidelity_on_renders']:.3f} "
        f"({summary['scorer_s']:.0f} s{', beside the base model' if parallel else ''}); "
        f"total {summary['total_s']:.0f} s"
    )
    return summary


SHIPPED_MARK = "shipped_copy.json"  # in a cache folder copied from the shipped model: which one


def _shipped_id() -> str:
    """An id of the shipped model: the sha256 of its build log (every build writes a new one)."""
    import hashlib

    return hashlib.sha256((SHIPPED / "world_build.json").read_bytes()).hexdigest()


def world_model_path(cache_dir=None) -> Path:
    """The cached world base model, copied from the shipped one on first use.

    Lives at ``<cache>/world-base-v<WORLD_VERSION>`` (cache: :func:`dti_fast.models.cache_root`);
    copied atomically (:func:`dti_fast.models.build_once`), so concurrent callers never see half a model.
    A copy of an earlier shipped model (its ``shipped_copy.json`` names another) is replaced; a
    model that ``dti-fast world build-base`` wrote there (no such file) is the user's and is kept.
    """
    from ..models import build_once

    def copy_shipped(folder: Path) -> None:
        if not (SHIPPED / "model_index.json").is_file():
            raise FileNotFoundError(
                f"no world base model is shipped at {SHIPPED}; build one: dti-fast world build-base"
            )
        shutil.copytree(SHIPPED, folder, dirs_exist_ok=True)
        write_json({"shipped": _shipped_id()}, folder / SHIPPED_MARK)

    def earlier_shipped(folder: Path) -> bool:
        mark = folder / SHIPPED_MARK
        if not mark.is_file() or not (SHIPPED / "world_build.json").is_file():
            return False  # the user's own build, or nothing shipped to compare with
        try:
            return json.loads(mark.read_text(encoding="utf-8")).get("shipped") != _shipped_id()
        except (OSError, ValueError, AttributeError):
            return True

    return build_once(
        f"world-base-v{WORLD_VERSION}", "world_scorer/scorer.safetensors", copy_shipped, cache_dir, earlier_shipped
    )
