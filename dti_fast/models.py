"""Loading diffusers Stable Diffusion (1.x/2.x) and SDXL models for DTI training, and tiny stand-ins.

:func:`load_model_parts` loads the frozen parts a textual-inversion run needs (tokenizers, text
encoders, UNet, VAE, training noise scheduler) from a local diffusers folder or a Hugging Face
model id, and fails early, before anything heavy loads, with a message that names the input and
the fix.

:func:`make_tiny_model` writes a tiny random-weight model in diffusers' real folder layout (with
CLIP's real BPE tokenizer, shipped in ``dti_fast/assets/clip_tokenizer``), so the whole pipeline
runs end to end on a CPU in seconds; :func:`tiny_model_path` builds one once and caches it.

diffusers and transformers are imported lazily, inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "FAMILIES",
    "TINY_VERSION",
    "ModelParts",
    "clip_tokenizer_files",
    "detect_family",
    "load_model_parts",
    "make_tiny_model",
    "required_parts",
    "tiny_model_path",
    "write_model_folder",
]

FAMILIES = ("sd", "sdxl")
TINY_VERSION = 2
"""Bumped whenever the tiny model's architecture changes; part of :func:`tiny_model_path`'s folder name."""

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"

# The Stable Diffusion training noise schedule (SD 1.x, 2.x and SDXL share it).
SD_SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)

# Per-family architecture of the tiny model. Text encoders are real CLIP text transformers
# (pre-norm, causal mask, quick_gelu) with the real 49408-token vocabulary and 77 positions.
_TINY_TEXT = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    num_hidden_layers=3,
    bos_token_id=49406,
    eos_token_id=49407,
)
_TINY_TE1 = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
_TINY_TE2 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=32)
_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),  # 4 blocks: 3 downsamples, 8x like the real SD VAE
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)
TINY_RESOLUTION = 64
"""Pixel size the tiny models are built for (latents are 8x8)."""
TIME_IDS = 6  # SDXL's added time ids: original size (2), crop top-left (2), target size (2)


# --------------------------------------------------------------------------------------------
# Parts and family detection
# --------------------------------------------------------------------------------------------


@dataclass
class ModelParts:
    """The frozen parts of a Stable Diffusion / SDXL model that DTI training uses.

    ``tokenizers`` and ``text_encoders`` are in the same order: ``[CLIP-L]`` for "sd",
    ``[CLIP-L, OpenCLIP-bigG]`` (``text_encoder``, ``text_encoder_2``) for "sdxl".
    """

    family: str
    tokenizers: List["CLIPTokenizer"]
    text_encoders: List["CLIPTextModel"]
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    noise_scheduler: "DDPMScheduler"
    source: str
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_sizes(self) -> List[int]:
        """Token-embedding width of each text encoder (e.g. ``[768]`` or ``[768, 1280]``)."""
        return [int(te.config.hidden_size) for te in self.text_encoders]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for real SD/SDXL and for the tiny models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The UNet's native pixel size (``sample_size * vae_scale_factor``)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor


def required_parts(family: str) -> Tuple[str, ...]:
    """Subfolders a diffusers folder of ``family`` must have for :func:`load_model_parts`."""
    if family == "sd":
        return ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    if family == "sdxl":
        return ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


# Files that must be inside each subfolder (any one of each tuple).
_PART_FILES: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "unet": (("config.json",),),
    "vae": (("config.json",),),
    "text_encoder": (("config.json",),),
    "text_encoder_2": (("config.json",),),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "tokenizer_2": (("tokenizer.json", "vocab.json"),),
    "scheduler": (("scheduler_config.json",),),
}

_UNSUPPORTED_HINT = (
    "dti_fast supports Stable Diffusion 1.x/2.x (StableDiffusionPipeline layout: unet/, vae/, "
    "text_encoder/, tokenizer/, scheduler/) and SDXL (StableDiffusionXLPipeline layout, plus "
    "text_encoder_2/ and tokenizer_2/)"
)


def _family_from_index(index: Dict[str, Any], where: str) -> Optional[str]:
    """Family from a parsed model_index.json, or None if it does not say."""
    cls = str(index.get("_class_name", ""))

    def present(key: str) -> bool:
        v = index.get(key)
        return isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None and v[1] is not None

    if "transformer" in index and "unet" not in index:
        raise ValueError(f"model {where} is a {cls or 'transformer-based'} pipeline, not a UNet one; {_UNSUPPORTED_HINT}")
    if "text_encoder_3" in index or cls.startswith(("StableDiffusion3", "Flux", "Kandinsky", "StableCascade")):
        raise ValueError(f"model {where} is a {cls} pipeline; {_UNSUPPORTED_HINT}")
    if cls.startswith("StableDiffusionXL") or present("text_encoder_2"):
        return "sdxl"
    if cls.startswith("StableDiffusion") or present("text_encoder") or present("unet"):
        return "sd"
    return None


def detect_family(path: Union[str, os.PathLike]) -> str:
    """Return "sd" or "sdxl" for a local diffusers model folder.

    Reads ``model_index.json`` (``_class_name``, or whether ``text_encoder_2`` is listed); without
    one, an SDXL folder is recognised by its ``text_encoder_2/`` subfolder.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder '{path}' does not exist; pass a diffusers model folder")
    index_file = folder / "model_index.json"
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"model '{path}': model_index.json is not valid JSON ({e}); re-save the model "
                             "with save_pretrained or fix the file") from None
        family = _family_from_index(index, f"'{path}'")
        if family is not None:
            return family
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    if (folder / "unet").is_dir() or (folder / "text_encoder").is_dir():
        return "sd"
    if (folder / "config.json").is_file() or (folder / "scheduler_config.json").is_file():
        raise ValueError(
            f"model '{path}' looks like one component folder of a model (it has its own config); "
            f"pass the model folder above it ('{folder.parent}')"
        )
    raise ValueError(
        f"model '{path}' is not a diffusers model folder (no model_index.json, unet/ or text_encoder/); "
        f"{_UNSUPPORTED_HINT}. Single-file checkpoints: convert with "
        "StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)"
    )


def _missing_parts(folder: Path, family: str, index: Optional[Dict[str, Any]] = None) -> List[str]:
    """Subfolders (``"unet/"``) or files (``"unet/config.json"``) that ``folder`` lacks."""
    missing: List[str] = []
    for part in required_parts(family):
        sub = folder / part
        if not sub.is_dir():
            entry = f"{part}/"
            if index is not None and part in index and not (isinstance(index[part], list) and index[part][0]):
                entry += " (null in model_index.json)"
            missing.append(entry)
            continue
        for alternatives in _PART_FILES[part]:
            if not any((sub / name).is_file() for name in alternatives):
                missing.append(f"{part}/{alternatives[0]}")
    return missing


def _read_index(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_local_folder(folder: Path, shown: str) -> str:
    """Family of a local folder after checking it has every part; raises naming what is missing."""
    family = detect_family(folder)
    missing = _missing_parts(folder, family, _read_index(folder))
    if missing:
        raise FileNotFoundError(
            f"model '{shown}' ({family}) is missing {', '.join(missing)}; pass a complete diffusers "
            f"folder (as written by {'StableDiffusionXLPipeline' if family == 'sdxl' else 'StableDiffusionPipeline'}"
            ".save_pretrained) with " + ", ".join(p + "/" for p in required_parts(family))
        )
    return family


# --------------------------------------------------------------------------------------------
# Local path vs hub id, cache and reachability
# --------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _looks_like_path(model: str) -> bool:
    """True when ``model`` can only be a filesystem path, not a hub id ("org/name" or "name")."""
    if model.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", model):
        return True
    if "\\" in model or model.count("/") > 1 or model.lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    return not _REPO_ID.match(model) or "--" in model or ".." in model or len(model) > 96


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline_by_env() -> bool:
    """True when the environment forbids hub access (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    if any(_env_true(n) for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:  # the value huggingface_hub read at import
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE) and "HF_HUB_OFFLINE" not in os.environ
    except Exception:  # pragma: no cover
        return False


_REACHABLE: Dict[str, bool] = {}


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face endpoint answers within ``timeout`` seconds (cached per process).

    Uses huggingface_hub's own HTTP session (so proxies and custom endpoints apply) in a daemon
    thread, so neither DNS nor connection retries can hold the caller past the deadline.
    """
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint in _REACHABLE:
        return _REACHABLE[endpoint]
    result: List[bool] = []

    def probe() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(endpoint, timeout=timeout)  # any HTTP answer means reachable
            result.append(True)
        except Exception:
            result.append(False)

    t = threading.Thread(target=probe, name="dti-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    ok = bool(result and result[0])
    _REACHABLE[endpoint] = ok
    return ok


def _cached_snapshot(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[Path]:
    """The local snapshot folder of ``repo_id`` in the Hugging Face cache, or None (never touches the network)."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir, revision=revision)
        if isinstance(hit, str):
            return Path(hit).parent
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:
        return None


def _offline_message(model: str, why: str) -> str:
    return (
        f"model '{model}' is not a local folder and is not in the Hugging Face cache; {why}: "
        "download it where there is network (e.g. `hf download "
        f"{model}` or DiffusionPipeline.from_pretrained('{model}').save_pretrained(folder)) and pass the folder"
    )


@dataclass
class _Resolved:
    source: str  # what from_pretrained gets: a local folder or a hub id
    shown: str  # what the user passed
    family: str
    local: bool
    hub_kwargs: Dict[str, Any]


def _resolve(model: str, revision: Optional[str], cache_dir: Optional[str]) -> _Resolved:
    """Validate ``model`` and decide where to load it from, touching nothing heavy."""
    model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a diffusers model folder or a Hugging Face model id, got an empty string")
    path = Path(model).expanduser()
    if path.is_dir():
        return _Resolved(str(path), model, _check_local_folder(path, model), True, {})
    if path.is_file():
        if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
            raise ValueError(
                f"model '{model}' is a single-file checkpoint; dti_fast loads diffusers folders. Convert it once with "
                f"StableDiffusionPipeline.from_single_file('{model}').save_pretrained(folder) "
                "(StableDiffusionXLPipeline for SDXL) and pass the folder"
            )
        raise ValueError(f"model '{model}' is a file, not a folder; pass a diffusers model folder or a model id")
    if _looks_like_path(model):
        raise FileNotFoundError(
            f"model path '{model}' does not exist; pass an existing diffusers model folder (with model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a Hugging Face model id such as 'org/name'"
        )

    # A hub id.
    cached = _cached_snapshot(model, revision, cache_dir)
    if _offline_by_env():
        online, why = False, "the hub is disabled here (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1)"
    else:
        online = _hub_reachable()
        why = "this machine cannot reach the hub (or HF_HUB_OFFLINE=1)"
    if not online:
        if cached is None:
            raise FileNotFoundError(_offline_message(model, why))
        try:
            family = _check_local_folder(cached, model)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}. The cached copy of '{model}' at {cached} is incomplete and the hub cannot be reached; "
                "finish the download where there is network"
            ) from None
        return _Resolved(str(cached), model, family, True, {})

    # Online: fetch only model_index.json now (a few hundred bytes) to learn the family and the parts.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        index_file = hf_hub_download(model, "model_index.json", revision=revision, cache_dir=cache_dir)
    except GatedRepoError:
        raise PermissionError(
            f"model '{model}' is gated on the Hugging Face hub; accept its license on the model page and log in "
            "(`hf auth login` or HF_TOKEN), or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"model '{model}' is not a local folder and no Hugging Face model of that id exists (or it is private: "
            "log in with `hf auth login`); check the spelling or pass a local diffusers folder"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"model '{model}' has no revision {revision!r}; pass an existing branch, tag or commit") from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"model '{model}' has no model_index.json, so it is not a diffusers pipeline; {_UNSUPPORTED_HINT}"
        ) from None
    except Exception as e:  # network trouble after the probe: fall back to the cache
        if cached is not None:
            return _Resolved(str(cached), model, _check_local_folder(cached, model), True, {})
        raise FileNotFoundError(_offline_message(model, f"downloading from the hub failed ({type(e).__name__}: {e})")) from None
    index = json.loads(Path(index_file).read_text(encoding="utf-8"))
    family = _family_from_index(index, f"'{model}'") or "sd"
    missing = [f"{p}/" for p in required_parts(family) if not (isinstance(index.get(p), list) and index[p][0])]
    if missing:
        raise FileNotFoundError(
            f"model '{model}' ({family}) has no {', '.join(missing)} in its model_index.json (an SDXL refiner, for "
            f"one, has no text_encoder/); pass a base model. {_UNSUPPORTED_HINT}"
        )
    kwargs: Dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    return _Resolved(model, model, family, False, kwargs)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _transformers_dtype_kwarg(dtype: torch.dtype) -> Dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def load_model_parts(
    model: Union[str, os.PathLike],
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    vae_dtype: Optional[torch.dtype] = None,
    variant: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> ModelParts:
    """Load the frozen parts of an SD 1.x/2.x or SDXL model from a local folder or a hub model id.

    Every part loads with ``from_pretrained(model, subfolder=...)``; the training scheduler is a
    ``DDPMScheduler`` built from ``scheduler/`` (its betas and ``prediction_type`` kept, so SD 2.x
    v-prediction models train as such). All modules are frozen (``requires_grad_(False)``,
    ``eval()``) and moved to ``device``/``dtype``. The VAE stays in float32 when ``dtype`` is
    float16 and its config says ``force_upcast`` (the SDXL VAE overflows in fp16), unless
    ``vae_dtype`` says otherwise (diffusers' default for an unset ``force_upcast`` is True).

    Raises ``FileNotFoundError``/``ValueError``/``PermissionError`` before loading any weights
    when the input is a missing path, an incomplete folder, an unsupported pipeline, or a hub id
    that is neither cached nor reachable (offline: within about 2 s).
    """
    r = _resolve(os.fspath(model), revision, cache_dir)  # validates before the heavy imports

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src, hub = r.source, dict(r.hub_kwargs)
    if r.local:
        hub["local_files_only"] = True
    weights = dict(hub, variant=variant) if variant else dict(hub)
    tdtype = _transformers_dtype_kwarg(dtype)
    if vae_dtype is None:
        vae_config = AutoencoderKL.load_config(src, subfolder="vae", **hub)
        vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype

    tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **hub)]
    text_encoders: List[torch.nn.Module] = [
        CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **tdtype, **weights)
    ]
    if r.family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **hub))
        text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **tdtype, **weights)
        )
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **weights)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **weights)
    noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **hub)
    for module in (*text_encoders, unet, vae):
        _freeze(module).to(device)

    extras: Dict[str, Any] = {}
    index = _read_index(Path(src)) if r.local else None
    if index and index.get("_dti_fast_tiny"):
        extras["tiny"] = index["_dti_fast_tiny"]
    return ModelParts(
        family=r.family,
        tokenizers=tokenizers,
        text_encoders=text_encoders,  # type: ignore[arg-type]
        unet=unet,
        vae=vae,
        noise_scheduler=noise_scheduler,
        source=r.source if r.local else r.shown,
        extras=extras,
    )


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


def clip_tokenizer_files() -> Tuple[Path, Path]:
    """Paths of the shipped CLIP BPE files (``vocab.json``, ``merges.txt``; MIT, OpenAI CLIP)."""
    vocab, merges = CLIP_TOKENIZER_DIR / "vocab.json", CLIP_TOKENIZER_DIR / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(
            f"CLIP tokenizer files are missing from {CLIP_TOKENIZER_DIR}; reinstall dti_fast (they ship as package data)"
        )
    return vocab, merges


def _clip_tokenizer(pad_token: str) -> "CLIPTokenizer":
    from transformers import CLIPTokenizer

    clip_tokenizer_files()  # clear error if the package data is missing
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token=pad_token, model_max_length=77)


def _save_tokenizer(tok: "CLIPTokenizer", folder: Path) -> None:
    """Save like the real SD repos: tokenizer_config, special_tokens_map, vocab.json, merges.txt."""
    tok.save_pretrained(str(folder))
    vocab, merges = clip_tokenizer_files()
    for f in (vocab, merges):  # the slow tokenizer of transformers 4.x reads these two
        if not (folder / f.name).exists():
            shutil.copyfile(f, folder / f.name)
    special = {
        "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": tok.pad_token,
        "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    if not (folder / "special_tokens_map.json").exists():
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _prefix_text_encoder_keys(folder: Path) -> None:
    """Rewrite ``model.safetensors`` with the ``text_model.`` key prefix real SD checkpoints use.

    transformers 5 saves ``CLIPTextModel`` without it; transformers 5 loads either form, while
    transformers 4.x silently leaves unprefixed weights random.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    if not file.is_file():
        return
    with safe_open(str(file), "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata() or {}
    if all(k.startswith(("text_model.", "text_projection.")) for k in keys):
        return
    tensors = load_file(str(file))
    fixed = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in tensors.items()}
    save_file(fixed, str(file), metadata={**metadata, "format": "pt"})


def _tiny_unet(family: str) -> "UNet2DConditionModel":
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    if family == "sd":  # SD 1.x shape: cross-attention blocks, the lowest-resolution block plain
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TINY_TE1["hidden_size"],
            attention_head_dim=4,
        )
    # SDXL shape: no attention at the top resolution, linear projections, more transformer layers
    # deeper, text_time added conditioning from the pooled bigG embedding and the 6 time ids.
    time_dim = 8
    return UNet2DConditionModel(
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TINY_TE1["hidden_size"] + _TINY_TE2["hidden_size"],
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TIME_IDS * time_dim + _TINY_TE2["projection_dim"],
    )


def make_tiny_model(path: Union[str, os.PathLike], family: str = "sd", seed: int = 0) -> Path:
    """Write a tiny random-weight ``family`` ("sd" or "sdxl") model to ``path`` and return the folder.

    The folder has diffusers' real layout, saved with ``save_pretrained`` (safetensors): "sd" as a
    ``StableDiffusionPipeline`` (unet, vae, text_encoder, tokenizer, scheduler; no safety checker),
    "sdxl" as a ``StableDiffusionXLPipeline`` (plus text_encoder_2 with projection, tokenizer_2
    padding with "!"). Tokenizers are CLIP's real BPE; text encoders are real CLIP text
    transformers with hidden sizes 32 and 64 and the full 49408-token vocabulary; images are
    64x64 px, latents 4x8x8. ``model_index.json`` carries ``"_dti_fast_tiny": <version>``.
    Weights depend only on ``seed``; the global RNG state is left untouched.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoders = [CLIPTextModel(CLIPTextConfig(**_TINY_TEXT, **_TINY_TE1, pad_token_id=49407))]
        unet = _tiny_unet(family)
        vae = AutoencoderKL(**_TINY_VAE, scaling_factor=0.18215 if family == "sd" else 0.13025)
        if family == "sdxl":
            text_encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_TINY_TEXT, **_TINY_TE2, pad_token_id=0)))
    return write_model_folder(path, family, unet=unet, vae=vae, text_encoders=text_encoders,
                              index_extra={"_dti_fast_tiny": TINY_VERSION})


def write_model_folder(
    path: Union[str, os.PathLike],
    family: str,
    *,
    unet: "UNet2DConditionModel",
    vae: "AutoencoderKL",
    text_encoders: List[torch.nn.Module],
    index_extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save ``family`` modules as a diffusers model folder :func:`load_model_parts` loads; returns it.

    ``StableDiffusionPipeline`` layout for "sd" (``text_encoders``: ``[CLIPTextModel]``),
    ``StableDiffusionXLPipeline`` for "sdxl" (plus a ``CLIPTextModelWithProjection``), with CLIP's
    real BPE tokenizers (tokenizer_2 padding with "!"), the SD DDPM training schedule and no
    safety checker. ``index_extra`` entries are added to ``model_index.json``.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(path).expanduser()
    scheduler = DDPMScheduler(**SD_SCHEDULER_CONFIG)
    tok1 = _clip_tokenizer(pad_token="<|endoftext|>")
    if family == "sd":
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoders[0], tokenizer=tok1, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tok1,
            tokenizer_2=_clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name).is_dir():
            _save_tokenizer(getattr(pipe, name), out / name)
    for name in ("text_encoder", "text_encoder_2"):
        if (out / name).is_dir():
            _prefix_text_encoder_keys(out / name)
    if index_extra:
        index_file = out / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8"))
        index.update(index_extra)
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _default_cache_root() -> Path:
    """``$DTI_FAST_CACHE``, else ``$XDG_CACHE_HOME/dti_fast``, else ``~/.cache/dti_fast``."""
    if os.environ.get("DTI_FAST_CACHE"):
        return Path(os.environ["DTI_FAST_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dti_fast"


def tiny_model_path(family: str = "sd", cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Folder of the cached tiny ``family`` model, building it on first use.

    Lives at ``<cache_dir>/tiny-<family>-v<TINY_VERSION>`` (default cache_dir: ``$DTI_FAST_CACHE``,
    else ``~/.cache/dti_fast``). Built in a temporary sibling folder and renamed into place, so
    concurrent callers never see a half-written model.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    final = root / f"tiny-{family}-v{TINY_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-{uuid.uuid4().hex[:8]}-", dir=root))
    try:
        make_tiny_model(tmp, family=family, seed=0)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():  # lost a race to a broken folder: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
