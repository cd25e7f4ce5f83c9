"""dti_fast: Directional Textual Inversion for diffusers models.

The optimizer (:class:`SphericalSGD`) and the sphere math (:mod:`dti_fast.sphere`)
are importable without diffusers. :func:`load_concepts` and :func:`read_concept`
(:mod:`dti_fast.concept_files`) are imported on first use.
"""

from .optim import SphericalSGD, pack_params_, spherical_sgd, triton_available
from .sphere import (
    norm_scale,
    project_tangent,
    project_to_sphere,
    project_to_sphere_,
    retract,
    slerp,
    spherical_sgd_step_reference,
    vmf_prior_grad,
)

__version__ = "0.1.0"

__all__ = [
    "SphericalSGD",
    "spherical_sgd",
    "pack_params_",
    "triton_available",
    "norm_scale",
    "project_tangent",
    "project_to_sphere",
    "project_to_sphere_",
    "retract",
    "slerp",
    "spherical_sgd_step_reference",
    "vmf_prior_grad",
    "load_concepts",
    "read_concept",
]

_LAZY = {"load_concepts": "concept_files", "read_concept": "concept_files"}


def __getattr__(name: str):
    """``dti_fast.load_concepts`` / ``dti_fast.read_concept``, imported when first used."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
