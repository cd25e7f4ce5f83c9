"""Stand-ins for tests, benchmarks and the demo: nothing here is needed to train real models.

- :mod:`.tiny`: tiny random-weight SD / SDXL / SANA / Wan models in diffusers' folder
  layout (real tokenizers, real architecture families), built once and cached; SANA and
  Wan come from :mod:`.tiny_flow`, their Gemma / T5 kind tokenizers from :mod:`.tokenizers`.
- :mod:`.metric_models`: tiny random-weight DINOv2 / SigLIP / CLIP models.
- :mod:`.styles`: procedural style reference images (two made-up styles).
- :mod:`.archs`: SD 1.5 and SDXL at their real sizes with random weights, for
  speed and memory figures.
"""

from .metric_models import is_tiny_metric_model, make_tiny_metric_models, tiny_metric_models_path
from .styles import make_style_images, tiny_styles_path
from .tiny import (
    TINY_RESOLUTION,
    TINY_VERSION,
    clip_tokenizer,
    clip_tokenizer_files,
    make_tiny_model,
    tiny_model_path,
    write_model_folder,
)

__all__ = [
    "TINY_RESOLUTION",
    "TINY_VERSION",
    "clip_tokenizer",
    "clip_tokenizer_files",
    "is_tiny_metric_model",
    "make_tiny_metric_models",
    "make_style_images",
    "make_tiny_model",
    "tiny_metric_models_path",
    "tiny_model_path",
    "tiny_styles_path",
    "write_model_folder",
]
