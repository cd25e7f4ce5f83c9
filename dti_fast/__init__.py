"""dti_fast: Directional Textual Inversion for diffusers models.

The optimizer (:class:`SphericalSGD`) and the sphere math (:mod:`dti_fast.sphere`)
are importable without diffusers.
"""

from .optim import SphericalSGD, spherical_sgd, triton_available
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
    "triton_available",
    "norm_scale",
    "project_tangent",
    "project_to_sphere",
    "project_to_sphere_",
    "retract",
    "slerp",
    "spherical_sgd_step_reference",
    "vmf_prior_grad",
]
