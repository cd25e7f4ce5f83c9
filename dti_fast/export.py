"""Writing learned concepts in the formats other tools load, from plain concept records.

Per concept, under ``<output>/<concept>/``:

- ``learned_embeds.safetensors``: diffusers' format, ``{placeholder: (n_vectors, dim)}``
  for the first text encoder; ``learned_embeds_2.safetensors`` for SDXL's second.
  ``pipe.load_textual_inversion(folder_or_file)`` loads it; multi-vector
  concepts expand to ``<name> <name>_1 ...`` as diffusers does.
- Files named by the concept's trigger (A1111/ComfyUI type the file name): SD
  ``<trigger>.safetensors`` (``emb_params``) and ``<trigger>.pt`` (``string_to_param``, legacy
  pickle); SDXL ``<trigger>.safetensors`` with ``clip_l`` and ``clip_g``
  (:mod:`dti_fast.concept_files`).
- ``concept.json``: what was trained (method, m*, norms, steps, initializer), the trigger and
  the word to type in each client.
- With ``ti_rescaled`` (TI only): the same files under ``rescaled/``
  with every vector scaled to the vocabulary's m* (the paper's TI-rescaled).

Exported vectors are ``m* * v`` for DTI, so any TI loader uses them as is.
The trainer hands over records, never itself: this module knows nothing of jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .concept_files import client_info, concept_trigger, recorded_model, rescaled_trigger, write_concept_files
from .data import Concept
from .io import atomic_write, write_json

if TYPE_CHECKING:  # pragma: no cover
    from .models import ModelParts

__all__ = ["ConceptRecord", "EncoderVectors", "export_concepts", "validation_grids"]


@dataclass
class EncoderVectors:
    """One concept's learned vectors for one text encoder."""

    vectors: torch.Tensor  # (n_vectors, dim) fp32 on the CPU, as exported (m* * v for DTI)
    scale: float | None  # DTI's fixed norm m*; None for TI
    vocab_scale: float  # the vocabulary's m* statistic (what TI-rescaled rescales to)


@dataclass
class ConceptRecord:
    """What training produced for one concept: everything the exporters write."""

    concept: Concept
    tokens: list[str]
    prompt_string: str
    method: str
    steps: int
    stopped: str | None  # why the concept was stopped early, or None
    fingerprint: str
    model: str
    family: str
    encoders: list[EncoderVectors]

    @property
    def name(self) -> str:
        return self.concept.name

    def info(self) -> dict[str, Any]:
        """The concept.json content."""
        c = self.concept
        return {
            "name": c.name,
            "placeholder": c.placeholder,
            "tokens": self.tokens,
            "prompt_string": self.prompt_string,
            "init": c.init,
            "class_noun": c.class_noun,
            "kind": c.kind,
            "method": self.method,
            "steps": self.steps,
            "status": f"stopped: {self.stopped}" if self.stopped else "complete",
            "fingerprint": self.fingerprint,
            "model": recorded_model(self.model),  # an existing path made absolute: generate finds it from anywhere
            "family": self.family,
            "encoders": [
                {
                    "scale": e.scale,
                    "vocab_scale": e.vocab_scale,
                    "dim": int(e.vectors.shape[-1]),
                    "norms": [float(n) for n in torch.linalg.vector_norm(e.vectors, dim=-1)],
                }
                for e in self.encoders
            ],
        }


def export_concepts(output_dir: Path, records: list[ConceptRecord], ti_rescaled: bool = False) -> dict[str, Path]:
    """Write every concept's files under ``<output_dir>/<name>/``; returns the folders."""
    dirs = {}
    for r in records:
        folder = Path(output_dir) / r.name
        dirs[r.name] = folder
        vectors = [e.vectors for e in r.encoders]
        trigger = concept_trigger(r.concept, r.method)
        info = {**r.info(), **client_info(trigger, r.concept.placeholder, r.family)}
        if not all(bool(torch.isfinite(v).all()) for v in vectors):
            # Never hand a client NaN/inf vectors: only concept.json says what happened.
            info["status"] = "failed: its vectors are not finite, so no embedding file was written"
            write_json(info, folder / "concept.json")
            continue
        write_concept_files(folder, r.name, r.concept.placeholder, vectors, r.family, r.steps, trigger=trigger)
        if ti_rescaled and r.method == "ti":
            rescaled = [
                e.vectors / torch.linalg.vector_norm(e.vectors, dim=-1, keepdim=True) * e.vocab_scale
                for e in r.encoders
            ]
            write_concept_files(
                folder / "rescaled",
                r.name,
                r.concept.placeholder,
                rescaled,
                r.family,
                r.steps,
                trigger=rescaled_trigger(trigger),
            )
            info["rescaled"] = "rescaled/"
            info["rescaled_trigger"] = rescaled_trigger(trigger)
        write_json(info, folder / "concept.json")
    return dirs


def validation_grids(
    parts: ModelParts,
    records: list[ConceptRecord],
    output_dir: Path,
    prompts: list[str],
    *,
    steps: int,
    seed: int,
    resolution: int,
    filename: str = "samples.png",
) -> list[Path]:
    """Generate each prompt (``{}`` = the concept) with the learned vectors; save ``<concept>/<filename>``.

    ``parts`` must hold the concepts' tokens and rows (as the trainer's embeddings do).
    """
    from .concept_files import DIFFUSERS_ONLY_FAMILIES
    from .generate import render
    from .models import pipeline_from_parts
    from .plots import image_grid

    pipe = pipeline_from_parts(parts)
    written = []
    for r in records:
        # The bare placeholder: diffusers' pipelines expand it to all of the concept's tokens.
        word = r.concept.placeholder if r.family not in DIFFUSERS_ONLY_FAMILIES else r.prompt_string
        texts = [p.replace("{}", word) for p in prompts]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            images = render(pipe, texts, gen, steps=steps, height=resolution, width=resolution)
        sheet = image_grid(images, columns=min(4, len(images)))
        path = Path(output_dir) / r.name / filename
        atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
        written.append(path)
    return written
