"""Packaging: every subpackage is installed, and kernels/ never shadows Hugging Face's `kernels`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_packages() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return [elt.value for elt in node.value.elts]
    raise AssertionError("setup.py lists no packages")


def test_setup_installs_every_subpackage():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dti_fast").rglob("__init__.py")}
    assert found | {"dti_fast.kernels"} == set(_setup_packages())


def _run_in_root(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    # -c puts the current folder (the repository root) first on sys.path, as `python` run there does.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)


def test_top_level_kernels_looks_absent_without_the_hub_package():
    code = (
        "import kernels\n"
        "assert kernels.__file__ is None and not hasattr(kernels, '__version__')\n"
        "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('absent')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print(is_kernels_available())\n"
    )
    done = _run_in_root(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["absent", "False"]


def test_the_hub_package_wins_when_it_is_installed(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def get_kernel():\n    return 'hub'\n")
    done = _run_in_root("from kernels import get_kernel; print(get_kernel())", extra_path=str(tmp_path / "site"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hub"


def test_dti_fast_kernels_still_imports_from_the_root():
    done = _run_in_root("import dti_fast.kernels.spherical_sgd as k; print(k.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dti_fast.kernels.spherical_sgd"
