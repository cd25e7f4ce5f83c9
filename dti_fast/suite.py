"""The benchmark runner: the paper's TI-vs-DTI protocol in one command, resumable, with a report.

:func:`run_suite` takes a DreamBooth-layout folder (one sub-folder of photos per subject) and
the subject list (class noun and initializer words; the shipped
``assets/dreambooth_subjects.json`` by default), and for each chosen method

1. **trains** every subject at once, in ONE :func:`dti_fast.train.train` job (``ti-rescaled``
   is the ``rescaled/`` export of the ``ti`` job: it trains nothing of its own),
2. **generates** the evaluation prompts (``assets/eval_prompts.json``: object prompts for
   objects, live prompts for cats and dogs) x seeds with the learned vectors,
3. **scores** every image (DINOv2 Image, SigLIP Text, CLIP-I, CLIP-T; :mod:`dti_fast.evaluate`),
   per subject then as the mean over subjects,

With ``style_data`` (``--style-data``: one folder of reference images per style and a
``styles.json`` of class and initializer words) the same jobs also train style concepts (the
trainer's style templates), generate the style prompts (``assets/style_prompts.json``:
"<subject> in {} style" over 40 subjects) and score them in their own stage and report
section: Style (DINOv2) and Style CLIP-I against the style's images, Text (SigLIP) and CLIP-T of
the prompt with the style's class words, Content (SigLIP) of the subject alone.

then draws a slerp strip between two DTI subjects (and TI's lerp vs slerp) and writes
``report.json`` and ``report.md`` with the table, a per-subject appendix and plots (the metric
trade-off, learned norms against the vocabulary's norm histogram, the strips).

Every stage records a fingerprint of what shaped it in ``suite_state.json``; a rerun skips the
stages whose fingerprint is unchanged (a changed setting redoes that stage and those after
it). An interrupted training resumes from its checkpoints, an interrupted generation keeps
the images already written.

``quick=True`` runs the whole protocol end to end on the tiny random-weight SD model, the four
shipped DreamBooth subjects and tiny random-weight metric models: a smoke test of the
machinery (its numbers mean nothing), a few minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import settings as S
from .io import atomic_write, write_json

__all__ = [
    "SUITE_METHODS",
    "SuiteConfig",
    "SuiteResult",
    "run_suite",
    "load_styles",
    "load_subjects",
    "prompt_sets",
    "style_prompts",
]

SUITE_METHODS = ("dti", "ti", "ti-rescaled", "dti-xinit")
DEFAULT_METHODS = ("dti", "ti", "ti-rescaled")
# How each method is trained: (its training job's folder, the trainer's method, its init).
# TI-rescaled is the TI job's rescaled export; dti-xinit is DTI started from CrossInit
# (``--init xinit``: the direction of the text encoder's output at the initializer's tokens,
# at m*, which is its vMF prior too).
METHOD_TRAINING = {
    "dti": ("dti", "dti", "token"),
    "ti": ("ti", "ti", "token"),
    "ti-rescaled": ("ti", "ti", "token"),
    "dti-xinit": ("dti-xinit", "dti", "xinit"),
}
METHOD_LABELS = {"dti": "DTI", "ti": "TI", "ti-rescaled": "TI-rescaled", "dti-xinit": "DTI + CrossInit"}
LIVE_CLASSES = ("cat", "dog")
STATE_FILE = "suite_state.json"
STATE_VERSION = 1
#: The paper's SDXL numbers (Image / Text) for comparison; from arXiv 2512.13672.
PAPER_SDXL = {"ti": (0.561, 0.292), "ti-rescaled": (0.243, 0.466), "dti": (0.450, 0.522)}


def _asset(name: str) -> Path:
    return Path(str(resources.files("dti_fast") / "assets" / name))


def default_subjects_file() -> Path:
    return _asset("dreambooth_subjects.json")


def default_prompts_file() -> Path:
    return _asset("eval_prompts.json")


def default_style_prompts_file() -> Path:
    return _asset("style_prompts.json")


def _intact(path: Path, *keys: str) -> bool:
    """Whether the suite's own output ``path`` is there and whole: a JSON object holding ``keys``.

    A stage whose output is damaged (cut short by a failing disk, edited) counts as not done, so a
    rerun makes it again instead of failing on it later with a raw JSON error.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def _read_json(path: Path, what: str) -> Any:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); fix the file") from None


@dataclass
class Subject:
    name: str
    class_noun: str
    init: str
    images: Path
    live: bool
    style: bool = False


def load_subjects(
    data_dir: Path, subjects_file: Path | None = None, names: Sequence[str] | None = None
) -> list[Subject]:
    """Subjects of ``subjects_file`` (``{"subjects": {name: {"class", "initialization"}}}``) found in ``data_dir``."""
    subjects_file = Path(subjects_file) if subjects_file else default_subjects_file()
    data = _read_json(subjects_file, "subjects file")
    table = data.get("subjects") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f'subjects file {subjects_file} has no "subjects" table of {{name: {{class, initialization}}}}'
        )
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"data folder {data_dir} does not exist; pass a DreamBooth-layout folder "
            "(one sub-folder of photos per subject)"
        )
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ValueError(
                f"subject(s) {', '.join(unknown)} are not in {subjects_file}; add them there (class, "
                "initialization) or pass --subjects-file"
            )
        chosen = list(dict.fromkeys(names))
        absent = [n for n in chosen if not (data_dir / n).is_dir()]
        if absent:
            raise FileNotFoundError(f"subject folder(s) {', '.join(str(data_dir / n) for n in absent)} do not exist")
    else:
        chosen = [n for n in sorted(table) if (data_dir / n).is_dir()]
        if not chosen:
            raise ValueError(
                f"none of the {len(table)} subjects of {subjects_file} has a folder in {data_dir}; pass "
                "the DreamBooth dataset folder (dataset/<subject>/*.jpg)"
            )
    out = []
    for n in chosen:
        entry = _concept_entry(table[n], n, f"subject {n!r} in {subjects_file}")
        kind = entry.get("kind", "live" if entry["class"] in LIVE_CLASSES else "object")
        if kind not in ("live", "object"):
            raise ValueError(
                f'subject {n!r} in {subjects_file}: "kind" must be "live" or "object", got {kind!r}; fix the file'
            )
        out.append(Subject(n, entry["class"], entry["initialization"], data_dir / n, kind == "live"))
    return out


def _concept_entry(entry: Any, name: str, where: str) -> dict:
    """A subjects/styles file entry, checked: an object whose "class" and "initialization" are non-empty strings."""
    from .data import _NAME_RE

    if not _NAME_RE.match(name):
        raise ValueError(
            f"{where}: the name must start with a letter or digit and hold only letters, digits, '_', '-' or '.' "
            "(it names the output folders); rename it in the file"
        )
    if not isinstance(entry, dict):
        raise ValueError(
            f'{where} must be an object {{"class": ..., "initialization": ...}}, got {_json_type(entry)}; fix the file'
        )
    for key in ("class", "initialization"):
        value = entry.get(key)
        if value is None or value == "":
            raise ValueError(f'{where} needs "class" and "initialization"')
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{where}: "{key}" must be a non-empty string (words), got {value!r}; fix the file')
    return entry


def _json_type(value: Any) -> str:
    """How a JSON value reads in a message: "a list", "a string ('abc')", "the number 5"."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return "a list" if isinstance(value, list) else "an object"


def _prompt_list(value: Any, where: str) -> list[str]:
    """A prompts file's list of prompts, checked: a list of non-empty strings."""
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of prompts (strings), got {_json_type(value)}; fix the file")
    for i, p in enumerate(value):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}[{i}] must be a prompt (a non-empty string), got {_json_type(p)}; fix the file")
    return list(value)


def prompt_sets(prompts_file: Path | None = None, prompt_set: str = "simple") -> dict[str, list[str]]:
    """``{"object": [...], "live": [...]}`` of a prompt set of the prompts file."""
    prompts_file = Path(prompts_file) if prompts_file else default_prompts_file()
    data = _read_json(prompts_file, "prompts file")
    sets = data.get("prompt_sets", {}) if isinstance(data, dict) else {}
    if not isinstance(sets, dict):
        raise ValueError(
            f'prompts file {prompts_file}: "prompt_sets" must be an object {{name: {{"object_prompts": [...], '
            f'"live_prompts": [...]}}}}, got {_json_type(sets)}; fix the file'
        )
    if prompt_set not in sets:
        raise ValueError(
            f"prompt set {prompt_set!r} is not in {prompts_file} (has: {', '.join(sorted(sets)) or 'none'})"
        )
    entry = sets[prompt_set]
    if not isinstance(entry, dict):
        raise ValueError(
            f'prompts file {prompts_file}: prompt set {prompt_set!r} must be an object {{"object_prompts": [...], '
            f'"live_prompts": [...]}}, got {_json_type(entry)}; fix the file'
        )
    out = {
        kind: _prompt_list(
            entry.get(f"{kind}_prompts", []), f"prompts file {prompts_file}: {prompt_set}.{kind}_prompts"
        )
        for kind in ("object", "live")
    }
    for kind, plist in out.items():
        if not plist:
            raise ValueError(f"prompt set {prompt_set!r} of {prompts_file} has no {kind}_prompts")
        bad = [p for p in plist if "{}" not in p]
        if bad:
            raise ValueError(f"prompt {bad[0]!r} of {prompts_file} has no {{}} for the subject")
    return out


def load_styles(style_dir: Path, styles_file: Path | None = None, names: Sequence[str] | None = None) -> list[Subject]:
    """Style concepts: ``styles_file`` (``{"styles": {name: {"class", "initialization"}}}``, default
    ``<style_dir>/styles.json``) entries with a folder of reference images in ``style_dir``."""
    style_dir = Path(style_dir)
    if not style_dir.is_dir():
        raise FileNotFoundError(
            f"style folder {style_dir} does not exist; pass a folder with one sub-folder of reference images "
            "per style and a styles.json"
        )
    styles_file = Path(styles_file) if styles_file else style_dir / "styles.json"
    if not styles_file.is_file():
        raise FileNotFoundError(
            f'styles file {styles_file} does not exist; write {{"styles": {{name: {{"class": "watercolor '
            'painting", "initialization": "watercolor painting"}}}} there or pass --styles-file'
        )
    data = _read_json(styles_file, "styles file")
    table = data.get("styles") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(f'styles file {styles_file} has no "styles" table of {{name: {{class, initialization}}}}')
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ValueError(f"style(s) {', '.join(unknown)} are not in {styles_file}; add them there")
        chosen = list(dict.fromkeys(names))
    else:
        chosen = sorted(table)
    absent = [n for n in chosen if not (style_dir / n).is_dir()]
    if absent:
        raise FileNotFoundError(
            f"style folder(s) {', '.join(str(style_dir / n) for n in absent)} do not exist; each style of "
            f"{styles_file} needs a folder of reference images"
        )
    out = []
    for n in chosen:
        entry = _concept_entry(table[n], n, f"style {n!r} in {styles_file}")
        out.append(Subject(n, entry["class"], entry["initialization"], style_dir / n, live=False, style=True))
    return out


def style_prompts(prompts_file: Path | None = None) -> dict[str, str]:
    """The style prompts, ``{prompt: content}``: the file's template (``{subject}`` and ``{}`` for the
    style) filled with each of its subjects, and the subject alone as the content."""
    prompts_file = Path(prompts_file) if prompts_file else default_style_prompts_file()
    data = _read_json(prompts_file, "style prompts file")
    template = data.get("template") if isinstance(data, dict) else None
    subjects = data.get("subjects") if isinstance(data, dict) else None
    if not isinstance(template, str) or "{subject}" not in template or "{}" not in template:
        raise ValueError(
            f'style prompts file {prompts_file} needs a "template" with {{subject}} and {{}} (the style), '
            'e.g. "{subject} in {} style"'
        )
    if not isinstance(subjects, list) or not subjects or not all(isinstance(x, str) and x for x in subjects):
        raise ValueError(f'style prompts file {prompts_file} needs a "subjects" list of strings')
    return {template.replace("{subject}", x): x for x in subjects}


def _comma_list(*choices: str) -> S.Kind:
    describe = "a comma-separated subset of " + ", ".join(choices)

    def convert(value: Any, from_text: bool) -> list[str]:
        items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or any(x not in choices for x in items):
            raise ValueError(f"must be {describe}, got {value!r}")
        return list(items)

    return S.Kind(describe, convert)


#: The most images one suite run may generate (concepts x prompts x seeds x methods, plus the strips):
#: the paper's protocol is 30 subjects x 41 prompts x 4 seeds x 3 methods = 14,760.
MAX_IMAGES = 100_000
#: The most denoising steps: the schedulers' training timesteps (DDIM refuses more).
MAX_INFERENCE_STEPS = 1000


def _names(value: Any, from_text: bool) -> list[str]:
    """Subject or style names: ``dog`` or ``dog,cat2`` (a flag's text, or a string), a list of names, or the
    lists a repeated flag collects (``--subject dog --subject cat2,clock``), flattened in order."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"must be names like dog or dog,cat2 (a list of strings), got {value!r}")
    out: list[str] = []
    for item in items:
        parts = item.split(",") if isinstance(item, str) else item
        if not isinstance(parts, (list, tuple)) or not all(isinstance(x, str) for x in parts):
            raise ValueError(f"must be names like dog or dog,cat2 (a list of strings), got {value!r}")
        for x in parts:
            if not x.strip():
                raise ValueError(f"must be names like dog or dog,cat2 with no empty name, got {value!r}")
            out.append(x.strip())
    if not out:
        raise ValueError(f"must name at least one, got {value!r}")
    return out


def _pair(value: Any, from_text: bool) -> tuple[str, str]:
    parts = [x.strip() for x in value.split(",")] if isinstance(value, str) else list(value)
    if len(parts) != 2 or not all(isinstance(x, str) and x for x in parts):
        raise ValueError(f"must be two subject names A,B, got {value!r}")
    return (parts[0], parts[1])


PAIR = S.Kind("two subject names A,B", _pair)
NAMES = S.Kind("names like dog or dog,cat2", _names)
_SCHEDULERS = S.choice("auto", "model", "ddim", "euler", "dpm", "pndm")


@dataclass
class SuiteConfig:
    """One benchmark run. Defaults follow the paper's protocol (SDXL: resolution 768)."""

    output_dir: Path = S.setting(
        Path("dti-suite"), kind=S.PATH, flag="--output", help="output folder", default_text="default ./dti-suite"
    )
    model: str | None = S.setting(
        None,
        kind=S.optional(S.TEXT),
        help="diffusers SD 1.x/2.x, SDXL, SANA or Wan folder or hub id (required without --quick)",
    )
    data_dir: Path | None = S.setting(
        None,
        kind=S.optional(S.PATH),
        flag="--data",
        help="DreamBooth-layout folder, one sub-folder of photos per subject (required without --quick)",
    )
    subjects_file: Path | None = S.setting(
        None,
        kind=S.optional(S.PATH),
        help='JSON {"subjects": {name: {"class", "initialization"}}}',
        default_text="default: the shipped DreamBooth list of 30 subjects",
    )
    subjects: list[str] | None = S.setting(
        None,
        kind=S.optional(NAMES),
        flag="--subject",
        action="append",
        help="run only this subject (or these: a,b); repeatable",
        default_text="default: every subject of the list with a folder in --data",
    )
    methods: list[str] = S.setting(
        kind=_comma_list(*SUITE_METHODS),
        default_factory=lambda: list(DEFAULT_METHODS),
        help="comma-separated subset of dti, ti, ti-rescaled, dti-xinit (ti-rescaled reuses ti's training; "
        "dti-xinit is DTI started from CrossInit)",
        default_text="default dti,ti,ti-rescaled; the toy world adds dti-xinit",
    )
    steps: int = S.setting(
        400, kind=S.POSITIVE_INT, help="training steps per subject", default_text="default 400; --quick 20"
    )
    batch_size: int = S.setting(4, kind=S.POSITIVE_INT, help="training images per subject per step")
    max_batch: int | None = S.setting(
        16,
        kind=S.optional(S.NONNEG_INT),
        help="most training images per forward pass, subjects take turns (0 = every subject every step)",
    )
    resolution: int | None = S.setting(
        None,
        kind=S.optional(S.POSITIVE_INT),
        help="training resolution",
        default_text="default: 768 for SDXL, 1024 for SANA, 480 for Wan, else the model's native size",
    )
    seed: int = S.setting(0, kind=S.INT, help="training seed")
    prompt_set: str = S.setting(
        "simple", kind=S.TEXT, help="prompt set of the prompts file: simple, complex_lv1, complex_lv2"
    )
    prompts_file: Path | None = S.setting(
        None, kind=S.optional(S.PATH), help="prompts JSON", default_text="default: the shipped eval_prompts.json"
    )
    max_prompts: int | None = S.setting(
        None,
        kind=S.optional(S.POSITIVE_INT),
        help="use only the first N prompts of each kind",
        default_text="default all",
    )
    seeds: list[int] = S.setting(
        kind=S.SEEDS,
        default_factory=lambda: [0, 1, 2, 3],
        help="generation seeds, e.g. 0-3",
        default_text="default 0,1,2,3; --quick 0",
    )
    inference_steps: int = S.setting(
        50, kind=S.POSITIVE_INT, help="denoising steps", default_text="default 50; --quick 10"
    )
    guidance: float = S.setting(7.5, kind=S.NONNEG_FLOAT, help="classifier-free guidance scale, >= 0")
    gen_batch_size: int = S.setting(8, kind=S.POSITIVE_INT, help="images per pipeline call")
    scheduler: str = S.setting(
        "auto", kind=_SCHEDULERS, help="sampler: auto = the model's, DDIM instead of a training DDPM scheduler"
    )
    masks_dir: Path | None = S.setting(
        None,
        kind=S.optional(S.PATH),
        flag="--masks",
        help="reference masks for the Image metric: <masks>/<subject>/<photo stem>.png, white = subject",
        default_text="default: unmasked references",
    )
    dino_model: str | None = S.setting(
        None, kind=S.optional(S.TEXT), help="DINOv2 id or folder", default_text="default facebook/dinov2-base"
    )
    siglip_model: str | None = S.setting(
        None, kind=S.optional(S.TEXT), help="SigLIP id or folder", default_text="default google/siglip-base-patch16-512"
    )
    clip_model: str | None = S.setting(
        None, kind=S.optional(S.TEXT), help="CLIP id or folder", default_text="default openai/clip-vit-base-patch32"
    )
    style_data: Path | None = S.setting(
        None,
        kind=S.optional(S.PATH),
        help="style concepts too: a folder with one sub-folder of reference images per style and a "
        "styles.json; scored against the style images with the style prompts (report section 'Style "
        "concepts')",
        default_text="default: no style concepts; --quick: two procedural test styles",
    )
    styles_file: Path | None = S.setting(
        None,
        kind=S.optional(S.PATH),
        help='JSON {"styles": {name: {"class", "initialization"}}}',
        default_text="default: styles.json in --style-data",
    )
    styles: list[str] | None = S.setting(
        None,
        kind=S.optional(NAMES),
        flag="--style",
        action="append",
        help="run only this style (or these: a,b); repeatable",
        default_text="default: every style of the styles file",
    )
    style_prompts_file: Path | None = S.setting(
        None,
        kind=S.optional(S.PATH),
        help='style prompts JSON: {"template": "{subject} in {} style", "subjects": [...]}',
        default_text="default: the shipped style_prompts.json (40 subjects)",
    )
    metrics: list[str] = S.setting(
        kind=_comma_list("image", "text", "clip_i", "clip_t"),
        default_factory=lambda: ["image", "text", "clip_i", "clip_t"],
        help="comma-separated subset of image, text, clip_i, clip_t",
        default_text="default all",
    )
    device: str = S.setting(
        "auto", kind=S.TEXT, help="torch device", default_text="default: cuda if available, else cpu"
    )
    precision: str = S.setting(
        "auto",
        kind=S.choice("auto", "fp32", "bf16"),
        help="training and generation precision: auto = bf16 on a GPU, fp32 on a CPU",
    )
    slerp_pair: tuple[str, str] | None = S.setting(
        None,
        kind=S.optional(PAIR),
        help="two subjects A,B for the slerp strip",
        default_text="default: the first two with the same number of vectors",
    )
    slerp_steps: int = S.setting(5, kind=S.POSITIVE_INT, help="t values in the slerp strip")
    quick: bool = S.setting(
        False,
        kind=S.BOOL,
        action="true",
        help="smoke test: tiny SD model, shipped dreambooth_mini, 20 steps, resolution 64, 3 "
        "prompts, 1 seed, tiny random-weight metric models (numbers mean nothing)",
    )
    force: bool = S.setting(False, kind=S.BOOL, action="true", help="ignore the state file and redo every stage")
    progress: bool = S.setting(True, kind=S.BOOL, flag="--no-progress", action="false", help="no progress output")

    def apply_quick(self) -> None:
        """The smoke-test settings (only those the caller left at their defaults change)."""
        from .demo import demo_images_dir
        from .testing import tiny_metric_models_path, tiny_model_path

        defaults = SuiteConfig(output_dir=self.output_dir)
        if self.model is None:
            self.model = str(tiny_model_path("sd"))
        if self.data_dir is None:
            self.data_dir = demo_images_dir()
        if self.style_data is None and self.styles_file is None:
            from .testing import tiny_styles_path

            self.style_data = tiny_styles_path()
        for name, value in (
            ("steps", 20),
            ("batch_size", 1),
            ("max_batch", None),
            ("resolution", 64),
            ("max_prompts", 3),
            ("seeds", [0]),
            ("inference_steps", 10),
            ("gen_batch_size", 16),
        ):
            if getattr(self, name) == getattr(defaults, name):
                setattr(self, name, value)
        if not (self.dino_model and self.siglip_model and self.clip_model):
            tiny = tiny_metric_models_path()
            self.dino_model = self.dino_model or str(tiny["dino"])
            self.siglip_model = self.siglip_model or str(tiny["siglip"])
            self.clip_model = self.clip_model or str(tiny["clip"])

    def validate(self) -> None:
        if self.model is None:
            raise ValueError("suite: give --model (a diffusers SD/SDXL/SANA/Wan folder or hub id), or use --quick")
        if self.data_dir is None:
            raise ValueError("suite: give --data (a DreamBooth-layout folder: <data>/<subject>/*.jpg), or use --quick")
        if self.max_batch == 0:
            self.max_batch = None  # 0 on the command line: every subject every step
        S.check_fields(self)
        if self.slerp_steps < 2:
            raise ValueError("slerp_steps must be at least 2")
        from .interpolate import MAX_STEPS

        if self.slerp_steps > MAX_STEPS:
            raise ValueError(
                f"--slerp-steps {self.slerp_steps}: a strip holds at most {MAX_STEPS} images (as interpolate's "
                "--steps); give fewer"
            )
        if self.inference_steps > MAX_INFERENCE_STEPS:
            raise ValueError(
                f"--inference-steps {self.inference_steps} is more than {MAX_INFERENCE_STEPS} (the schedulers' "
                "training timesteps); give at most that (the paper samples with 50)"
            )
        if self.style_data is None and (self.styles_file or self.styles or self.style_prompts_file):
            raise ValueError(
                "suite: --styles-file, --style and --style-prompts-file need --style-data (the style images)"
            )
        if self.masks_dir is not None and not Path(self.masks_dir).is_dir():
            raise FileNotFoundError(
                f"masks folder {self.masks_dir} does not exist (layout: <masks>/<subject>/<photo "
                "stem>.png, white = subject)"
            )


@dataclass
class SuiteResult:
    output_dir: Path
    report_json: Path
    report_md: Path
    table: dict[str, dict[str, float]]
    ran: list[str]  # stages run by this call
    skipped: list[str]  # stages found finished
    seconds: float
    style_table: dict[str, dict[str, float]] = field(default_factory=dict)  # empty without style concepts


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    def __init__(self, folder: Path, force: bool) -> None:
        self.path = folder / STATE_FILE
        self.data: dict[str, Any] = {"version": STATE_VERSION, "stages": {}}
        if self.path.is_file() and not force:
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                loaded = None  # a damaged state file: everything reruns
            if (
                isinstance(loaded, dict)
                and loaded.get("version") == STATE_VERSION
                and isinstance(loaded.get("stages"), dict)
                and all(isinstance(v, dict) for v in loaded["stages"].values())
            ):
                self.data = loaded

    def done(self, stage: str, fingerprint: str) -> bool:
        entry = self.data["stages"].get(stage)
        return bool(entry and entry.get("done") and entry.get("fingerprint") == fingerprint)

    def previous(self, stage: str) -> str | None:
        entry = self.data["stages"].get(stage)
        return entry.get("fingerprint") if entry else None

    def start(self, stage: str, fingerprint: str) -> None:
        self.data["stages"][stage] = {"fingerprint": fingerprint, "done": False}
        self.save()

    def finish(self, stage: str, fingerprint: str, seconds: float, **extra) -> None:
        self.data["stages"][stage] = {"fingerprint": fingerprint, "done": True, "seconds": round(seconds, 3), **extra}
        self.save()

    def seconds(self, stage: str) -> float | None:
        return self.data["stages"].get(stage, {}).get("seconds")

    def save(self) -> None:
        write_json(self.data, self.path)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, cfg: SuiteConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.subjects = load_subjects(Path(cfg.data_dir), cfg.subjects_file, cfg.subjects)
        sets = prompt_sets(cfg.prompts_file, cfg.prompt_set)
        if cfg.max_prompts:
            sets = {k: v[: cfg.max_prompts] for k, v in sets.items()}
        self.prompts = {s.name: sets["live" if s.live else "object"] for s in self.subjects}
        self.styles: list[Subject] = []
        self.style_content: dict[str, str] = {}
        if cfg.style_data is not None:
            self.styles = load_styles(Path(cfg.style_data), cfg.styles_file, cfg.styles)
            clash = sorted({s.name for s in self.styles} & {s.name for s in self.subjects})
            if clash:
                raise ValueError(
                    f"style(s) {', '.join(clash)} have the name of a subject; rename them in the styles file"
                )
            self.style_content = style_prompts(cfg.style_prompts_file)
            if cfg.max_prompts:
                self.style_content = dict(list(self.style_content.items())[: cfg.max_prompts])
            for s in self.styles:
                self.prompts[s.name] = list(self.style_content)
        self.concepts = self.subjects + self.styles  # what each method trains and generates
        self._check_image_count()
        from .models import resolve_source

        self.resolved = resolve_source(str(cfg.model), None, None)
        # Everything that would otherwise be refused only after hours of training and sampling.
        if self.resolved.family in ("sana", "wan") and cfg.scheduler not in ("auto", "model"):
            raise ValueError(
                f"--scheduler {cfg.scheduler}: {self.resolved.family} models sample with their own flow-matching "
                "scheduler; use auto or model"
            )
        self._check_slerp_pair()
        check_metric_models(cfg.dino_model, cfg.siglip_model, cfg.clip_model, cfg.metrics)
        self._check_masks()
        self.resolution = cfg.resolution or self._native_resolution()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{self.out} is a file; give the suite a new or empty folder as --output")
        if (
            self.out.is_dir()
            and any(self.out.iterdir())
            and not any((self.out / f).is_file() for f in (STATE_FILE, "suite_config.json"))
        ):  # the suite replaces its own stages' folders (train/, images/, ...), never other files
            raise ValueError(
                f"{self.out} holds files but no {STATE_FILE} (not a suite's output); give the suite a new or "
                "empty folder as --output"
            )
        from .io import check_output_folder

        # Writable and not under a file (makes the folder, as run_suite does next).
        check_output_folder(self.out, owner="dti-fast suite", may_hold_others=True)
        self.state = _State(self.out, cfg.force)
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self._pipe = None
        self._evaluator = None
        self.log = print if cfg.progress else (lambda *a, **k: None)

    # -- checks before any stage -----------------------------------------------------------

    def _strip_images(self) -> int:
        """Images of the slerp strips: DTI's slerp row, TI's lerp and slerp rows."""
        jobs = {self.train_method(m) for m in self.cfg.methods}
        return self.cfg.slerp_steps * (("dti" in jobs) + 2 * ("ti" in jobs))

    def _check_image_count(self) -> None:
        c = self.cfg
        per_method = sum(len(self.prompts[x.name]) for x in self.concepts) * len(c.seeds)
        total = per_method * len(c.methods) + self._strip_images()
        if total > MAX_IMAGES:
            raise ValueError(
                f"this suite would generate {total} images ({len(self.concepts)} subjects and styles x their "
                f"prompts x {len(c.seeds)} --seeds x {len(c.methods)} --methods), more than {MAX_IMAGES}; give fewer "
                "--seeds (or --max-prompts, --subject, --methods)"
            )

    def _check_slerp_pair(self) -> None:
        """An explicit --slerp-pair: two different subjects of this run whose initializers give the same
        number of vectors (slerp pairs them one to one)."""
        if not self.cfg.slerp_pair:
            return
        a, b = self.cfg.slerp_pair
        by_name = {s.name: s for s in self.subjects}
        if a == b or a not in by_name or b not in by_name:
            raise ValueError(
                f"--slerp-pair {a},{b}: give two different subjects this run trains ({', '.join(by_name)})"
            )
        from .embedding import initializer_ids
        from .models import preview_model

        tok = preview_model(self.cfg.model).tokenizers[0]  # the tokenizers only, no weights
        counts = {n: len(initializer_ids(tok, by_name[n].init, n)) for n in (a, b)}
        if counts[a] != counts[b]:
            raise ValueError(
                f"--slerp-pair {a},{b}: {a}'s initializer {by_name[a].init!r} gives {counts[a]} vector(s) and "
                f"{b}'s {by_name[b].init!r} gives {counts[b]}; slerp pairs vectors one to one, so choose two "
                "subjects with the same count (or leave --slerp-pair out: the first such pair is taken)"
            )

    def _check_masks(self) -> None:
        """--masks: every reference photo of every subject has its mask (read as the scoring will)."""
        if self.cfg.masks_dir is None:
            return
        from .evaluate import load_references

        for s in self.subjects:
            load_references(s.images, Path(self.cfg.masks_dir) / s.name)

    # -- helpers ---------------------------------------------------------------------------

    def _native_resolution(self) -> int:
        if self.resolved.family == "sdxl":
            return 768  # the paper's SDXL training resolution
        if self.resolved.family in ("sana", "wan"):
            index = _local_index(self.resolved)
            if index.get("_dti_fast_resolution"):
                return int(index["_dti_fast_resolution"])  # the tiny models
            return 1024 if self.resolved.family == "sana" else 480  # the authors' SANA size; Wan 2.1 480p
        from diffusers import UNet2DConditionModel

        kw = {"local_files_only": True} if self.resolved.local else dict(self.resolved.hub_kwargs)
        unet = UNet2DConditionModel.load_config(self.resolved.source, subfolder="unet", **kw)
        vae = (
            json.loads((Path(self.resolved.source) / "vae" / "config.json").read_text()) if self.resolved.local else {}
        )
        factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        size = unet.get("sample_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * factor

    def pipe(self):
        if self._pipe is None:
            from .generate import load_pipeline

            self._pipe = load_pipeline(
                self.cfg.model, device=self.cfg.device, dtype=self.cfg.precision, scheduler=self.cfg.scheduler
            )
        return self._pipe

    def evaluator(self):
        if self._evaluator is None:
            from .evaluate import Evaluator

            self._evaluator = Evaluator(
                dino=self.cfg.dino_model,
                siglip=self.cfg.siglip_model,
                clip=self.cfg.clip_model,
                device=self.cfg.device,
                metrics=list(self.cfg.metrics),
            )
        return self._evaluator

    @staticmethod
    def train_method(method: str) -> str:
        """The training job (folder under ``train/``) a method's concepts come from."""
        return METHOD_TRAINING[method][0]

    def concept_dir(self, method: str, subject: str) -> Path:
        base = self.out / "train" / self.train_method(method) / subject
        return base / "rescaled" if method == "ti-rescaled" else base

    def _stage(self, stage: str, fingerprint: str, outputs_exist: bool, work) -> None:
        if self.state.done(stage, fingerprint) and outputs_exist:
            self.skipped.append(stage)
            self.log(f"[suite] {stage}: done before, skipped")
            return
        self.log(f"[suite] {stage} ...")
        changed = self.cfg.force or self.state.previous(stage) not in (None, fingerprint)
        self.state.start(stage, fingerprint)
        t0 = time.perf_counter()
        extra = work(changed) or {}
        seconds = time.perf_counter() - t0
        self.state.finish(stage, fingerprint, seconds, **extra)
        self.ran.append(stage)
        self.log(f"[suite] {stage}: {seconds:.1f} s")

    # -- fingerprints ------------------------------------------------------------------------

    def train_fp(self, method: str) -> str:
        c = self.cfg
        return _hash(
            {
                "method": self.train_method(method),
                "model": c.model,
                "steps": c.steps,
                "batch_size": c.batch_size,
                "max_batch": c.max_batch,
                "resolution": self.resolution,
                "seed": c.seed,
                "precision": c.precision,
                "subjects": [
                    (
                        s.name,
                        s.init,
                        s.class_noun,
                        str(s.images),
                        sorted(p.name for p in s.images.iterdir() if p.is_file()),
                    )
                    for s in self.subjects
                ],
            }
            | (
                {
                    "styles": [
                        (s.name, s.init, s.class_noun, str(s.images), sorted(p.name for p in s.images.iterdir()))
                        for s in self.styles
                    ]
                }
                if self.styles
                else {}
            )
        )

    def generate_fp(self, method: str) -> str:
        c = self.cfg
        return _hash(
            {
                "train": self.train_fp(method),
                "method": method,
                "prompts": self.prompts,
                "seeds": c.seeds,
                "inference_steps": c.inference_steps,
                "guidance": c.guidance,
                "scheduler": c.scheduler,
                "precision": c.precision,
            }
        )

    def score_fp(self, method: str) -> str:
        c = self.cfg
        return _hash(
            {
                "generate": self.generate_fp(method),
                "models": [c.dino_model, c.siglip_model, c.clip_model],
                "metrics": c.metrics,
                "masks": str(c.masks_dir) if c.masks_dir else None,
            }
        )

    def score_style_fp(self, method: str) -> str:
        c = self.cfg
        return _hash(
            {
                "generate": self.generate_fp(method),
                "models": [c.dino_model, c.siglip_model, c.clip_model],
                "metrics": c.metrics,
                "content": self.style_content,
            }
        )

    # -- stages ----------------------------------------------------------------------------

    def train(self, method: str) -> None:
        from .data import Concept
        from .train import TrainConfig, train

        tm = self.train_method(method)
        folder = self.out / "train" / tm
        c = self.cfg
        max_batch = c.max_batch
        if max_batch is not None and max_batch < c.batch_size:
            max_batch = c.batch_size

        def work(changed: bool):
            if changed and folder.exists():
                shutil.rmtree(folder)  # settings changed: the old checkpoints belong to another job
            cfg = TrainConfig(
                model=str(c.model),
                output_dir=folder,
                concepts=[
                    Concept(
                        name=s.name,
                        images=s.images,
                        init=s.init,
                        class_noun=s.class_noun,
                        kind="style" if s.style else "object",
                    )
                    for s in self.concepts
                ],
                method=METHOD_TRAINING[method][1],
                init=METHOD_TRAINING[method][2],
                steps=c.steps,
                batch_size=c.batch_size,
                max_batch=max_batch,
                resolution=self.resolution,
                seed=c.seed,
                precision=c.precision,
                device=c.device,
                export_ti_rescaled=(tm == "ti" and "ti-rescaled" in c.methods),
                resume=True,
                checkpoint_every=max(1, min(100, c.steps)),
                progress=c.progress,
            )
            result = train(cfg)
            return {
                "train_seconds": round(result.seconds, 3),
                "samples_per_second": round(result.samples_per_second, 2),
            }

        exist = all((folder / s.name / "concept.json").is_file() for s in self.concepts)
        self._stage(f"train:{tm}", self.train_fp(method), exist, work)

    def generate(self, method: str) -> None:
        from .concept_files import read_concept
        from .generate import generate

        folder = self.out / "images" / method
        c = self.cfg

        intact = _intact(folder / "images.json", "records", "run")

        def work(changed: bool):
            if (changed or not intact) and folder.exists():  # other settings, or a damaged manifest
                shutil.rmtree(folder)
            concepts = [read_concept(self.concept_dir(method, s.name)) for s in self.concepts]
            res = generate(
                None,
                concepts,
                self.prompts,
                folder,
                seeds=c.seeds,
                steps=c.inference_steps,
                guidance=c.guidance,
                batch_size=c.gen_batch_size,
                pipe=self.pipe(),
            )
            return {"images": len(res.records), "generated": res.generated}

        self._stage(f"generate:{method}", self.generate_fp(method), intact, work)

    def score(self, method: str) -> None:
        from .evaluate import evaluate_generated

        path = self.out / "scores" / f"{method}.json"
        c = self.cfg

        def work(changed: bool):
            refs = {s.name: s.images for s in self.subjects}
            masks = {s.name: Path(c.masks_dir) / s.name for s in self.subjects} if c.masks_dir else None
            result = evaluate_generated(
                self.out / "images" / method, refs, self.evaluator(), masks=masks, concepts=list(refs)
            )
            write_json(result, path)
            return {}

        self._stage(f"score:{method}", self.score_fp(method), _intact(path, "mean", "subjects", "images"), work)

    def score_style(self, method: str) -> None:
        """Style concepts: Image / CLIP-I against the style's images (unmasked), Text / CLIP-T of the
        prompt with the style's class words, and Content: SigLIP of the prompt's subject alone."""
        from .evaluate import evaluate_generated

        path = self.out / "scores" / f"{method}-style.json"

        def work(changed: bool):
            refs = {s.name: s.images for s in self.styles}
            result = evaluate_generated(
                self.out / "images" / method, refs, self.evaluator(), concepts=list(refs), content=self.style_content
            )
            write_json(result, path)
            return {}

        intact = _intact(path, "mean", "subjects", "images")
        self._stage(f"score-style:{method}", self.score_style_fp(method), intact, work)

    def slerp(self) -> dict[str, dict[str, str]]:
        """Strips between two subjects: DTI (slerp) and, when trained, TI (lerp vs slerp)."""
        from .concept_files import read_concept
        from .interpolate import interpolate_concepts

        strips: dict[str, dict[str, str]] = {}
        pair = self._slerp_pair()
        if pair is None:
            self.log("[suite] slerp: no two subjects with the same vector count; no strip")
            return strips
        a, b = pair
        for tm in ("dti", "ti"):
            if not any(self.train_method(m) == tm for m in self.cfg.methods):
                continue
            folder = self.out / "slerp" / tm
            fp = _hash(
                {
                    "train": self.train_fp(tm),
                    "pair": pair,
                    "steps": self.cfg.slerp_steps,
                    "seed": self.cfg.seed,
                    "inference_steps": self.cfg.inference_steps,
                    "guidance": self.cfg.guidance,
                }
            )

            def work(changed: bool, tm=tm, folder=folder):
                if folder.exists():
                    shutil.rmtree(folder)
                ca = read_concept(self.out / "train" / tm / a)
                cb = read_concept(self.out / "train" / tm / b)
                res = interpolate_concepts(
                    ca,
                    cb,
                    folder,
                    steps=self.cfg.slerp_steps,
                    mode="slerp" if tm == "dti" else "both",
                    images=True,
                    pipe=self.pipe(),
                    prompt="a photo of {}",
                    seed=self.cfg.seed,
                    inference_steps=self.cfg.inference_steps,
                    guidance=self.cfg.guidance,
                )
                return {"strips": {k: str(v.relative_to(self.out)) for k, v in res.strips.items()}}

            meta_ok = (folder / "interpolation.json").is_file()
            self._stage(f"slerp:{tm}", fp, meta_ok, work)
            strips[tm] = self.state.data["stages"][f"slerp:{tm}"].get("strips", {})
        return strips

    def _slerp_pair(self) -> tuple[str, str] | None:
        from .concept_files import read_concept

        names = [s.name for s in self.subjects]
        if self.cfg.slerp_pair:
            a, b = self.cfg.slerp_pair
            for n in (a, b):
                if n not in names:
                    raise ValueError(f"slerp pair subject {n!r} is not among the suite's subjects ({', '.join(names)})")
            return a, b
        tm = "dti" if any(self.train_method(m) == "dti" for m in self.cfg.methods) else "ti"
        counts = {n: read_concept(self.out / "train" / tm / n).n_vectors for n in names}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if counts[a] == counts[b]:
                    return a, b
        return None

    # -- report ----------------------------------------------------------------------------

    def vocab_norms(self) -> list[list[float]]:
        """Row norms of each text encoder's original vocabulary (cached in the output folder)."""
        cache = self.out / "vocab_norms.json"
        fp = _hash({"model": self.cfg.model})
        if cache.is_file():
            try:
                data = json.loads(cache.read_text(encoding="utf-8"))
            except ValueError:
                data = None  # damaged: read the norms again
            if isinstance(data, dict) and data.get("fingerprint") == fp and _norm_lists(data.get("norms")):
                return data["norms"]
        norms = [[float(v) for v in n] for n in _read_vocab_norms(self.resolved)]
        write_json({"fingerprint": fp, "norms": norms}, cache)
        return norms


#: Files a metric model folder needs beside config.json: (what, any of these names).
_METRIC_FILES = {
    "weights": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
    "preprocessor_config.json": ("preprocessor_config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model"),
}


def check_metric_models(
    dino: str | Path | None, siglip: str | Path | None, clip: str | Path | None, metrics: Sequence[str]
) -> None:
    """Check, loading no weights, that each metric model the chosen ``metrics`` use resolves as
    :mod:`dti_fast.evaluate` will load it: a folder with a config.json of the right kind of model, its
    weights and preprocessor (and tokenizer for SigLIP/CLIP), or a hub id (in the Hugging Face cache when
    the hub cannot be reached). Raises naming the flag (``--dino-model``, ...) and the fix."""
    from .evaluate import Evaluator

    used = Evaluator(dino=dino, siglip=siglip, clip=clip, metrics=list(metrics)).model_names()
    for what, model in used.items():
        try:
            _check_metric_model(what, model)
        except (OSError, ValueError) as err:
            msg = err.strerror if isinstance(err, OSError) and err.strerror and err.filename is None else str(err)
            raise type(err)(f"--{what}-model: {msg}") from None


def _check_metric_model(what: str, model: str) -> None:
    import transformers

    from .evaluate import ClipScorer, DinoScorer, SiglipScorer, _load_error, _source
    from .models import _cached_snapshot, check_safetensors_files, offline_by_env

    src, kw = _source(model, what)  # a file, a missing folder, a folder without config.json: refused here
    folder = Path(src) if Path(src).is_dir() else None
    if folder is None and kw.get("local_files_only"):  # a hub id and no hub: it must be in the cache
        folder = _cached_snapshot(src, None, None)
        if folder is None:
            why = "HF_HUB_OFFLINE=1 is set" if offline_by_env() else "this machine cannot reach the hub"
            raise _load_error(what, model, FileNotFoundError(f"not in the Hugging Face cache, and {why}"))
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder) if folder else src, **kw)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(what, model, err) from None
    try:
        with torch.device("meta"):  # the model's class, built without memory or weights
            net = transformers.AutoModel.from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise _load_error(what, model, err) from None
    scorer = {"dino": DinoScorer, "siglip": SiglipScorer, "clip": ClipScorer}[what]
    probe = scorer.__new__(scorer)  # the scorer's own check of the model's kind, without loading it
    probe.name, probe.model = model, net
    probe._check()
    if folder is not None:
        needed = dict(_METRIC_FILES)
        if what == "dino":
            del needed["tokenizer"]
        lacking = [k for k, names in needed.items() if not any((folder / n).is_file() for n in names)]
        shown = model if Path(model).expanduser() == folder else f"{model} ({folder})"
        if lacking:
            raise FileNotFoundError(
                f"{what} model {shown} has no {' and no '.join(lacking)}; pass a complete folder written by "
                "save_pretrained (the model and its processor), or download the model again"
            )
        check_safetensors_files(folder, folder, shown)  # a truncated weights file: refused now, not at scoring


def _norm_lists(value: Any) -> bool:
    """Whether a cached vocab_norms.json value is what :meth:`_Run.vocab_norms` writes: lists of numbers."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) for v in value)
    )


def _local_index(resolved) -> dict:
    """A local model's model_index.json ({} for a hub id, or a file that is not a JSON object)."""
    if not resolved.local:
        return {}
    try:
        index = json.loads((Path(resolved.source) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


#: Weight names of the input-embedding table, per text-encoder kind (CLIP, Gemma-2, UMT5).
_TABLE_KEYS = ("token_embedding.weight", "embed_tokens.weight", "shared.weight")


def _read_vocab_norms(resolved) -> list[torch.Tensor]:
    """Norms of the token-embedding rows of text_encoder (and text_encoder_2), read from the weights file
    when local (no model build), else through transformers."""
    from safetensors import safe_open

    subfolders = ["text_encoder"] + (["text_encoder_2"] if resolved.family == "sdxl" else [])
    out = []
    for sub in subfolders:
        table = None
        folder = Path(resolved.source) / sub
        if resolved.local and folder.is_dir():
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as fh:
                    key = next((k for k in fh.keys() if k.endswith(_TABLE_KEYS)), None)
                    if key is not None:
                        table = fh.get_tensor(key)
                        break
        if table is None:
            from transformers import AutoModel, CLIPTextModel

            kw = {"local_files_only": True} if resolved.local else dict(resolved.hub_kwargs)
            cls = AutoModel if resolved.family in ("sana", "wan") else CLIPTextModel
            table = cls.from_pretrained(resolved.source, subfolder=sub, **kw).get_input_embeddings().weight
        n = torch.linalg.vector_norm(table.detach().float(), dim=-1)
        out.append(n[n > 0])
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f}"


def _write_report(run: _Run, strips: dict[str, dict[str, str]], seconds: float) -> tuple[Path, Path, dict, dict]:
    from .concept_files import read_concept
    from .evaluate import METRIC_LABELS, METRICS
    from .plots import norm_histogram, scatter_plot
    from .testing import is_tiny_metric_model

    cfg, out = run.cfg, run.out
    scores = {m: json.loads((out / "scores" / f"{m}.json").read_text(encoding="utf-8")) for m in cfg.methods}
    metrics = [m for m in METRICS if m in cfg.metrics]
    table = {m: {k: scores[m]["mean"].get(k) for k in metrics} for m in cfg.methods}
    per_subject = {m: scores[m]["subjects"] for m in cfg.methods}
    style_metrics: list[str] = []
    style_table: dict[str, dict[str, float]] = {}
    style_per_subject: dict[str, dict] = {}
    style_images: dict[str, int] = {}
    if run.styles:
        style_scores = {
            m: json.loads((out / "scores" / f"{m}-style.json").read_text(encoding="utf-8")) for m in cfg.methods
        }
        style_metrics = [k for k in metrics for k in ((k, "content") if k == "text" else (k,))]
        style_table = {m: {k: style_scores[m]["mean"].get(k) for k in style_metrics} for m in cfg.methods}
        style_per_subject = {m: style_scores[m]["subjects"] for m in cfg.methods}
        style_images = {m: sum(style_scores[m]["images"].values()) for m in cfg.methods}
    random_metrics = {
        k: is_tiny_metric_model(v)
        for k, v in (("dino", cfg.dino_model), ("siglip", cfg.siglip_model), ("clip", cfg.clip_model))
        if v
    }
    tiny_model = bool(_local_index(run.resolved).get("_dti_fast_tiny"))

    # Learned norms per method and subject (per encoder), and the vocabulary's.
    norms: dict[str, dict[str, list[list[float]]]] = {}
    scales: list[float | None] = []
    for m in cfg.methods:
        norms[m] = {}
        for s in run.concepts:
            c = read_concept(run.concept_dir(m, s.name))
            norms[m][s.name] = [[float(x) for x in torch.linalg.vector_norm(v, dim=-1)] for v in c.vectors]
            if not scales:
                scales = [e.get("vocab_scale") for e in c.info.get("encoders", [])]
    vocab = run.vocab_norms()

    plots_dir = out / "plots"
    plots: dict[str, str] = {}
    if "image" in metrics and "text" in metrics:
        series = {
            m: {
                "points": [
                    (v.get("text", float("nan")), v.get("image", float("nan"))) for v in per_subject[m].values()
                ],
                "mean": (table[m]["text"], table[m]["image"]),
            }
            for m in cfg.methods
        }
        img = scatter_plot(
            series,
            title="Subject similarity vs text fidelity (dots: subjects, discs: mean)",
            xlabel="Text (SigLIP)",
            ylabel="Image (DINOv2)",
        )
        atomic_write(plots_dir / "tradeoff.png", lambda tmp: img.save(tmp, format="PNG"))
        plots["tradeoff"] = "plots/tradeoff.png"
    for e, vn in enumerate(vocab):
        marks = {m: [x for s in norms[m].values() for x in s[e]] for m in cfg.methods}
        img = norm_histogram(
            vn,
            marks,
            reference=scales[e] if e < len(scales) else None,
            title=f"Text encoder {e + 1}: vocabulary norms (grey) and learned vectors (ticks)",
        )
        name = f"norms_encoder{e + 1}.png"
        atomic_write(plots_dir / name, lambda tmp, img=img: img.save(tmp, format="PNG"))
        plots[f"norms_encoder{e + 1}"] = f"plots/{name}"

    n_images = {m: sum(scores[m]["images"].values()) for m in cfg.methods}
    report = {
        "title": "dti_fast benchmark: TI vs DTI",
        "quick": cfg.quick,
        "smoke_test": cfg.quick or tiny_model or any(random_metrics.values()),
        "random_weight_metric_models": random_metrics,
        "tiny_diffusion_model": tiny_model,
        "model": str(cfg.model),
        "family": run.resolved.family,
        "data": str(cfg.data_dir),
        "subjects": [asdict(s) | {"images": str(s.images)} for s in run.subjects],
        "methods": list(cfg.methods),
        "settings": {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "max_batch": cfg.max_batch,
            "resolution": run.resolution,
            "seed": cfg.seed,
            "prompt_set": cfg.prompt_set,
            "prompts_per_subject": {s: len(p) for s, p in run.prompts.items()},
            "seeds": cfg.seeds,
            "inference_steps": cfg.inference_steps,
            "guidance": cfg.guidance,
            "scheduler": cfg.scheduler,
            "masks": str(cfg.masks_dir) if cfg.masks_dir else None,
        },
        "metric_models": scores[cfg.methods[0]].get("models", {}),
        "table": table,
        "per_subject": per_subject,
        "images": n_images,
        "norms": norms,
        "vocab_scale": scales,
        "vocab_norm_stats": [
            {"mean": float(torch.tensor(v).mean()), "std": float(torch.tensor(v).std()), "min": min(v), "max": max(v)}
            for v in vocab
        ],
        "paper_sdxl": {k: {"image": v[0], "text": v[1]} for k, v in PAPER_SDXL.items()},
        "styles": [asdict(s) | {"images": str(s.images)} for s in run.styles],
        "style_prompts": len(run.style_content),
        "style_metrics": style_metrics,
        "style_table": style_table,
        "style_per_subject": style_per_subject,
        "style_images": style_images,
        "plots": plots,
        "strips": strips,
        "stage_seconds": {k: v.get("seconds") for k, v in run.state.data["stages"].items()},
        "seconds_this_run": round(seconds, 2),
    }
    json_path = write_json(report, out / "report.json")
    md = _markdown(report, metrics, METRIC_LABELS)
    md_path = atomic_write(out / "report.md", lambda tmp: tmp.write_text(md, encoding="utf-8"))
    return json_path, md_path, table, style_table


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _markdown(r: dict, metrics: list[str], labels: dict[str, str]) -> str:
    L: list[str] = []
    L.append(f"# {r['title']}\n")
    if r["smoke_test"]:
        why = []
        if r["tiny_diffusion_model"]:
            why.append("the diffusion model is dti_fast's tiny random-weight SD model")
        rnd = [k for k, v in r["random_weight_metric_models"].items() if v]
        if rnd:
            why.append(f"the metric models ({', '.join(rnd)}) are tiny RANDOM-WEIGHT stand-ins")
        text = "; ".join(why)
        L.append(
            "> **Smoke test (`--quick`), not a benchmark.** "
            + text[:1].upper()
            + text[1:]
            + ". The numbers below check that the protocol runs end to end; they say nothing about TI or DTI.\n"
        )
    s = r["settings"]
    L.append("## Setup\n")
    L.append(
        f"- Model: `{r['model']}` ({r['family']}); data: `{r['data']}`; {len(r['subjects'])} subjects: "
        + ", ".join(f'{x["name"]} ({x["class_noun"]}, init "{x["init"]}")' for x in r["subjects"])
    )
    L.append(
        f"- Training: {s['steps']} steps, batch {s['batch_size']} per subject, resolution {s['resolution']}, "
        f"seed {s['seed']}; every subject of a method in one job"
    )
    n_prompts = sorted(set(s["prompts_per_subject"].values()))
    L.append(
        f"- Generation: prompt set `{s['prompt_set']}` ({'/'.join(map(str, n_prompts))} prompts per subject) x "
        f"seeds {s['seeds']}, {s['inference_steps']} steps, guidance {s['guidance']}, scheduler {s['scheduler']}"
    )
    L.append(
        "- Metrics: "
        + ", ".join(f"{k}: `{v}`" for k, v in r["metric_models"].items())
        + (f"; references masked with `{s['masks']}`" if s["masks"] else "; references unmasked")
        + ". Per image (Image, CLIP-I: mean over the subject's references), mean per subject, then mean over "
        "subjects. Text scores use the prompt with the class noun in place of the placeholder.\n"
    )
    L.append("## Results\n")
    L.append("| Method | " + " | ".join(labels[m] for m in metrics) + " | images |")
    L.append("| --- | " + " | ".join("---:" for _ in metrics) + " | ---: |")
    for m, row in r["table"].items():
        L.append(f"| {_label(m)} | " + " | ".join(_fmt(row.get(k)) for k in metrics) + f" | {r['images'][m]} |")
    L.append("")
    L.append(
        "For reference, the paper's SDXL numbers (Image / Text): "
        + ", ".join(f"{_label(k)} {v['image']:.3f} / {v['text']:.3f}" for k, v in r["paper_sdxl"].items())
        + ".\n"
    )
    L.append("### Learned vector norms\n")
    L.append("| Method | text encoder | mean norm | min | max | vocabulary m* (mean row norm) |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    n_enc = max((len(v) for per in r["norms"].values() for v in per.values()), default=1)
    for e in range(n_enc):
        for m, per in r["norms"].items():
            vals = [x for v in per.values() if e < len(v) for x in v[e]]
            if not vals:
                continue
            scale = r["vocab_scale"][e] if e < len(r["vocab_scale"]) else None
            L.append(
                f"| {_label(m)} | {e + 1} | {_fmt(sum(vals) / len(vals), 4)} | {_fmt(min(vals), 4)} | "
                f"{_fmt(max(vals), 4)} | {_fmt(scale, 4)} |"
            )
    L.append("")
    L += _style_section(r, labels)
    L.append("## Plots\n")
    if "tradeoff" in r["plots"]:
        L.append(
            "Subject similarity against text fidelity: a disc per method (the mean over subjects), a ring per "
            "subject. Up and right is better.\n"
        )
        L.append(f"![Image vs Text]({r['plots']['tradeoff']})\n")
    for k, v in r["plots"].items():
        if k.startswith("norms_"):
            L.append(
                f"Learned vector norms ({k.split('_')[1].replace('encoder', 'text encoder ')}, ticks per method) "
                "against the histogram of the vocabulary's row norms; the dashed line is m*.\n"
            )
            L.append(f"![{k}]({v})\n")
    for tm, strips in r["strips"].items():
        if "all" in strips:  # TI: lerp and slerp rows in one image
            L.append(
                f"**{_label(tm)}: lerp (top) vs slerp (bottom)** between two subjects:\n\n"
                f"![{tm} lerp vs slerp]({strips['all']})\n"
            )
            continue
        for mode, path in strips.items():
            L.append(
                f"**{_label(tm)} {mode}** between two subjects (fixed norm m*, one seed):\n\n![{tm} {mode}]({path})\n"
            )
    L.append("## Appendix: per subject\n")
    cols = [(m, k) for m in r["table"] for k in metrics]
    L.append("| Subject | " + " | ".join(f"{_label(m)} {labels[k].split(' ')[0]}" for m, k in cols) + " |")
    L.append("| --- | " + " | ".join("---:" for _ in cols) + " |")
    for subj in [x["name"] for x in r["subjects"]]:
        L.append(f"| {subj} | " + " | ".join(_fmt(r["per_subject"][m].get(subj, {}).get(k)) for m, k in cols) + " |")
    L.append("")
    L.append("Stage times (s): " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in r["stage_seconds"].items()) + ".\n")
    return "\n".join(L)


def _style_section(r: dict, labels: dict[str, str]) -> list[str]:
    """The report's "Style concepts" section (a one-line note when the run has none)."""
    if not r["styles"]:
        return ["No style concepts in this run (`--style-data` adds them).\n"]
    keys = r["style_metrics"]
    head = {**labels, "image": "Style (DINOv2)", "clip_i": "Style CLIP-I"}
    L = ["## Style concepts\n"]
    L.append(
        f"{len(r['styles'])} styles: "
        + ", ".join(f'{x["name"]} ({x["class_noun"]}, init "{x["init"]}")' for x in r["styles"])
        + f'; trained with the style templates in the same jobs; {r["style_prompts"]} prompts "<subject> in '
        "<style> style\" x the seeds each. Style (DINOv2) and Style CLIP-I: cosine to the style's reference "
        "images (unmasked), averaged. Text (SigLIP) and CLIP-T: the whole prompt with the style's class words "
        "in place of its placeholder, as in the authors' style evaluation. Content (SigLIP): the subject "
        'alone ("a lighthouse"): whether the style token leaves the rest of the prompt its say.\n'
    )
    L.append("| Method | " + " | ".join(head[k] for k in keys) + " | images |")
    L.append("| --- | " + " | ".join("---:" for _ in keys) + " | ---: |")
    for m, row in r["style_table"].items():
        L.append(f"| {_label(m)} | " + " | ".join(_fmt(row.get(k)) for k in keys) + f" | {r['style_images'][m]} |")
    L.append("")
    cols = [(m, k) for m in r["style_table"] for k in keys]
    L.append("Per style:\n")
    short = {"image": "Style", "text": "Text", "content": "Content", "clip_i": "Style-CLIP-I", "clip_t": "CLIP-T"}
    L.append("| Style | " + " | ".join(f"{_label(m)} {short.get(k, k)}" for m, k in cols) + " |")
    L.append("| --- | " + " | ".join("---:" for _ in cols) + " |")
    for name in [x["name"] for x in r["styles"]]:
        vals = [_fmt(r["style_per_subject"][m].get(name, {}).get(k)) for m, k in cols]
        L.append(f"| {name} | " + " | ".join(vals) + " |")
    L.append("")
    return L


def run_suite(cfg: SuiteConfig) -> SuiteResult:
    """Run (or resume) the benchmark; returns where the report is and the table."""
    t0 = time.perf_counter()
    if cfg.quick:
        cfg.apply_quick()
    cfg.validate()
    run = _Run(cfg)
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    write_json({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, out / "suite_config.json")
    trained = []
    for m in cfg.methods:
        tm = run.train_method(m)
        if tm not in trained:
            run.train(m)
            trained.append(tm)
    for m in cfg.methods:
        run.generate(m)
    for m in cfg.methods:
        run.score(m)
    if run.styles:
        for m in cfg.methods:
            run.score_style(m)
    strips = run.slerp()
    seconds = time.perf_counter() - t0
    json_path, md_path, table, style_table = _write_report(run, strips, seconds)
    run.log(f"[suite] report: {md_path} ({seconds:.1f} s)")
    return SuiteResult(out, json_path, md_path, table, run.ran, run.skipped, seconds, style_table)
