"""A stand-in for torchvision holding only what diffusers' textual_inversion.py uses.

bench/compare_diffusers.py puts the folder above this one on the PYTHONPATH of
the example script's subprocess only, where no torchvision wheel imports beside
the installed torch (see bench/README.md). The script uses one transform,
``transforms.RandomHorizontalFlip`` on PIL images; nothing else is provided.
"""

__version__ = "0.0.0+dti-fast-shim"
