"""Writing learned concepts in the formats other tools load.

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
- With ``export_ti_rescaled`` (TI only): the same files under ``rescaled/``
  with every vector scaled to the vocabulary's m* (the paper's TI-rescaled).

Exported vectors are ``m* * v`` for DTI, so any TI loader uses them as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .concept_files import client_info, concept_trigger, rescaled_trigger, write_concept_files
from .io import write_json
from .sphere import norm_scale

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import _Job

__all__ = ["export_job", "write_concept_files", "validation_grids"]


def export_job(job: "_Job", write: bool = True) -> tuple[dict[str, Path], dict[str, list[torch.Tensor]]]:
    """Export every concept of a finished job; returns the folders and the vectors.

    ``write=False`` (data-parallel ranks other than the main one) only returns them.
    """
    cfg = job.cfg
    out = Path(cfg.output_dir)
    dirs, all_vectors = {}, {}
    vocab_scales = [norm_scale(emb.base.weight, cfg.norm_scale) for emb in job.embeddings]
    for i, c in enumerate(cfg.concepts):
        folder = out / c.name
        vectors = [emb.vectors(i).cpu() for emb in job.embeddings]
        steps = job.done[c.name]
        dirs[c.name] = folder
        all_vectors[c.name] = vectors
        if not write:
            continue
        trigger = concept_trigger(c, cfg.method)
        write_concept_files(folder, c.name, c.placeholder, vectors, job.parts.family, steps, trigger=trigger)
        info = {
            "name": c.name,
            "placeholder": c.placeholder,
            "tokens": job.tokens[0][i].tokens,
            "prompt_string": job.tokens[0][i].prompt_string,
            "init": c.init,
            "class_noun": c.class_noun,
            "kind": c.kind,
            "method": cfg.method,
            "steps": steps,
            "status": ("stopped: " + job.stopped[c.name]) if c.name in job.stopped else "complete",
            "fingerprint": cfg.concept_fingerprint(c, job.data_world),
            "model": cfg.model,
            "family": job.parts.family,
            "encoders": [
                {
                    "scale": emb.scale if emb.spherical else None,
                    "vocab_scale": vocab_scales[e],
                    "dim": emb.embedding_dim,
                    "norms": [float(n) for n in torch.linalg.vector_norm(vectors[e], dim=-1)],
                }
                for e, emb in enumerate(job.embeddings)
            ],
            **client_info(trigger, c.placeholder, job.parts.family),
        }
        if cfg.export_ti_rescaled and cfg.method == "ti":
            rescaled = [
                v / torch.linalg.vector_norm(v, dim=-1, keepdim=True) * s for v, s in zip(vectors, vocab_scales)
            ]
            write_concept_files(folder / "rescaled", c.name, c.placeholder, rescaled, job.parts.family, steps,
                                trigger=rescaled_trigger(trigger))
            info["rescaled"] = "rescaled/"
            info["rescaled_trigger"] = rescaled_trigger(trigger)
        write_json(info, folder / "concept.json")
    return dirs, all_vectors


def _pipeline(job: "_Job"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = job.parts
    scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config)
    if parts.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], unet=parts.unet, scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0], unet=parts.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _grid(images: list, columns: int):
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for k, img in enumerate(images):
        sheet.paste(img, ((k % columns) * w, (k // columns) * h))
    return sheet


def validation_grids(job: "_Job") -> list[Path]:
    """Generate each validation prompt (``{}`` = the concept) with the learned vectors; save a grid per concept."""
    from .io import atomic_write

    cfg = job.cfg
    pipe = _pipeline(job)
    written = []
    for i, c in enumerate(cfg.concepts):
        # The bare placeholder: diffusers' pipelines expand it to all of the concept's tokens.
        prompts = [p.replace("{}", c.placeholder) for p in cfg.validation_prompts]
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        with torch.no_grad():
            images = pipe(
                prompts, num_inference_steps=cfg.validation_inference_steps, generator=gen,
                height=cfg.resolution, width=cfg.resolution,
            ).images
        sheet = _grid(images, columns=min(4, len(images)))
        path = Path(cfg.output_dir) / c.name / "samples.png"
        atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
        written.append(path)
    return written
