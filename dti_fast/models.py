"""Model sources: where a diffusers model comes from, which family it is, and its frozen parts.

- :func:`resolve_source` decides, touching nothing heavy, whether a model is a
  local diffusers folder or a hub id (cached or reachable), and its family;
  :func:`detect_family` reads a folder's ``model_index.json``.
- :func:`load_model_parts` loads the frozen parts a textual-inversion run needs
  (tokenizers, text encoders, the UNet or SANA/Wan transformer, VAE, training noise
  scheduler) with ``from_pretrained``, failing early with a message that names the input
  and the fix; :func:`preview_model` reads the family, tokenizers and VAE config only.
- Families: "sd" (SD 1.x/2.x), "sdxl", "sana" (SanaPipeline: Gemma-2, DC-AE) and "wan"
  (WanPipeline, Wan 2.1: UMT5, 3-D causal VAE); what each trains with is
  :mod:`dti_fast.families`.
- :func:`resolve_device` / :func:`resolve_dtype`: what "auto" means everywhere
  (cuda when available; bf16 on a GPU, fp32 on a CPU).
- :func:`pipeline_from_parts`: a diffusers text-to-image pipeline around loaded parts.
- :func:`cache_root`: the folder dti_fast caches what it builds in.

The tiny random-weight stand-ins for tests and the demo live in :mod:`dti_fast.testing`.
diffusers and transformers are imported lazily, inside the functions.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "FAMILIES",
    "FLOW_FAMILIES",
    "SD_SCHEDULER_CONFIG",
    "build_once",
    "check_model_files",
    "explain_load_error",
    "model_load_errors",
    "probe_tokenizer",
    "prefix_text_encoder_keys",
    "ModelParts",
    "ResolvedModel",
    "cache_root",
    "detect_family",
    "hub_reachable",
    "load_model_parts",
    "ModelPreview",
    "preview_model",
    "looks_like_path",
    "offline_by_env",
    "pipeline_from_parts",
    "required_parts",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
]

FAMILIES = ("sd", "sdxl", "sana", "wan")
#: Families whose denoiser is a transformer trained with rectified flow.
FLOW_FAMILIES = ("sana", "wan")

# The Stable Diffusion training noise schedule (SD 1.x, 2.x and SDXL share it).
SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)


# --------------------------------------------------------------------------------------------
# Parts and family detection
# --------------------------------------------------------------------------------------------


@dataclass
class ModelParts:
    """The frozen parts of a model that DTI training uses.

    ``tokenizers`` and ``text_encoders`` are in the same order: ``[CLIP-L]`` for "sd",
    ``[CLIP-L, OpenCLIP-bigG]`` (``text_encoder``, ``text_encoder_2``) for "sdxl",
    ``[Gemma-2]`` for "sana", ``[UMT5 encoder]`` for "wan". ``unet`` is the denoiser: the
    UNet of "sd"/"sdxl", the transformer of "sana"/"wan" (also reachable as ``denoiser``).
    ``noise_scheduler`` is the training schedule (DDPM; flow matching with shift 1 for the
    transformer families); ``extras["scheduler"]`` holds a flow family's sampling scheduler.
    """

    family: str
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[CLIPTextModel]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    source: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet ("sd", "sdxl") or transformer ("sana", "wan")."""
        return self.unet

    @property
    def hidden_sizes(self) -> list[int]:
        """Token-embedding width of each text encoder (e.g. ``[768]`` or ``[768, 1280]``)."""
        return [int(te.get_input_embeddings().weight.shape[1]) for te in self.text_encoders]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for real SD/SDXL/Wan, 32 for SANA's DC-AE)."""
        from .families import family_of

        return family_of(self.family).vae_factor(self.vae)

    @property
    def resolution(self) -> int:
        """The denoiser's native pixel size (``sample_size * vae_scale_factor``; Wan: 480, the tiny model's 64)."""
        if self.family == "wan":
            return int(self.extras.get("resolution", 480))
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor


def required_parts(family: str) -> tuple[str, ...]:
    """Subfolders a diffusers folder of ``family`` must have for :func:`load_model_parts`."""
    if family == "sd":
        return ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    if family == "sdxl":
        return ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    if family in FLOW_FAMILIES:
        return ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


# Files that must be inside each subfolder (any one of each tuple).
_PART_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "unet": (("config.json",),),
    "transformer": (("config.json",),),
    "vae": (("config.json",),),
    "text_encoder": (("config.json",),),
    "text_encoder_2": (("config.json",),),
    "tokenizer": (("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model"),),
    "tokenizer_2": (("tokenizer.json", "vocab.json"),),
    "scheduler": (("scheduler_config.json",),),
}

_UNSUPPORTED_HINT = (
    "dti_fast supports Stable Diffusion 1.x/2.x (StableDiffusionPipeline layout: unet/, vae/, "
    "text_encoder/, tokenizer/, scheduler/), SDXL (StableDiffusionXLPipeline layout, plus "
    "text_encoder_2/ and tokenizer_2/), SANA (SanaPipeline: transformer/, vae/, text_encoder/, "
    "tokenizer/, scheduler/) and Wan 2.1 text-to-video (WanPipeline, the same parts)"
)
_FLOW_CLASSES = {"SanaPipeline": "sana", "WanPipeline": "wan"}


def _family_from_index(index: Any, where: str) -> str | None:
    """Family from a parsed model_index.json, or None if it does not say.

    A model_index.json that is not a JSON object, or whose ``_class_name`` is not a string,
    is refused (ValueError naming the model and the fix).
    """
    if not isinstance(index, dict):
        raise ValueError(
            f"model {where}: model_index.json holds a {_json_kind(index)}, not the JSON object diffusers writes; "
            "the folder is damaged: re-save the model (DiffusionPipeline.save_pretrained) or restore the file"
        )
    if not isinstance(index.get("_class_name", ""), str):
        raise ValueError(
            f'model {where}: model_index.json: "_class_name" must be a string (the pipeline class), got '
            f"{index['_class_name']!r}; re-save the model or restore the file"
        )
    cls = str(index.get("_class_name", ""))

    def present(key: str) -> bool:
        v = index.get(key)
        return isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None and v[1] is not None

    if cls in _FLOW_CLASSES:
        if present("transformer_2"):
            raise ValueError(
                f"model {where} is a two-expert {cls} (Wan 2.2 layout, transformer_2/); {_UNSUPPORTED_HINT}"
            )
        return _FLOW_CLASSES[cls]
    if "transformer" in index and "unet" not in index:
        raise ValueError(
            f"model {where} is a {cls or 'transformer-based'} pipeline, not a UNet one; {_UNSUPPORTED_HINT}"
        )
    if "text_encoder_3" in index or cls.startswith(("StableDiffusion3", "Flux", "Kandinsky", "StableCascade")):
        raise ValueError(f"model {where} is a {cls} pipeline; {_UNSUPPORTED_HINT}")
    if cls.startswith("StableDiffusionXL") or present("text_encoder_2"):
        return "sdxl"
    if cls.startswith("StableDiffusion") or present("text_encoder") or present("unet"):
        return "sd"
    return None


def detect_family(path: str | os.PathLike) -> str:
    """Return "sd", "sdxl", "sana" or "wan" for a local diffusers model folder.

    Reads ``model_index.json`` (``_class_name``: ``SanaPipeline``, ``WanPipeline``,
    ``StableDiffusion*``; or whether ``text_encoder_2`` is listed); without one, an SDXL
    folder is recognised by its ``text_encoder_2/`` subfolder (transformer pipelines need
    their ``model_index.json``).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder '{path}' does not exist; pass a diffusers model folder")
    index_file = folder / "model_index.json"
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"model '{path}': model_index.json is not valid JSON ({e}); re-save the model "
                "with save_pretrained or fix the file"
            ) from None
        family = _family_from_index(index, f"'{path}'")
        if family is not None:
            return family
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    if (folder / "unet").is_dir() or (folder / "text_encoder").is_dir():
        return "sd"
    if (folder / "transformer").is_dir():
        raise ValueError(
            f"model '{path}' has a transformer/ but no model_index.json saying which pipeline it is; re-save it with "
            "SanaPipeline/WanPipeline.save_pretrained (or restore its model_index.json)"
        )
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


def _missing_parts(folder: Path, family: str, index: dict[str, Any] | None = None) -> list[str]:
    """Subfolders (``"unet/"``) or files (``"unet/config.json"``) that ``folder`` lacks."""
    missing: list[str] = []
    for part in required_parts(family):
        sub = folder / part
        if not sub.is_dir():
            entry = f"{part}/"
            if (
                index is not None
                and part in index
                and not (isinstance(index[part], list) and index[part][:1] not in ([], [None]))
            ):
                entry += " (null in model_index.json)"
            missing.append(entry)
            continue
        for alternatives in _PART_FILES[part]:
            if not any((sub / name).is_file() for name in alternatives):
                missing.append(f"{part}/{alternatives[0]}")
    return missing


_PIPELINE_CLASS = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sana": "SanaPipeline",
    "wan": "WanPipeline",
}


def _read_index(folder: Path) -> dict[str, Any] | None:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def _check_local_folder(folder: Path, shown: str) -> str:
    """Family of a local folder after checking it has every part and that its files are intact.

    Raises naming what is missing, or (:func:`check_model_files`) the damaged file and the fix.
    """
    family = detect_family(folder)
    missing = _missing_parts(folder, family, _read_index(folder))
    if missing:
        raise FileNotFoundError(
            f"model '{shown}' ({family}) is missing {', '.join(missing)}; pass a complete diffusers "
            f"folder (as written by {_PIPELINE_CLASS[family]}.save_pretrained) with "
            + ", ".join(p + "/" for p in required_parts(family))
        )
    check_model_files(folder, family, shown)
    return family


# --------------------------------------------------------------------------------------------
# Damaged files: checked before loading, and what loading raises turned into one line
# --------------------------------------------------------------------------------------------

_INT = "an integer"
_INTS = "an integer or a list of integers"
_STR = "a string"
_BOOL = "true or false"

#: Keys whose type dti_fast, diffusers or transformers rely on, per JSON file of a model folder:
#: ``{file: {key: kind}}``; a key that is absent is fine (the library's default applies).
_MODEL_JSON_KEYS: dict[str, dict[str, str]] = {
    "model_index.json": {"_class_name": _STR, "_dti_fast_resolution": _INT},
    "unet/config.json": {"cross_attention_dim": _INTS, "sample_size": _INTS, "in_channels": _INT},
    "transformer/config.json": {"caption_channels": _INT, "text_dim": _INT, "sample_size": _INTS},
    "vae/config.json": {"force_upcast": _BOOL, "latent_channels": _INT, "block_out_channels": _INTS},
    "text_encoder/config.json": {"hidden_size": _INT, "d_model": _INT, "vocab_size": _INT},
    "text_encoder_2/config.json": {"hidden_size": _INT, "vocab_size": _INT, "projection_dim": _INT},
    "scheduler/scheduler_config.json": {"_class_name": _STR, "num_train_timesteps": _INT},
    "tokenizer/tokenizer_config.json": {"model_max_length": _INT},
    "tokenizer_2/tokenizer_config.json": {"model_max_length": _INT},
}
#: JSON files of a tokenizer folder (vocab.json only matters without a tokenizer.json: the fast file wins).
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

_CHECKED_FILES: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) of files found intact


def _json_kind(value: Any) -> str:
    return {dict: "JSON object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _is_kind(value: Any, kind: str) -> bool:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == _INT:
        return integer(value)
    if kind == _INTS:
        return integer(value) or (isinstance(value, list) and all(integer(v) for v in value))
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    return True


def _damaged(shown: str, rel: str, what: str) -> ValueError:
    return ValueError(
        f"model '{shown}': {rel} {what}; the model folder is damaged: re-save the model (save_pretrained) "
        "or restore the file from the model's source"
    )


def _unchanged(file: Path) -> bool:
    try:
        st = file.stat()
    except OSError:
        return False
    return _CHECKED_FILES.get(str(file)) == (st.st_size, st.st_mtime_ns)


def _mark_checked(file: Path) -> None:
    try:
        st = file.stat()
    except OSError:
        return
    _CHECKED_FILES[str(file)] = (st.st_size, st.st_mtime_ns)


def check_model_files(folder: str | os.PathLike, family: str, shown: str | None = None) -> None:
    """Refuse a local model folder whose JSON or safetensors files are damaged, reading no weights.

    Every JSON file dti_fast, diffusers or transformers read from the parts (``model_index.json``,
    each part's ``config.json``/``scheduler_config.json``, the tokenizers' ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``, and
    ``vocab.json`` where there is no ``tokenizer.json``) must parse as a JSON object, and the keys
    of :data:`_MODEL_JSON_KEYS` must have their type (``"model_max_length": "abc"`` would only
    fail at the first tokenization, deep in transformers). Each ``.safetensors`` file's header must
    be readable and match the file's size (a truncated download). Raises ValueError naming the
    model, the file and the key, and saying to re-save the model. Files found intact are
    remembered (by size and mtime), so a second call costs a few ``stat`` calls.
    """
    folder = Path(folder)
    shown = shown if shown is not None else str(folder)
    files: list[Path] = [folder / "model_index.json"]
    for part in required_parts(family):
        sub = folder / part
        if part.startswith("tokenizer"):
            files += [sub / name for name in _TOKENIZER_JSON]
            if not (sub / "tokenizer.json").is_file():
                files.append(sub / "vocab.json")
        else:
            files.append(sub / ("scheduler_config.json" if part == "scheduler" else "config.json"))
    for file in files:
        if not file.is_file() or _unchanged(file):
            continue
        rel = file.relative_to(folder).as_posix()
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise _damaged(shown, rel, f"is not valid JSON ({first_line_of(err)[:120]})") from None
        if not isinstance(data, dict):
            raise _damaged(shown, rel, f"holds a {_json_kind(data)}, not a JSON object")
        for key, kind in _MODEL_JSON_KEYS.get(rel, {}).items():
            if key in data and data[key] is not None and not _is_kind(data[key], kind):
                raise _damaged(shown, rel, f'has "{key}": {json.dumps(data[key])[:60]}, which must be {kind}')
        if rel.endswith("tokenizer_config.json") and isinstance(data.get("model_max_length"), int):
            if data["model_max_length"] <= 0:
                raise _damaged(shown, rel, f'has "model_max_length": {data["model_max_length"]}, not a positive number')
        _mark_checked(file)
    for part in required_parts(family):
        check_safetensors_files(folder / part, folder, shown)


def check_safetensors_files(where: Path, folder: Path, shown: str) -> None:
    """Refuse a damaged ``*.safetensors`` file directly in ``where`` (a part of model ``folder``), reading
    only headers: safetensors checks that the header parses and that its offsets end at the file's end,
    so a truncated or overwritten file fails here rather than when its weights load. Raises ValueError
    naming the model and the file; intact files are remembered like :func:`check_model_files`'s."""
    from safetensors import safe_open

    for file in sorted(where.glob("*.safetensors")):
        if _unchanged(file):
            continue
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for damaged files
            why = f"is not a readable safetensors file ({first_line_of(err)[:120]})"
            raise _damaged(shown, file.relative_to(folder).as_posix(), why) from None
        _mark_checked(file)


def first_line_of(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def probe_tokenizer(tokenizer: Any, shown: str, part: str = "tokenizer") -> None:
    """Tokenize one short prompt as training and generation do (padded to the window, truncated).

    A tokenizer whose files load but do not work (a ``model_max_length`` that is no number, a broken
    vocabulary) would otherwise fail at the first prompt, after the expensive loading, deep in
    transformers. Raises ValueError naming the model folder, the tokenizer's part and the fix.
    """
    length = getattr(tokenizer, "model_max_length", None)
    try:
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise TypeError(f"model_max_length is {length!r}, not a positive integer")
        ids = tokenizer("a photo of a dog", padding="max_length", max_length=min(length, 512), truncation=True)
        if not ids["input_ids"]:
            raise ValueError("it gives no token ids")
    except Exception as err:
        raise ValueError(
            f"model '{shown}': its {part}/ does not tokenize a prompt ({type(err).__name__}: "
            f"{first_line_of(err)[:120]}); the folder is damaged: re-save the model or restore {part}/ from its source"
        ) from None


_SHAPE = r"(?:torch\.Size\()?(\[[^\]]*\])"
_MISMATCH = re.compile(r"(\S+) expected shape " + _SHAPE + r"\)?, but got " + _SHAPE)


def _part_holding(folder: Path, key: str, parts: Sequence[str]) -> str | None:
    """The part (subfolder) whose safetensors files hold the tensor ``key``, reading headers only."""
    from safetensors import safe_open

    for part in parts:
        for file in sorted((folder / part).glob("*.safetensors")):
            try:
                with safe_open(str(file), "pt") as handle:
                    if key in handle.keys():
                        return part
            except Exception:
                continue
    return None


def explain_load_error(err: BaseException, r: ResolvedModel, part: str | None = None) -> ValueError | None:
    """One line for an error diffusers/transformers raised while loading ``r`` (or its ``part``), or None.

    Recognised: a config that does not match its weights (diffusers' advice about
    ``low_cpu_mem_usage=False and ignore_mismatched_sizes=True`` cannot be followed from the command
    line), a damaged JSON file (``Expecting value: line 1 column 1``, no file named), a damaged
    safetensors file. The message names the model folder and the part and says it is damaged or
    mismatched. Refused pickles and missing files are left to the caller (None).
    """
    if _refused_pickle(err) is not None:
        return None  # the caller's message: no code from it ran
    text = str(err)
    parts = [part] if part else list(required_parts(r.family))
    m = _MISMATCH.search(text)
    if m or "ignore_mismatched_sizes" in text or "size mismatch" in text:
        where = part
        if where is None and m and r.local:
            where = _part_holding(Path(r.source), m.group(1), parts)
        detail = f"{m.group(1)} is {m.group(3)} in the weights, {m.group(2)} by the config" if m else first_line_of(err)
        folder = f"{where}/" if where else "one of its parts"
        return ValueError(
            f"model '{r.shown}': the config of {folder} does not match its weights ({detail[:160]}); the folder is "
            f"damaged or mixes parts of different models: restore {folder} from the model's source (config and "
            "weights of one model)"
        )
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (json.JSONDecodeError, UnicodeDecodeError)):
            return ValueError(
                f"model '{r.shown}': a JSON file of {f'{part}/' if part else 'the folder'} is damaged "
                f"({first_line_of(seen)[:120]}); re-save the model or restore {f'{part}/' if part else 'the folder'} "
                "from its source"
            )
        if type(seen).__name__ == "SafetensorError" or "deserializing header" in str(seen):
            return ValueError(
                f"model '{r.shown}': a weights file of {f'{part}/' if part else 'the folder'} is damaged "
                f"({first_line_of(seen)[:120]}); re-download or restore it from the model's source"
            )
        seen = seen.__cause__ or seen.__context__
    return None


class model_load_errors:  # noqa: N801 (used as a context manager, like contextlib's)
    """``with model_load_errors(r, part):`` around ``from_pretrained``: what :func:`explain_load_error`
    recognises is raised as its one-line ValueError instead (other errors pass through)."""

    def __init__(self, r: ResolvedModel, part: str | None = None) -> None:
        self.r, self.part = r, part

    def __enter__(self) -> model_load_errors:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not isinstance(err, Exception):
            return False
        better = explain_load_error(err, self.r, self.part)
        if better is None:
            return False
        raise better from None


# --------------------------------------------------------------------------------------------
# Local path vs hub id, cache and reachability
# --------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def looks_like_path(model: str) -> bool:
    """True when ``model`` can only be a filesystem path, not a hub id ("org/name" or "name")."""
    if model.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", model):
        return True
    if "\\" in model or model.count("/") > 1 or model.lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    return not _REPO_ID.match(model) or "--" in model or ".." in model or len(model) > 96


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_by_env() -> bool:
    """True when the environment forbids hub access (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    if any(_env_true(n) for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:  # the value huggingface_hub read at import
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE) and "HF_HUB_OFFLINE" not in os.environ
    except Exception:  # pragma: no cover
        return False


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face endpoint answers within ``timeout`` seconds (cached per process).

    Uses huggingface_hub's own HTTP session (so proxies and custom endpoints apply) in a daemon
    thread, so neither DNS nor connection retries can hold the caller past the deadline.
    """
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint in _REACHABLE:
        return _REACHABLE[endpoint]
    result: list[bool] = []

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


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
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
class ResolvedModel:
    source: str  # what from_pretrained gets: a local folder or a hub id
    shown: str  # what the user passed
    family: str
    local: bool
    hub_kwargs: dict[str, Any]


def resolve_source(model: str, revision: str | None, cache_dir: str | None) -> ResolvedModel:
    """Validate ``model`` and decide where to load it from, touching nothing heavy."""
    model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a diffusers model folder or a Hugging Face model id, got an empty string")
    path = Path(model).expanduser()
    if path.is_dir():
        return ResolvedModel(str(path), model, _check_local_folder(path, model), True, {})
    if path.is_file():
        if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
            raise ValueError(
                f"model '{model}' is a single-file checkpoint; dti_fast loads diffusers folders. Convert it once with "
                f"StableDiffusionPipeline.from_single_file('{model}').save_pretrained(folder) "
                "(StableDiffusionXLPipeline for SDXL) and pass the folder"
            )
        raise ValueError(f"model '{model}' is a file, not a folder; pass a diffusers model folder or a model id")
    if looks_like_path(model):
        raise FileNotFoundError(
            f"model path '{model}' does not exist; pass an existing diffusers model folder (with model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a Hugging Face model id such as 'org/name'"
        )

    # A hub id.
    cached = _cached_snapshot(model, revision, cache_dir)
    if offline_by_env():
        online, why = False, "the hub is disabled here (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1)"
    else:
        online = hub_reachable()
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
        return ResolvedModel(str(cached), model, family, True, {})

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
        raise FileNotFoundError(
            f"model '{model}' has no revision {revision!r}; pass an existing branch, tag or commit"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"model '{model}' has no model_index.json, so it is not a diffusers pipeline; {_UNSUPPORTED_HINT}"
        ) from None
    except Exception as e:  # network trouble after the probe: fall back to the cache
        if cached is not None:
            return ResolvedModel(str(cached), model, _check_local_folder(cached, model), True, {})
        raise FileNotFoundError(
            _offline_message(model, f"downloading from the hub failed ({type(e).__name__}: {e})")
        ) from None
    index = json.loads(Path(index_file).read_text(encoding="utf-8"))
    family = _family_from_index(index, f"'{model}'") or "sd"
    missing = [
        f"{p}/"
        for p in required_parts(family)
        if not (isinstance(index.get(p), list) and index[p][:1] not in ([], [None]))
    ]
    if missing:
        raise FileNotFoundError(
            f"model '{model}' ({family}) has no {', '.join(missing)} in its model_index.json (an SDXL refiner, for "
            f"one, has no text_encoder/); pass a base model. {_UNSUPPORTED_HINT}"
        )
    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    return ResolvedModel(model, model, family, False, kwargs)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def _refused_pickle(err: BaseException) -> BaseException | None:
    """The UnpicklingError behind ``err`` (diffusers wraps it in an OSError), or None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tokenizer_folders(family: str) -> tuple[str, ...]:
    """The subfolders of a model's tokenizers, in :class:`ModelParts` order (SANA/Wan: their one tokenizer)."""
    return ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)


def _check_parts_fit(src: str, r: ResolvedModel, hub: dict[str, Any]) -> None:
    """Refuse, from the configs alone, a folder whose text encoders and UNet come from different models."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = UNet2DConditionModel.load_config(src, subfolder="unet", **hub)
    subs = ("text_encoder", "text_encoder_2") if r.family == "sdxl" else ("text_encoder",)
    widths = [int(CLIPTextConfig.from_pretrained(src, subfolder=sub, **hub).hidden_size) for sub in subs]
    cross = unet.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if cross is not None and sum(widths) != int(cross):
        given = " + ".join(str(w) for w in widths)
        raise ValueError(
            f"model '{r.shown}' does not fit together: its text encoder(s) give {given} = {sum(widths)} features "
            f"per token but its UNet's cross-attention takes {cross}; the folder mixes parts of different models: "
            "use the text encoders and UNet of one model"
        )


def load_model_parts(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    tokenizers: Sequence[Any] | None = None,
) -> ModelParts:
    """Load the frozen parts of an SD 1.x/2.x, SDXL, SANA or Wan 2.1 model from a local folder or a hub id.

    ``tokenizers``: this model's tokenizers, already loaded (:attr:`ModelPreview.tokenizers` of
    :func:`preview_model`, in :class:`ModelParts` order); used instead of loading them again.

    SANA and Wan: see :func:`_load_flow_parts`. SD/SDXL:

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
    r = resolve_source(os.fspath(model), revision, cache_dir)  # validates before the heavy imports
    if tokenizers is not None and len(tokenizers) != len(_tokenizer_folders(r.family)):
        raise ValueError(
            f"model '{r.shown}' ({r.family}) has {len(_tokenizer_folders(r.family))} tokenizer(s), "
            f"not {len(tokenizers)}"
        )
    if r.family in FLOW_FAMILIES:
        return _load_flow_parts(
            r, dtype=dtype, device=device, vae_dtype=vae_dtype, variant=variant, tokenizers=tokenizers
        )

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

    _check_parts_fit(src, r, hub)
    try:
        if tokenizers is None:
            tokenizers = [_load_tokenizer(CLIPTokenizer, r, sub, hub) for sub in _tokenizer_folders(r.family)]
        with model_load_errors(r, "text_encoder"):
            text_encoders: list[torch.nn.Module] = [
                CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **tdtype, **weights)
            ]
        if r.family == "sdxl":
            with model_load_errors(r, "text_encoder_2"):
                text_encoders.append(
                    CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **tdtype, **weights)
                )
        with model_load_errors(r, "unet"):
            unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **weights)
        with model_load_errors(r, "vae"):
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **weights)
        with model_load_errors(r, "scheduler"):
            noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **hub)
    except (pickle.UnpicklingError, OSError) as err:
        refused = _refused_pickle(err)
        if refused is None:
            raise
        raise ValueError(
            f"model '{r.shown}' has weights stored as a pickle that torch refuses to load safely "
            f"({str(refused).splitlines()[0][:120]}); no code from it ran. Use a model saved as safetensors "
            "(e.g. DiffusionPipeline.from_pretrained(...).save_pretrained(folder) where the file is trusted)"
        ) from None
    for module in (*text_encoders, unet, vae):
        _freeze(module).to(device)

    extras: dict[str, Any] = {}
    index = _read_index(Path(src)) if r.local else None
    if index and index.get("_dti_fast_tiny"):
        extras["tiny"] = index["_dti_fast_tiny"]
    return ModelParts(
        family=r.family,
        tokenizers=list(tokenizers),
        text_encoders=text_encoders,  # type: ignore[arg-type]
        unet=unet,
        vae=vae,
        noise_scheduler=noise_scheduler,
        source=r.source if r.local else r.shown,
        extras=extras,
    )


def _load_tokenizer(cls: Any, r: ResolvedModel, sub: str, hub: dict[str, Any]):
    """``cls.from_pretrained`` of the tokenizer in ``sub``, probed (:func:`probe_tokenizer`); a tokenizer that
    does not load or does not work is a ValueError naming the model folder, the part and the fix."""
    try:
        tokenizer = cls.from_pretrained(r.source, subfolder=sub, **hub)
    except OSError:
        raise  # a missing file or the hub: its own message names it
    except Exception as err:
        raise ValueError(
            f"model '{r.shown}': its {sub}/ folder does not load ({type(err).__name__}: "
            f"{first_line_of(err)[:160]}); the folder is damaged: restore {sub}/ from the model's "
            "repository (tokenizer.json and tokenizer_config.json) or re-save the model"
        ) from None
    probe_tokenizer(tokenizer, r.shown, sub)
    return tokenizer


def _flow_tokenizer(r: ResolvedModel, hub: dict[str, Any]):
    """The tokenizer of a SANA/Wan folder (``AutoTokenizer``), or a ValueError naming the folder and the fix."""
    from transformers import AutoTokenizer

    return _load_tokenizer(AutoTokenizer, r, "tokenizer", hub)


@dataclass
class ModelPreview:
    """What a job can check before loading weights: the family, the tokenizers, the VAE's config."""

    family: str
    tokenizers: list[Any]
    vae_config: dict[str, Any]


def preview_model(model: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> ModelPreview:
    """The family, tokenizers (in :class:`ModelParts` order) and VAE config of ``model``, loading no weights.

    Lets a job check its placeholders, initializers and resolution against the model
    before the expensive loading starts.
    """
    from diffusers import AutoencoderKL

    r = resolve_source(os.fspath(model), revision, cache_dir)
    hub = dict(r.hub_kwargs)
    if r.local:
        hub["local_files_only"] = True
    vae_config = dict(AutoencoderKL.load_config(r.source, subfolder="vae", **hub))
    if r.family in FLOW_FAMILIES:
        return ModelPreview(r.family, [_flow_tokenizer(r, hub)], vae_config)
    from transformers import CLIPTokenizer

    tokenizers = [_load_tokenizer(CLIPTokenizer, r, sub, hub) for sub in _tokenizer_folders(r.family)]
    return ModelPreview(r.family, tokenizers, vae_config)


def _flow_width_check(r: ResolvedModel, src: str, hub: dict[str, Any]) -> None:
    """Refuse, from the configs alone, a SANA/Wan folder whose text encoder and transformer do not fit."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(src, subfolder="text_encoder", **hub)
    width = int(getattr(text, "hidden_size", None) or getattr(text, "d_model"))
    config = json.loads(Path(src, "transformer", "config.json").read_text(encoding="utf-8")) if r.local else None
    if config is None:
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(src, "transformer/config.json", **hub)).read_text(encoding="utf-8"))
    takes = config.get("caption_channels") if r.family == "sana" else config.get("text_dim")
    if takes is not None and int(takes) != width:
        raise ValueError(
            f"model '{r.shown}' does not fit together: its text encoder gives {width} features per token but its "
            f"transformer takes {takes}; the folder mixes parts of different models: use the parts of one model"
        )


def _load_flow_parts(
    r: ResolvedModel,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    vae_dtype: torch.dtype | None,
    variant: str | None,
    tokenizers: Sequence[Any] | None = None,
) -> ModelParts:
    """SANA (Gemma-2, DC-AE, SanaTransformer2DModel) or Wan 2.1 (UMT5, AutoencoderKLWan, WanTransformer3DModel).

    The tokenizer loads with ``AutoTokenizer``; the training schedule is
    ``FlowMatchEulerDiscreteScheduler`` with the folder's ``num_train_timesteps`` and shift 1
    (see :mod:`dti_fast.families`); the folder's own scheduler (sampling) goes to
    ``extras["scheduler"]``. Wan's VAE stays fp32 unless ``vae_dtype`` says otherwise (its
    pipeline decodes in fp32 too).
    """
    import diffusers

    src, hub = r.source, dict(r.hub_kwargs)
    if r.local:
        hub["local_files_only"] = True
    weights = dict(hub, variant=variant) if variant else dict(hub)
    tdtype = _transformers_dtype_kwarg(dtype)
    _flow_width_check(r, src, hub)
    if r.family == "sana":
        from diffusers import AutoencoderDC as VAE
        from diffusers import SanaTransformer2DModel as Denoiser
        from transformers import Gemma2Model as TextModel
    else:
        from diffusers import AutoencoderKLWan as VAE
        from diffusers import WanTransformer3DModel as Denoiser
        from transformers import UMT5EncoderModel as TextModel
    if vae_dtype is None:
        vae_dtype = torch.float32 if r.family == "wan" else dtype
    tokenizer = tokenizers[0] if tokenizers is not None else _flow_tokenizer(r, hub)
    try:
        with model_load_errors(r, "text_encoder"):
            text_encoder = TextModel.from_pretrained(src, subfolder="text_encoder", **tdtype, **weights)
        with model_load_errors(r, "transformer"):
            denoiser = Denoiser.from_pretrained(src, subfolder="transformer", torch_dtype=dtype, **weights)
        with model_load_errors(r, "vae"):
            vae = VAE.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **weights)
    except (pickle.UnpicklingError, OSError) as err:
        refused = _refused_pickle(err)
        if refused is None:
            raise
        raise ValueError(
            f"model '{r.shown}' has weights stored as a pickle that torch refuses to load safely "
            f"({str(refused).splitlines()[0][:120]}); no code from it ran. Use a model saved as safetensors"
        ) from None
    sched_config = diffusers.FlowMatchEulerDiscreteScheduler.load_config(src, subfolder="scheduler", **hub)
    sched_cls = (
        getattr(diffusers, str(sched_config.get("_class_name", "")), None) or diffusers.FlowMatchEulerDiscreteScheduler
    )
    sampler = sched_cls.from_config(sched_config)
    noise_scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=int(sched_config.get("num_train_timesteps", 1000)), shift=1.0
    )
    for module in (text_encoder, denoiser, vae):
        _freeze(module).to(device)
    extras: dict[str, Any] = {"scheduler": sampler}
    index = _read_index(Path(src)) if r.local else None
    if index and index.get("_dti_fast_tiny"):
        extras["tiny"] = index["_dti_fast_tiny"]
        extras["resolution"] = int(index.get("_dti_fast_resolution", 64))
    return ModelParts(
        family=r.family,
        tokenizers=[tokenizer],
        text_encoders=[text_encoder],
        unet=denoiser,
        vae=vae,
        noise_scheduler=noise_scheduler,
        source=r.source if r.local else r.shown,
        extras=extras,
    )


# --------------------------------------------------------------------------------------------
# Devices, pipelines, caches
# --------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: the CUDA device (``local_rank``'s under a launcher) when CUDA is available, else the CPU.

    An explicit device that this machine does not have (``cuda`` without CUDA,
    a misspelt name) raises ValueError naming it and the fix.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: this machine has no CUDA GPU that torch can use; use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type not in ("cpu", "meta") and not getattr(torch, dev.type, None):
        raise ValueError(f"device {device!r} is not available here; use auto, cpu or cuda")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 on a CPU; else fp32, bf16 or fp16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def pipeline_from_parts(parts: ModelParts, scheduler: Any = None):
    """A diffusers pipeline around already loaded ``parts`` (no copies, no safety checker).

    SD/SDXL: ``StableDiffusion(XL)Pipeline``; SANA: ``SanaPipeline``; Wan: ``WanPipeline``.
    ``scheduler``: the sampling scheduler (default: DDIM from the training scheduler's config
    for SD/SDXL, the model folder's own scheduler for SANA/Wan).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if parts.family in FLOW_FAMILIES:
        import diffusers

        cls = getattr(diffusers, "SanaPipeline" if parts.family == "sana" else "WanPipeline")
        pipe = cls(
            tokenizer=parts.tokenizers[0],
            text_encoder=parts.text_encoders[0],
            vae=parts.vae,
            transformer=parts.unet,
            scheduler=scheduler if scheduler is not None else parts.extras["scheduler"],
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if scheduler is None:
        scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config)
    if parts.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1],
            unet=parts.unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            unet=parts.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cache_root() -> Path:
    """``$DTI_FAST_CACHE``, else ``$XDG_CACHE_HOME/dti_fast``, else ``~/.cache/dti_fast``."""
    if os.environ.get("DTI_FAST_CACHE"):
        return Path(os.environ["DTI_FAST_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dti_fast"


def build_once(
    name: str,
    marker: str,
    build: Callable[[Path], Any],
    cache_dir: str | os.PathLike | None = None,
    stale: Callable[[Path], bool] | None = None,
) -> Path:
    """``<cache>/<name>``, built by ``build(folder)`` unless ``<cache>/<name>/<marker>`` exists.

    Built in a temporary sibling folder and renamed into place, so concurrent
    callers never see a half-written folder. A folder for which ``stale(folder)``
    is true is moved aside in one rename, removed, and built again.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / name
    if stale is not None and final.is_dir() and stale(final):
        aside = root / f".{name}-stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, aside)
        except OSError:
            pass  # another caller moved it first
        shutil.rmtree(aside, ignore_errors=True)
    if (final / marker).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{uuid.uuid4().hex[:8]}-", dir=root))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():  # lost a race to a broken folder: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prefix_text_encoder_keys(folder: Path) -> None:
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
    fixed = {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in tensors.items()
    }
    save_file(fixed, str(file), metadata={**metadata, "format": "pt"})
