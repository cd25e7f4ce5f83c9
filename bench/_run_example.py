"""Run one of diffusers' example scripts unchanged, with a torchvision stand-in for its one transform.

Usage: ``python bench/_run_example.py SCRIPT [ARGS...]`` (what
``bench/compare_diffusers.py`` starts as the example's subprocess).

No torchvision wheel imports beside this environment's CPU torch, and
``examples/textual_inversion/textual_inversion.py`` imports
``torchvision.transforms`` for ``RandomHorizontalFlip`` alone. This launcher:

1. imports transformers' model code and diffusers first, so that their own
   "is torchvision installed?" checks see what is true here (it is not) and
   they take their torchvision-free paths;
2. then registers ``bench/_torchvision_shim/torchvision`` (that one transform,
   for PIL images, with torchvision's one ``torch.rand(1)`` draw per call) as
   ``torchvision``;
3. runs the script file as ``__main__`` with the given arguments
   (``runpy.run_path``), so the script itself is not edited.

The imports of step 1 are ones the script makes anyway; they only happen
first. Nothing else differs from ``python SCRIPT ARGS``.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_torchvision_shim")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python bench/_run_example.py SCRIPT [ARGS...]")
    script = os.path.abspath(sys.argv[1])
    if importlib.util.find_spec("torchvision") is None:
        import diffusers  # noqa: F401
        import transformers.modeling_utils  # noqa: F401  (its image utilities check for torchvision)

        sys.path.insert(0, SHIM)
        import torchvision.transforms  # noqa: F401  (the stand-in, now cached for the script)

        sys.path.remove(SHIM)
    sys.argv = [script, *sys.argv[2:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
