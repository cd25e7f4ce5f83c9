"""Crash-safe file writes and safe reads.

Every file dti_fast produces is written to a temporary file in the target
folder, flushed to disk, then renamed over the target: a reader (or a resumed
job) sees the old file or the new one, never half of one. Reads of untrusted
files never execute code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_write",
    "check_output_folder",
    "umask_modes",
    "first_line",
    "save_safetensors",
    "load_safetensors",
    "save_torch",
    "load_torch",
    "write_json",
]


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (for one-line errors)."""
    text = str(err)
    return text.splitlines()[0] if text else ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (of any type: safetensors and torch do not raise OSError) came from a full disk."""
    seen: BaseException | None = err
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC:
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "errno 28" in text.lower():
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically (fsynced).

    The file gets the mode the umask gives (as ``open`` would), not the temporary
    file's 0600. A full disk, whatever exception the writer raised for it,
    becomes ``OSError(ENOSPC)`` with a message that names the file and the fix;
    the target is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as err:
        tmp_path.unlink(missing_ok=True)
        if _disk_full(err, path.parent):
            raise OSError(
                errno.ENOSPC,
                f"disk full while writing {path}; free space on that disk (or choose "
                "another output folder) and rerun with --resume",
            ) from err
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (made contiguous, on the CPU) as a safetensors file, atomically."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU, with an error that names the file."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({err}); re-export it") from err


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save`` atomically (for A1111's .pt format; contents must be plain data and tensors)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that would run code is refused.

    The refusal does not repeat torch's own text, which suggests loading again with
    ``weights_only=False`` (the unsafe way), nor its warning about pickle protocols.
    """
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 ...": the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        why = "it holds Python objects beyond tensors and plain data, which could run code when loaded"
        if "Weights only load failed" not in str(err):  # not a pickle at all: cut short, or another file
            why = f"it is not a readable torch file ({first_line(err)})"
        raise ValueError(
            f"{path} was not loaded: {why}; no code from it ran. Use a .safetensors embedding, or re-export "
            "this one from a trusted source as tensors only"
        ) from None
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable torch file ({type(err).__name__}: {first_line(err)}); only tensors and "
            "plain data are read from .pt/.bin files: re-export it, as safetensors if you can"
        ) from None


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_output_folder(
    path: str | Path, *, owner: str, flag: str = "--output", marks: tuple[str, ...] = (), may_hold_others: bool = False
) -> Path:
    """Check, before any expensive work, that ``path`` can be a command's output folder; returns it.

    Raises ``ValueError`` in one line naming ``flag`` and the fix when the path is empty, is a
    file or lies under one, cannot be created or written (a read-only disk, permissions, an
    immutable folder: probed by creating the folder and a file in it, since ``os.access``
    says yes to root), or holds files but none of ``marks`` (the files ``owner`` writes
    there: what it would write over is someone else's, unless ``may_hold_others``). A folder
    that did not exist is made (and stays, empty).
    """
    text = str(path)
    if not text.strip():
        raise ValueError(f"{flag} is empty; give the folder {owner} should write into")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; give a new or empty folder")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {out} lies under {parent}, which is a file; give another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dti-fast-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"{flag} {out} is not writable ({err.strerror or first_line(err)}); choose another {flag}"
        ) from None
    if not may_hold_others and marks and not any((out / m).exists() for m in marks):
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise ValueError(
                f"{flag} {out} holds files that {owner} did not write ({shown}); give a new or empty folder"
            )
    return out


def umask_modes(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode the umask gives (safetensors writes its files 0600)."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
