"""The concept files: what dti_fast writes for each learned concept, and how they are read back.

Per concept, in ``<output>/<concept>/`` (see the README's table for every client):

- ``learned_embeds.safetensors``: diffusers' format ``{placeholder: (n_vectors, dim)}`` for the
  first text encoder; SDXL adds ``learned_embeds_2.safetensors`` for the second.
- Files named by the concept's **trigger** (the word typed in A1111 and ComfyUI prompts, which
  take it from the file name): SD ``<trigger>.safetensors`` (``emb_params``) and ``<trigger>.pt``
  (A1111's ``string_to_param`` dict, ``name`` = the trigger, in torch's legacy non-zip
  serialization, which A1111's pickle check accepts); SDXL ``<trigger>.safetensors`` with
  ``clip_l`` and ``clip_g``. The trigger is never a word of the model's vocabulary, so it
  replaces nothing else in a prompt and diffusers can add it as a token.
- ``concept.json`` (written by the export): what was trained, the trigger, and which word to
  type in each client.

Names and triggers are checked before training (:func:`validate_export_names` without a model,
:func:`validate_trigger` with the tokenizer). Reading: :func:`read_concept` takes a concept
folder or any of these files; :func:`load_concepts` loads concepts into a diffusers SD or SDXL
pipeline (both encoders, multi-vector) and returns the word to type for each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .io import atomic_write, load_safetensors, load_torch, save_safetensors

if TYPE_CHECKING:  # pragma: no cover
    from .data import Concept

__all__ = [
    "ConceptEmbeddings",
    "DIFFUSERS_FILES",
    "NAME_MAX_BYTES",
    "check_concept_fits",
    "client_info",
    "concept_trigger",
    "default_trigger",
    "load_concepts",
    "read_concept",
    "rescaled_trigger",
    "summary_lines",
    "trigger_file_names",
    "unload_concepts",
    "validate_export_names",
    "validate_trigger",
    "write_concept_files",
]

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
#: Files and folders the export writes in a concept folder besides the trigger-named ones.
OWN_ENTRIES = (*DIFFUSERS_FILES, "concept.json", "samples.png", "rescaled")
#: Entries the trainer writes in the output folder beside the concept folders.
RESERVED_CONCEPT_NAMES = ("checkpoints",)
#: The longest file name (bytes) of ext4 and most other file systems.
NAME_MAX_BYTES = 255
#: What atomic_write adds to a name for its temporary file: ".<name>.XXXXXXXX.tmp".
_TMP_EXTRA = len("..") + 8 + len(".tmp")
_TRIGGER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]*[a-z0-9_-])?$")


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


# --------------------------------------------------------------------------------------------
# Triggers and file names
# --------------------------------------------------------------------------------------------


def default_trigger(placeholder: str, method: str | None = None) -> str:
    """The trigger derived from a placeholder: ``<dog>`` -> ``dog-dti`` (``dog`` without a method).

    Lower case (CLIP lower-cases prompts), characters other than letters, digits, ``_.-`` become
    ``-``, and the method is appended, so ``dog.pt`` never replaces the word "dog" and DTI and TI
    exports of one concept can sit in one embeddings folder.
    """
    stem = re.sub(r"[^a-z0-9_.-]+", "-", placeholder.lower()).strip("-_.")
    stem = stem or "concept"
    return f"{stem}-{method}" if method else stem


def concept_trigger(concept: Concept, method: str | None = None) -> str:
    """The concept's trigger: its ``trigger`` field, else :func:`default_trigger` of its placeholder."""
    trigger = getattr(concept, "trigger", None)
    return trigger if trigger else default_trigger(concept.placeholder or f"<{concept.name}>", method)


def rescaled_trigger(trigger: str) -> str:
    """The trigger of the ``rescaled/`` export (TI-rescaled), distinct from the plain one."""
    return f"{trigger}-rescaled"


#: Families whose pipelines no A1111-style client loads: their concepts are written in diffusers' format only.
DIFFUSERS_ONLY_FAMILIES = ("sana", "wan")


def trigger_file_names(trigger: str, family: str) -> list[str]:
    """The trigger-named files of one export: SD ``.pt`` and ``.safetensors``, SDXL ``.safetensors``; SANA/Wan none."""
    if family in DIFFUSERS_ONLY_FAMILIES:
        return []
    return [f"{trigger}.pt", f"{trigger}.safetensors"] if family != "sdxl" else [f"{trigger}.safetensors"]


def _check_trigger_text(trigger: str, where: str) -> None:
    if not isinstance(trigger, str) or not _TRIGGER_RE.match(trigger):
        raise ValueError(
            f"{where}: trigger {trigger!r} must be lower case letters, digits, '_', '-' or '.' (starting with a "
            "letter or digit, not ending with '.'): it is the file name A1111/ComfyUI type and CLIP lower-cases "
            "prompts; set trigger = e.g. 'my-dog'"
        )
    stems = {Path(e).stem.casefold() for e in OWN_ENTRIES} | {e.casefold() for e in OWN_ENTRIES}
    if trigger.casefold() in stems:
        raise ValueError(
            f"{where}: trigger {trigger!r} would overwrite the export's own file "
            f"{trigger}.safetensors or {trigger}.*; choose another trigger (e.g. '{trigger}-emb')"
        )


def validate_export_names(concepts: Sequence[Concept], method: str | None = None, rescaled: bool = False) -> None:
    """Refuse (``ValueError``) names and triggers whose export files would collide or not fit on disk.

    Checked before anything is trained: a concept name that is one of the output folder's own
    entries (``checkpoints``), a trigger that is not a usable file name or would overwrite an
    export file (``learned_embeds``...), two concepts with one trigger (their files would
    overwrite each other in an embeddings folder), and names/triggers whose longest file name
    (with the temporary file of an atomic write) exceeds :data:`NAME_MAX_BYTES`.
    """
    seen: dict[str, str] = {}
    placeholders = {(c.placeholder or "").casefold(): c.name for c in concepts}
    for c in concepts:
        where = f"concept {_short(c.name)!r}"
        if c.name.casefold() in RESERVED_CONCEPT_NAMES:
            raise ValueError(
                f"{where}: the name {c.name!r} is the output folder's own {c.name}/ folder; rename the "
                f"concept (e.g. '{c.name}-concept')"
            )
        name_bytes = len(c.name.encode("utf-8"))
        if name_bytes > NAME_MAX_BYTES:
            raise ValueError(
                f"{where}: the name is {name_bytes} bytes long but a folder name may have at most "
                f"{NAME_MAX_BYTES}; use a shorter name"
            )
        trigger = concept_trigger(c, method)
        _check_trigger_text(trigger, where)
        triggers = [trigger] + ([rescaled_trigger(trigger)] if rescaled else [])
        for t in triggers:
            longest = len(f"{t}.safetensors".encode()) + _TMP_EXTRA
            if longest > NAME_MAX_BYTES:
                room = NAME_MAX_BYTES - _TMP_EXTRA - len(".safetensors") - (len("-rescaled") if rescaled else 0)
                given = "its trigger" if getattr(c, "trigger", None) else "the trigger made from its placeholder"
                raise ValueError(
                    f"{where}: {given} {_short(trigger)!r} is {len(trigger.encode('utf-8'))} bytes, too long for "
                    f"the file {_short(t)}.safetensors (file names hold at most {NAME_MAX_BYTES} bytes); set a "
                    f"shorter trigger (at most {room} characters) or a shorter name"
                )
            key = t.casefold()
            if placeholders.get(key, c.name) != c.name:
                raise ValueError(
                    f"{where}: trigger {t!r} is the placeholder of concept {placeholders[key]!r}; give "
                    "the concept another trigger"
                )
            if key in seen:
                raise ValueError(
                    f"{where}: trigger {t!r} is also the trigger of concept {seen[key]!r}; their "
                    "embedding files would overwrite each other; give each concept its own trigger"
                )
            seen[key] = c.name


def validate_trigger(tokenizer, concept: Concept, method: str | None = None) -> str:
    """Refuse (``ValueError``) a trigger the model's tokenizer already knows; returns the trigger.

    A1111 replaces every occurrence of the trigger's tokens in a prompt, so a trigger that is one
    vocabulary word ("dog") would replace that word everywhere; diffusers refuses a token the
    vocabulary holds ("Token dog already in tokenizer vocabulary").
    """
    trigger = concept_trigger(concept, method)
    _check_trigger_text(trigger, f"concept {_short(concept.name)!r}")
    vocab = tokenizer.get_vocab()
    pieces = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    if trigger in vocab or len(pieces) <= 1:
        raise ValueError(
            f"concept {_short(concept.name)!r}: trigger {trigger!r} is a word of the model's vocabulary, so A1111 "
            f"would put the embedding in place of every {trigger!r} typed and diffusers cannot add it; set a trigger "
            f"that is not one word (e.g. trigger = '{trigger}-emb')"
        )
    return trigger


def client_info(trigger: str, placeholder: str, family: str) -> dict[str, Any]:
    """concept.json's ``trigger``, ``files`` and per-client ``clients`` (file to use, word to type)."""
    files = trigger_file_names(trigger, family)
    st = f"{trigger}.safetensors"
    if family in DIFFUSERS_ONLY_FAMILIES:
        return {
            "trigger": trigger,
            "files": {"diffusers": [DIFFUSERS_FILES[0]]},
            "clients": {
                "diffusers": {
                    "file": "the concept folder",
                    "type": placeholder,
                    "how": f"dti_fast.load_concepts(pipe, <this folder>) returns the words to type for {placeholder} "
                    "(diffusers' load_textual_inversion exists only for the CLIP pipelines)",
                }
            },
        }
    return {
        "trigger": trigger,
        "files": {"diffusers": list(DIFFUSERS_FILES[: 2 if family == "sdxl" else 1]), "a1111": files},
        "clients": {
            "AUTOMATIC1111": {
                "file": files,
                "type": trigger,
                "how": f"copy {st}"
                + (f" (or {trigger}.pt; one of the two)" if family != "sdxl" else "")
                + f" into models/embeddings/ and type {trigger}",
            },
            "ComfyUI": {
                "file": st,
                "type": f"embedding:{trigger}",
                "how": f"copy {st} into models/embeddings/ and type embedding:{trigger}",
            },
            "InvokeAI": {
                "file": st,
                "type": f"<{trigger}>",
                "how": f"install {st} (not learned_embeds*.safetensors) and type <{trigger}>",
            },
            "diffusers": {
                "file": "the concept folder",
                "type": placeholder,
                "how": f"dti_fast.load_concepts(pipe, <this folder>) returns {placeholder}, the word to type"
                + (
                    f" (or pipe.load_textual_inversion('{trigger}.pt'), then type {trigger})"
                    if family != "sdxl"
                    else ""
                ),
            },
        },
    }


def summary_lines(folder: str | Path) -> list[str]:
    """Lines for the end-of-job summary: which word to type in each client (empty without concept.json)."""
    try:
        info = json.loads((Path(folder) / "concept.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    clients = info.get("clients")
    if not clients:
        return []
    lines = [f"    {client}: {entry['how']}" for client, entry in clients.items()]
    if info.get("rescaled_trigger"):
        lines.append(f"    rescaled/: the same files with trigger {info['rescaled_trigger']}")
    return lines


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _save_legacy_torch(obj: Any, path: Path) -> Path:
    """``torch.save`` in the legacy (non-zip) serialization, atomically.

    torch 2.x's zip container adds ``.format_version``, ``.storage_alignment`` and ``byteorder``
    entries that A1111's pickle check refuses; the legacy stream is plain pickles it accepts, and
    ``torch.load(weights_only=True)`` still reads it.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp, _use_new_zipfile_serialization=False))


def write_concept_files(
    folder: Path,
    name: str,
    placeholder: str,
    vectors: list[torch.Tensor],
    family: str,
    steps: int,
    trigger: str | None = None,
) -> list[Path]:
    """Write one concept's vectors (one (n, dim) tensor per text encoder) in every format.

    ``trigger`` names the A1111/ComfyUI files (default: :func:`default_trigger` of the
    placeholder); callers validate it first (:func:`validate_export_names`).
    """
    folder = Path(folder)
    trigger = trigger or default_trigger(placeholder)
    _check_trigger_text(trigger, f"concept {_short(name)!r}")
    # clone(): a row slice of a bigger table would otherwise drag the whole storage into the .pt.
    rows = [v.detach().to("cpu").contiguous().clone() for v in vectors]
    written = [save_safetensors({placeholder: rows[0]}, folder / DIFFUSERS_FILES[0])]
    if family in DIFFUSERS_ONLY_FAMILIES:
        return written
    if family == "sdxl":
        written.append(save_safetensors({placeholder: rows[1]}, folder / DIFFUSERS_FILES[1]))
        written.append(save_safetensors({"clip_l": rows[0], "clip_g": rows[1]}, folder / f"{trigger}.safetensors"))
    else:
        written.append(save_safetensors({"emb_params": rows[0]}, folder / f"{trigger}.safetensors"))
        a1111 = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": rows[0]},
            "name": trigger,
            "step": steps,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
        written.append(_save_legacy_torch(a1111, folder / f"{trigger}.pt"))
    return written


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class ConceptEmbeddings:
    """One concept's learned vectors, per text encoder, and what concept.json says about it."""

    name: str
    placeholder: str  # the token diffusers loads it as: the word to type with dti_fast.load_concepts
    vectors: list[torch.Tensor]  # per encoder: (n_vectors, dim) fp32
    files: list[Path | None]  # per encoder: the diffusers-format file it came from (None: other/in memory)
    info: dict[str, Any] = field(default_factory=dict)
    source: Path = Path(".")

    @property
    def n_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def family(self) -> str:
        """concept.json's family when it says one, else "sdxl" for two encoders' vectors, "sd" for one."""
        fam = self.info.get("family")
        if fam in ("sd", "sdxl", "sana", "wan"):
            return fam
        return "sdxl" if len(self.vectors) == 2 else "sd"

    @property
    def prompt_string(self) -> str:
        """The concept's tokens joined by spaces (what a SANA/Wan prompt spells out)."""
        return " ".join(self.tokens)

    @property
    def tokens(self) -> list[str]:
        return [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, self.n_vectors)]

    @property
    def class_noun(self) -> str | None:
        return self.info.get("class_noun") or self.info.get("init")

    @property
    def method(self) -> str | None:
        return self.info.get("method")

    @property
    def trigger(self) -> str | None:
        """The A1111/ComfyUI word (file name) of the concept's export, when known."""
        return self.info.get("trigger")


def _as_rows(t: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise ValueError(f"{where}: expected a tensor of learned vectors, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(
            f"{where}: the learned vectors are {str(t.dtype).replace('torch.', '')} values, not floating point "
            "(a textual-inversion embedding is float32/float16/bfloat16); this is not a trained embedding: "
            "re-export the concept"
        )
    t = t.detach().float().cpu()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{where}: learned vectors must have shape (n_vectors, dim), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{where}: the learned vectors hold NaN or inf values (a training run that diverged); "
            "retrain the concept (lower the learning rate) or use an earlier export"
        )
    return t


def _read_diffusers_file(path: Path) -> tuple[str, torch.Tensor]:
    data = load_safetensors(path)
    if len(data) != 1:
        raise ValueError(
            f"{path} holds {len(data)} tensors ({', '.join(sorted(data)[:4])}); a diffusers textual-inversion file "
            "holds one {placeholder: (n_vectors, dim)}: pass the concept folder written by dti-fast train"
        )
    key, value = next(iter(data.items()))
    return key, _as_rows(value, str(path))


_TEXT = "a string"
#: concept.json's keys that dti_fast reads, and what each must be (an absent key or null is fine).
_INFO_KEYS: dict[str, str] = {
    "name": _TEXT,
    "placeholder": _TEXT,
    "trigger": _TEXT,
    "rescaled_trigger": _TEXT,
    "model": _TEXT,
    "family": "one of sd, sdxl, sana, wan",
    "method": _TEXT,
    "init": _TEXT,
    "class_noun": _TEXT,
    "kind": _TEXT,
    "status": _TEXT,
    "fingerprint": _TEXT,
    "prompt_string": _TEXT,
    "steps": "an integer",
    "tokens": "a list of strings",
    "encoders": "a list of JSON objects",
    "clients": 'a JSON object of {client: {"how": ...}}',
}


def _info_value_ok(key: str, value: Any) -> bool:
    kind = _INFO_KEYS[key]
    if kind == _TEXT:
        return isinstance(value, str) and (bool(value.strip()) or key not in ("name", "placeholder", "model"))
    if kind.startswith("one of"):
        return value in ("sd", "sdxl", "sana", "wan")
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "a list of JSON objects":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    return isinstance(value, dict) and all(
        isinstance(v, dict) and isinstance(v.get("how", ""), str) for v in value.values()
    )


def _read_info(path: Path) -> dict:
    """A concept.json as a dict whose keys dti_fast reads have their types (ValueError naming the file and key).

    A relative ``"model"`` is resolved by :func:`resolve_recorded_model` against the concept folder.
    """
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); re-export the concept or delete the file") from None
    if not isinstance(info, dict):
        raise ValueError(
            f"{path} holds a {type(info).__name__}, not the JSON object dti-fast writes; re-export the "
            "concept or delete the file"
        )
    for key in _INFO_KEYS:
        value = info.get(key)
        if value is not None and not _info_value_ok(key, value):
            raise ValueError(
                f'{path}: "{key}" must be {_INFO_KEYS[key]}, got {_short(json.dumps(value), 60)}; re-export the '
                "concept (or fix that value in the file)"
            )
    if info.get("model"):
        info["model"] = resolve_recorded_model(info["model"], path.parent)
    return info


def recorded_model(model: str) -> str:
    """What concept.json records for the ``--model`` a concept was trained on.

    A model given as a path that exists is recorded as its absolute path (``os.path.abspath``
    after ``~`` expansion: symlinks are kept as the user named them), so ``generate`` finds it
    from any folder; anything else (a hub id such as ``org/name``) is recorded as given.
    """
    import os

    model = str(model)
    path = Path(model).expanduser()
    return os.path.abspath(path) if path.exists() else model


def resolve_recorded_model(model: str, concept_folder: Path) -> str:
    """The model a concept.json's ``"model"`` names, for a concept in ``concept_folder``.

    Absolute paths are kept. concept.json files written before :func:`recorded_model` existed
    hold the ``--model`` as typed, relative to the folder training ran in, which the file does not
    say. Such a relative value is looked up in the concept folder and in each folder above it,
    closest first; the first where it names a diffusers model folder (one with
    ``model_index.json``) wins and is returned as an absolute path (an output folder made under the
    training's folder finds its model, whatever the current folder; a different model of the same
    name in the current folder is not picked up instead). Found nowhere, the value is returned as
    written: a hub id, or a path that :func:`dti_fast.models.resolve_source` then resolves from the
    current folder (and names when it does not exist).
    """
    import os

    text = str(model)
    path = Path(text).expanduser()
    if path.is_absolute() or not text.strip():
        return text if not path.is_absolute() else str(path)
    try:
        start = Path(os.path.abspath(concept_folder))
    except (OSError, ValueError):
        return text
    for folder in (start, *start.parents):
        candidate = folder / path
        try:
            if (candidate / "model_index.json").is_file():
                return os.path.abspath(candidate)
        except OSError:
            continue
    return text


def _concept_json(folder: Path) -> tuple[dict, str | None]:
    """concept.json of ``folder``; for a ``rescaled/`` folder the parent's (method 'ti-rescaled')."""
    own = folder / "concept.json"
    if own.is_file():
        return _read_info(own), None
    parent = folder.parent / "concept.json"
    if folder.name == "rescaled" and parent.is_file():
        info = _read_info(parent)
        if info.get("rescaled_trigger"):
            info["trigger"] = info["rescaled_trigger"]
            info.pop("clients", None)
            info.pop("files", None)
        return info, "ti-rescaled"
    return {}, None


def _with_override(info: dict, method_override: str | None, vectors: list[torch.Tensor]) -> dict:
    info = dict(info)
    if method_override:
        info["method"] = method_override
        info["encoders"] = [
            dict(enc, scale=None, norms=[float(n) for n in torch.linalg.vector_norm(v, dim=-1)])
            for enc, v in zip(info.get("encoders", [{}] * len(vectors)), vectors)
        ]
    return info


def _sibling_info(path: Path, vectors: list[torch.Tensor]) -> dict:
    """concept.json of the export a trigger file belongs to (matched by trigger), else {}."""
    try:
        info, override = _concept_json(path.parent)
    except (OSError, ValueError):
        return {}
    if info.get("trigger") != path.stem or info.get("family", "sd") != ("sdxl" if len(vectors) == 2 else "sd"):
        return {}
    return _with_override(info, override, vectors)


def _diffusers_sibling_info(path: Path, key: str, vectors: list[torch.Tensor]) -> dict:
    """concept.json of the export a diffusers ``{placeholder: rows}`` file belongs to, else {}.

    It belongs to the concept.json in its folder (a ``rescaled/`` folder: the parent's) whose
    placeholder is the file's key. The info keeps its ``family``, so an SDXL concept's
    ``learned_embeds.safetensors`` (one encoder's half, as wide as an SD 1.x row) is refused by
    :func:`check_concept_fits` in an SD model. A damaged concept.json beside the export's own file
    names (``learned_embeds*.safetensors``) is an error; beside any other file it is ignored.
    """
    try:
        info, override = _concept_json(path.parent)
    except (OSError, ValueError):
        if path.name in DIFFUSERS_FILES:
            raise
        return {}
    if info.get("placeholder") != key:
        return {}
    info = _with_override(info, override, vectors)
    info["encoder_file"] = DIFFUSERS_FILES.index(path.name) + 1 if path.name in DIFFUSERS_FILES else None
    return info


def read_concept(path: str | Path, token: str | None = None) -> ConceptEmbeddings:
    """Read a concept: a folder written by training (or interpolation), its ``rescaled/`` folder, or a file.

    Folders give the placeholder of concept.json. Files: a diffusers ``.safetensors``
    ``{placeholder: (n, dim)}`` (SD; word = the key); and, as A1111 and ComfyUI read them with
    the file name as the word, an ``emb_params`` ``.safetensors``, an SDXL ``.safetensors`` with
    ``clip_l``/``clip_g``, or an A1111 ``.pt``/``.bin`` (read with ``weights_only=True``).
    ``token`` overrides the word.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"concept {path} does not exist; pass a concept folder written by dti-fast train "
            "(with learned_embeds.safetensors) or an embedding file"
        )
    if path.is_dir():
        first = path / DIFFUSERS_FILES[0]
        if not first.is_file():
            raise FileNotFoundError(
                f"concept folder {path} has no learned_embeds.safetensors; pass the folder dti-fast train wrote for "
                "the concept (<output>/<concept>/) or its rescaled/ folder"
            )
        info, method_override = _concept_json(path)
        key, v1 = _read_diffusers_file(first)
        vectors, files = [v1], [first]
        second = path / DIFFUSERS_FILES[1]
        if second.is_file():
            key2, v2 = _read_diffusers_file(second)
            if v2.shape[0] != v1.shape[0]:
                raise ValueError(
                    f"{second} holds {v2.shape[0]} vectors but {first} holds {v1.shape[0]}; re-export the concept"
                )
            vectors.append(v2)
            files.append(second)
        elif info.get("family") == "sdxl":
            raise FileNotFoundError(
                f"concept folder {path} is an SDXL concept (concept.json) but has no "
                "learned_embeds_2.safetensors (the second text encoder's vectors); re-export it"
            )
        info = _with_override(info, method_override, vectors)
        placeholder = token or info.get("placeholder") or key
        name = info.get("name") or path.name
        return ConceptEmbeddings(
            name=name, placeholder=placeholder, vectors=vectors, files=files, info=info, source=path
        )
    suffix = path.suffix.lower()
    stem = path.stem
    if suffix == ".safetensors":
        data = load_safetensors(path)
        if {"clip_l", "clip_g"} <= set(data):
            vectors = [_as_rows(data["clip_l"], f"{path} clip_l"), _as_rows(data["clip_g"], f"{path} clip_g")]
            if vectors[0].shape[0] != vectors[1].shape[0]:
                raise ValueError(
                    f"{path}: clip_l holds {vectors[0].shape[0]} vectors but clip_g {vectors[1].shape[0]}; re-export it"
                )
            return ConceptEmbeddings(stem, token or stem, vectors, [None, None], _sibling_info(path, vectors), path)
        if set(data) == {"emb_params"}:
            vectors = [_as_rows(data["emb_params"], f"{path} emb_params")]
            return ConceptEmbeddings(stem, token or stem, vectors, [None], _sibling_info(path, vectors), path)
        key, v = _read_diffusers_file(path)
        return ConceptEmbeddings(stem, token or key, [v], [path], _diffusers_sibling_info(path, key, [v]), path)
    if suffix in (".pt", ".bin"):
        data = load_torch(path)
        if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
            vectors = [_as_rows(next(iter(data["string_to_param"].values())), str(path))]
            return ConceptEmbeddings(stem, token or stem, vectors, [None], _sibling_info(path, vectors), path)
        if isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):
            vectors = [_as_rows(data["clip_l"], f"{path} clip_l"), _as_rows(data["clip_g"], f"{path} clip_g")]
            return ConceptEmbeddings(stem, token or stem, vectors, [None, None], {}, path)
        if isinstance(data, dict) and len(data) == 1:
            key, value = next(iter(data.items()))
            word = stem if key == "emb_params" else key
            return ConceptEmbeddings(stem, token or word, [_as_rows(value, str(path))], [None], {}, path)
        raise ValueError(f"{path} is not a textual-inversion file (no string_to_param, not one tensor)")
    raise ValueError(
        f"concept {path}: unsupported file type {suffix!r}; pass a concept folder, a .safetensors "
        "or an A1111 .pt embedding"
    )


# --------------------------------------------------------------------------------------------
# Loading into a diffusers pipeline
# --------------------------------------------------------------------------------------------


def pipeline_family(pipe) -> str:
    """ "sana" (SanaPipeline), "wan" (WanPipeline), "sdxl" (a second text encoder) or "sd"."""
    name = type(pipe).__name__
    if name.startswith("Sana"):
        return "sana"
    if name.startswith("Wan"):
        return "wan"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def _encoders(pipe) -> list[tuple[Any, Any]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if pipeline_family(pipe) == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def check_concept_fits(pipe, concept: ConceptEmbeddings) -> None:
    """Raise ``ValueError`` naming the file when the concept's encoders or vector sizes do not fit ``pipe``."""
    model = getattr(pipe, "_dti_fast_model", "the model")
    pairs = _encoders(pipe)
    fam = pipeline_family(pipe)
    trained_family = concept.info.get("family")
    if trained_family == "sdxl" and len(concept.vectors) == 1 and fam != "sdxl":
        which = "second" if concept.info.get("encoder_file") == 2 else "first"
        raise ValueError(
            f"{concept.source} is the {which} text encoder's half of an SDXL concept (the concept.json beside it says "
            f"family sdxl) but model {model} is {fam}; load the concept folder {concept.source.parent} into an SDXL "
            "model, or train the concept on this one"
        )
    if (fam in DIFFUSERS_ONLY_FAMILIES or trained_family in DIFFUSERS_ONLY_FAMILIES) and trained_family not in (
        None,
        fam,
    ):  # SD vs SDXL: the encoder count check below says more
        raise ValueError(
            f"concept {concept.source} was trained on a {trained_family} model ({concept.info.get('model')}) but "
            f"model {model} is {fam}; use the model family the concept was trained on or train it on this one"
        )
    if len(concept.vectors) != len(pairs):
        have = "two text encoders (SDXL)" if len(concept.vectors) == 2 else "one text encoder (SD 1.x/2.x)"
        want = "SDXL, with two text encoders" if fam == "sdxl" else "SD 1.x/2.x, with one text encoder"
        trained = concept.info.get("model")
        raise ValueError(
            f"concept {concept.source} holds vectors for {have} but model {model} is {want}; use the model the "
            f"concept was trained on{f' ({trained})' if trained else ''} or train the concept on this model"
        )
    for e, ((_, enc), v, f) in enumerate(zip(pairs, concept.vectors, concept.files)):
        dim = int(enc.get_input_embeddings().weight.shape[1])
        if int(v.shape[-1]) != dim:
            trained = concept.info.get("model")
            raise ValueError(
                f"{f or concept.source} holds vectors of size {int(v.shape[-1])} but text encoder {e + 1} of model "
                f"{model} takes {dim}: the concept was trained for another model"
                f"{f' ({trained})' if trained else ''} (e.g. an SD 1.5 embedding cannot go into SDXL or SD 2.x); "
                "use that model or train the concept on this one"
            )
    _check_window(pipe, concept, pairs, fam)
    _check_magnitude(pipe, concept, pairs, model)


def _check_window(pipe, concept: ConceptEmbeddings, pairs: list[tuple[Any, Any]], fam: str) -> None:
    """Refuse a concept with more vectors than fit in the text encoder's window (the prompt would be cut)."""
    from .families import family_of

    tok = pairs[0][0]
    try:
        window = int(family_of(fam).text_length(tok))
    except (TypeError, ValueError):
        return
    need = concept.n_vectors + 2  # the vectors between the start and end tokens
    if window > 0 and need > window:
        raise ValueError(
            f"concept {concept.source} holds {concept.n_vectors} vectors, so a prompt with it takes at least {need} "
            f"tokens, more than the text encoder's window of {window}: the vectors past the window would be cut off "
            "without a word; use an embedding with fewer vectors (train it with a shorter initializer)"
        )


#: A learned vector may be at most this many times as long as the longest row of the model's vocabulary.
MAX_NORM_RATIO = 100.0


def _largest_row_norm(weight: torch.Tensor) -> float:
    """The largest row norm of an embedding table, in fp32, a block of rows at a time (no fp32 copy of it all)."""
    best = 0.0
    with torch.no_grad():
        for start in range(0, weight.shape[0], 8192):
            block = weight[start : start + 8192].float()
            best = max(best, float(torch.linalg.vector_norm(block, dim=-1).max()))
    return best


def _check_magnitude(pipe, concept: ConceptEmbeddings, pairs: list[tuple[Any, Any]], model: str) -> None:
    """Refuse finite vectors far longer than any vocabulary row, or too large for the encoder's dtype.

    NaN/inf are refused when the file is read (:func:`read_concept`); a finite vector of norm
    1e30 passes that, and the text encoder then overflows to NaN and every image comes out black.
    """
    for e, ((_, enc), v, f) in enumerate(zip(pairs, concept.vectors, concept.files)):
        where = f or concept.source
        weight = enc.get_input_embeddings().weight
        norms = torch.linalg.vector_norm(v.double(), dim=-1)  # fp64: a 1e30 vector has a finite norm
        largest = float(norms.max())
        if weight.is_floating_point() and float(v.abs().max()) > torch.finfo(weight.dtype).max:
            raise ValueError(
                f"{where}: its vectors hold values up to {float(v.abs().max()):.3g}, beyond what text encoder {e + 1} "
                f"of model {model} can hold in {str(weight.dtype).replace('torch.', '')}: they would overflow and the "
                "images come out black; this embedding is damaged: retrain or re-export it"
            )
        vocab = _largest_row_norm(weight.detach())
        if vocab > 0 and largest > MAX_NORM_RATIO * vocab:
            raise ValueError(
                f"{where}: a vector has norm {largest:.3g}, {largest / vocab:.3g} times the longest word vector of "
                f"text encoder {e + 1} of model {model} ({vocab:.3g}; at most {MAX_NORM_RATIO:g} times is accepted): "
                "it would overflow and the images come out black; this embedding is damaged or for another model: "
                "retrain or re-export it"
            )


def _flatten(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def _check_word_free(pipe, c: ConceptEmbeddings) -> None:
    for tok, _ in _encoders(pipe):
        vocab = tok.get_vocab()
        taken = [t for t in c.tokens if t in vocab or t.lower() in vocab]
        if taken:
            from_file = c.source.is_file()
            fix = (
                f"rename the file (e.g. {c.placeholder}-emb{c.source.suffix}) or read it with "
                f"read_concept(path, token='<{c.placeholder}>')"
                if from_file
                else "unload_concepts() it first, or read it with read_concept(path, token='<another-word>')"
            )
            raise ValueError(
                f"concept {c.source}: the word {taken[0]!r} is already in the model's tokenizer vocabulary (a word of "
                f"the model, or a concept loaded before), so it cannot be added as the concept's token; {fix}"
            )


def load_concepts(pipe, *concepts: str | Path | ConceptEmbeddings | Sequence[Any]) -> list[str]:
    """Load concepts into a diffusers SD 1.x/2.x, SDXL, SANA or Wan pipeline; returns the words to type for each.

    SANA and Wan pipelines have no ``load_textual_inversion`` (diffusers has it for the CLIP
    pipelines only) and do not expand a multi-vector word: their tokenizer gets the
    concept's tokens and their text encoder a :class:`~dti_fast.embedding.DirectionalEmbedding`
    holding the rows (the trainer's own forward, so generation sees exactly what training
    saw, Gemma's sqrt(hidden) factor included), and the returned words are all of the
    concept's tokens (``<bag> <bag>_1``) to put in the prompt. SANA's pipeline lower-cases
    prompts, so its placeholders are lower case.

    Each argument is a concept folder written by training (or its ``rescaled/``), any of the
    export's files (``learned_embeds.safetensors``, ``<trigger>.safetensors``/``.pt``, SDXL
    ``clip_l``/``clip_g`` files), any A1111/diffusers embedding file, a :class:`ConceptEmbeddings`,
    or a list of these. Every vector goes into its text encoder (SDXL: both), as the tokens
    ``word word_1 ...``; diffusers' pipelines expand the bare ``word`` in a prompt to all of them.
    The word is the folder's placeholder (``<dog>``) or, for an A1111-style file, its name (the
    trigger, as in A1111 and ComfyUI). Everything is checked before anything is loaded.
    """
    loaded = [c if isinstance(c, ConceptEmbeddings) else read_concept(c) for c in _flatten(concepts)]
    seen: dict[str, Path] = {}
    for c in loaded:
        key = c.placeholder.lower()
        if key in seen:
            raise ValueError(
                f"concepts {seen[key]} and {c.source} use the same word {c.placeholder!r}; load them into separate "
                "pipelines or give one another token (read_concept(path, token=...))"
            )
        seen[key] = c.source
        check_concept_fits(pipe, c)
        _check_word_free(pipe, c)
    if pipeline_family(pipe) in DIFFUSERS_ONLY_FAMILIES:
        state = _flow_state(pipe)
        _install_rows(pipe, state, state["loaded"] + loaded)
        return [c.prompt_string for c in loaded]
    done: list[ConceptEmbeddings] = []
    try:
        for c in loaded:
            done.append(c)
            for (tok, enc), v in zip(_encoders(pipe), c.vectors):
                pipe.load_textual_inversion({c.placeholder: v}, token=c.placeholder, tokenizer=tok, text_encoder=enc)
    except BaseException:
        unload_concepts(pipe, done)
        raise
    return [c.placeholder for c in loaded]


def _flow_state(pipe) -> dict[str, Any]:
    """What a SANA/Wan pipeline looked like before dti_fast loaded concepts into it, and what it loaded."""
    import copy

    state = pipe.__dict__.get("_dti_fast_concepts")
    if state is None:
        from .embedding import DirectionalEmbedding

        emb = pipe.text_encoder.get_input_embeddings()
        if isinstance(emb, DirectionalEmbedding):
            raise ValueError(
                "this pipeline's text encoder already holds a trainer's embedding; build a fresh pipeline "
                "(dti_fast.generate.load_pipeline) to load concepts into"
            )
        state = {"tokenizer": copy.deepcopy(pipe.tokenizer), "embedding": emb, "loaded": []}
        pipe.__dict__["_dti_fast_concepts"] = state
    return state


def _install_rows(pipe, state: dict[str, Any], concepts: list[ConceptEmbeddings]) -> None:
    """Rebuild the SANA/Wan pipeline's tokenizer and input embedding so they hold exactly ``concepts``."""
    import copy

    from .embedding import DirectionalEmbedding, add_concept_tokens

    tok = copy.deepcopy(state["tokenizer"])
    base = state["embedding"]
    emb = DirectionalEmbedding(base, first_id=len(tok), scale=None)
    for c in concepts:
        ct = add_concept_tokens(tok, c.placeholder, c.n_vectors, c.name)
        emb.add_concept(ct.ids, c.vectors[0], c.vectors[0])
    emb.rows.requires_grad_(False)
    pipe.text_encoder.set_input_embeddings(emb if concepts else base)
    pipe.tokenizer = tok
    state["loaded"] = list(concepts)


def unload_concepts(pipe, concepts: Sequence[ConceptEmbeddings]) -> None:
    """Remove the concepts' tokens from every tokenizer and text encoder of ``pipe``."""
    if pipeline_family(pipe) in DIFFUSERS_ONLY_FAMILIES:
        state = pipe.__dict__.get("_dti_fast_concepts")
        if state is not None:
            gone = {c.placeholder for c in concepts}
            _install_rows(pipe, state, [c for c in state["loaded"] if c.placeholder not in gone])
        return
    tokens = [t for c in concepts for t in c.tokens]
    if tokens:
        for tok, enc in _encoders(pipe):
            vocab = tok.get_vocab()
            present = [t for t in tokens if t in vocab]
            if present:
                pipe.unload_textual_inversion(tokens=present, tokenizer=tok, text_encoder=enc)
