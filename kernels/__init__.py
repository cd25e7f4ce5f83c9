"""Triton kernels of dti_fast, installed as ``dti_fast.kernels`` (setup.py maps this folder there).

Each module holds one kernel and its launcher; importing one needs Triton.

Python started in the repository root sees this folder as a top-level package
named ``kernels``, the name of Hugging Face's kernel hub package (which
transformers and bitsandbytes look for). Imported under that name, this
package steps aside: it loads the real ``kernels`` from the rest of
``sys.path`` when one is installed, and otherwise stays an empty package with
no ``__file__`` and no version, which is how those libraries recognise a
folder that is not an installed package.
"""

if __name__ == "kernels":  # not dti_fast.kernels: the repository root is on sys.path
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    )
    if _spec is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
    else:
        __file__ = None  # noqa: F811  (as a PEP 420 namespace package has none)
        __path__ = []
    del _machinery, _util, _os, _sys, _root, _spec
