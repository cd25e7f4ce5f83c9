"""Settings declared once: a dataclass field's metadata gives its flag, help, check and fingerprint role.

A config class (:class:`~dti_fast.train.config.TrainConfig`,
:class:`~dti_fast.suite.SuiteConfig`) declares each setting with :func:`setting`.
From that one declaration derive

- the command-line flag (:func:`add_arguments`), with the default in its help;
- the job-file key and its type check (:func:`from_mapping`);
- the validation of a config built in Python (:func:`check_fields`);
- whether the setting shapes the learned vectors (:func:`fingerprint_fields`).

A *kind* (:class:`Kind`) converts a value from a flag's text or a TOML value,
and refuses a wrong type or range with a message that names the fix.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "Kind",
    "INT",
    "NONNEG_INT",
    "POSITIVE_INT",
    "NONNEG_FLOAT",
    "POSITIVE_FLOAT",
    "UNIT_INTERVAL",
    "FLOAT",
    "BOOL",
    "TEXT",
    "PATH",
    "TEXTS",
    "INTS",
    "choice",
    "optional",
    "either",
    "literal",
    "setting",
    "spec",
    "add_arguments",
    "from_mapping",
    "check_fields",
    "fingerprint_fields",
    "argparse_type",
    "flag_values",
]


@dataclass(frozen=True)
class Kind:
    """How a setting's value is read and checked.

    ``convert`` takes a flag's text (``from_text=True``) or a Python/TOML value
    and returns the value, or raises ValueError with what was expected.
    """

    describe: str  # "a positive integer", shown in messages
    convert: Callable[[Any, bool], Any]
    choices: tuple[Any, ...] | None = None

    def __call__(self, value: Any, from_text: bool = False) -> Any:
        return self.convert(value, from_text)


def _expected(kind: str, value: Any) -> ValueError:
    return ValueError(f"must be {kind}, got {value!r}")  # "lr must be positive and finite, got inf"


def _integer(minimum: int | None, describe: str) -> Kind:
    def convert(value: Any, from_text: bool) -> int:
        if from_text:
            try:
                value = int(value)
            except ValueError:
                raise _expected(describe, value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if isinstance(value, float):
            raise ValueError(f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise _expected(describe, value)
        if abs(value) >= 2**63:  # seeds and counts go to torch as 64-bit integers
            raise ValueError(f"must be below 2**63, got {value}")
        return value

    return Kind(describe, convert)


def _number(test: Callable[[float], bool], describe: str) -> Kind:
    def convert(value: Any, from_text: bool) -> float:
        if from_text:
            try:
                value = float(value)
            except ValueError:
                raise _expected(describe, value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or not test(value):
            raise _expected(describe, value)
        return value

    return Kind(describe, convert)


def _boolean(value: Any, from_text: bool) -> bool:
    if from_text:
        lowered = str(value).lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _text(value: Any, from_text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _path(value: Any, from_text: bool) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"must be a non-empty path, got {value!r}")
    return Path(value).expanduser()


def _texts(value: Any, from_text: bool) -> list[str]:
    if from_text:
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of strings, got {value!r}")
    return list(value)


def _ints(value: Any, from_text: bool) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"must be a list of integers, got {value!r}")
    return list(value)


INT = _integer(None, "an integer")
NONNEG_INT = _integer(0, "an integer >= 0")
POSITIVE_INT = _integer(1, "a positive integer")
FLOAT = _number(lambda v: True, "a finite number")
NONNEG_FLOAT = _number(lambda v: v >= 0, "a finite number >= 0")
POSITIVE_FLOAT = _number(lambda v: v > 0, "positive and finite")
UNIT_INTERVAL = _number(lambda v: 0 <= v < 1, "a number in [0, 1)")
BOOL = Kind("true or false", _boolean)
TEXT = Kind("a string", _text)
PATH = Kind("a path", _path)
TEXTS = Kind("a list of strings", _texts)
INTS = Kind("a list of integers", _ints)

#: The most seeds one list may hold: a longer range is a typo (and hours of sampling).
MAX_SEEDS = 10_000


def _seeds(value: Any, from_text: bool) -> list[int]:
    """``0,1,2`` or ``0-3`` (inclusive), or a list of integers: distinct seeds in [0, 2**63), at most
    :data:`MAX_SEEDS` (a range is measured before it is expanded)."""
    if isinstance(value, str):
        out: list[int] = []
        for part in (x.strip() for x in value.split(",")):
            if not part:
                continue
            try:
                lo, _, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
                lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
            except ValueError:
                raise ValueError(f"must be seeds like 0,1,2 or 0-3, got {value!r}") from None
            if hi_i < lo_i:
                raise ValueError(f"the range {part} runs backwards; write it low-high, e.g. {hi_i}-{lo_i}")
            if hi_i - lo_i + 1 + len(out) > MAX_SEEDS:
                raise ValueError(f"{value!r} gives more than {MAX_SEEDS} seeds; split the run or give fewer")
            out.extend(range(lo_i, hi_i + 1))
        value = out
    elif isinstance(value, (list, tuple)) and len(value) > MAX_SEEDS:
        raise ValueError(f"{len(value)} seeds, more than {MAX_SEEDS}; split the run or give fewer")
    seeds = _ints(value, from_text)
    if not seeds:
        raise ValueError(f"must hold at least one seed, got {value!r}")
    for seed in seeds:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed {seed} is outside 0 to 2**63 - 1 (what torch's generators take)")
    if len(set(seeds)) < len(seeds):
        seen: set[int] = set()
        twice = next(x for x in seeds if x in seen or seen.add(x))
        raise ValueError(f"seed {twice} is given more than once (its image would count twice); give it once")
    return seeds


SEEDS = Kind("seeds like 0,1,2 or 0-3", _seeds)
SEED = _integer(0, "an integer >= 0 (a seed)")


def choice(*options: str) -> Kind:
    """One of the given strings."""
    describe = "one of " + ", ".join(options)

    def convert(value: Any, from_text: bool) -> str:
        if value not in options:
            raise _expected(describe, value)
        return value

    return Kind(describe, convert, choices=tuple(options))


def literal(*options: Any) -> Kind:
    """Exactly one of the given values (e.g. the string "auto" beside a number)."""
    describe = " or ".join(repr(o) for o in options)

    def convert(value: Any, from_text: bool) -> Any:
        for o in options:
            if value == o and type(value) is type(o):
                return o
            if from_text and str(o).lower() == str(value).lower():
                return o
        raise _expected(describe, value)

    return Kind(describe, convert)


def either(*kinds: Kind) -> Kind:
    """The first kind that accepts the value."""
    describe = " or ".join(k.describe for k in kinds)

    def convert(value: Any, from_text: bool) -> Any:
        for k in kinds:
            try:
                return k(value, from_text)
            except ValueError:
                continue
        raise _expected(describe, value)

    return Kind(describe, convert)


def optional(kind: Kind) -> Kind:
    """``kind`` or None (unset)."""

    def convert(value: Any, from_text: bool) -> Any:
        return None if value is None else kind(value, from_text)

    return Kind(kind.describe, convert, kind.choices)


@dataclass(frozen=True)
class Spec:
    """A setting's declaration, kept in its dataclass field's metadata."""

    kind: Kind
    help: str
    flag: str | None = ""  # "" = derived from the name ("--batch-size"); None = no flag
    action: str = "value"  # value | true (flag sets True) | false (flag sets False) | append | optional_bool
    default_text: str | None = None  # shown as "(default ...)"; None = the field's default
    fingerprint: bool = False  # shapes the learned vectors (enters a concept's fingerprint)
    group: str | None = None  # argparse group title
    path_base: bool = False  # in a job file, relative paths are relative to the file


def setting(default: Any = MISSING, *, kind: Kind, help: str, default_factory: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field declared with everything derived from it (see the module docstring)."""
    meta = {"spec": Spec(kind=kind, help=help, **spec)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def spec(f: Field) -> Spec | None:
    return f.metadata.get("spec")


def _default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _flag(f: Field, s: Spec) -> str:
    return s.flag or "--" + f.name.replace("_", "-")


def _help(f: Field, s: Spec) -> str:
    if s.action in ("true", "false", "append"):
        return s.help if s.default_text is None else f"{s.help} ({s.default_text})"
    if s.default_text is not None:
        shown = s.default_text
    else:
        default = _default_of(f)
        if default is MISSING or default is None:
            return s.help
        shown = f"default {default}"
    return f"{s.help} ({shown})"


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> None:
    """Add a flag for every setting of ``cls`` that has one. Unset flags parse to None (or [] for lists)."""
    groups: dict[str, Any] = {}
    skip = set(skip)
    for f in fields(cls):
        s = spec(f)
        if s is None or s.flag is None or f.name in skip:
            continue
        target = parser if s.group is None else groups.setdefault(s.group, parser.add_argument_group(s.group))
        flag, help_text = _flag(f, s), _help(f, s)
        if s.action == "true":
            target.add_argument(flag, dest=f.name, action="store_const", const=True, help=help_text)
        elif s.action == "false":
            target.add_argument(flag, dest=f.name, action="store_const", const=False, help=help_text)
        elif s.action == "optional_bool":
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif s.action == "append":
            target.add_argument(
                flag, dest=f.name, action="append", default=[], help=help_text, type=argparse_type(s.kind, flag)
            )
        else:
            target.add_argument(
                flag,
                dest=f.name,
                type=argparse_type(s.kind, flag),
                help=help_text,
                metavar=("{" + ",".join(map(str, s.kind.choices)) + "}") if s.kind.choices else None,
            )


def argparse_type(kind: Kind, flag: str = "") -> Callable[[str], Any]:
    """An argparse ``type=`` that reads a flag's text with ``kind`` and reports what was expected."""

    def parse(text: str) -> Any:
        try:
            value = kind(text, from_text=True)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None  # "must be a positive integer, got 'x'"
        return value[0] if isinstance(value, list) and len(value) == 1 and kind is TEXTS else value

    parse.__name__ = kind.describe  # argparse names the type in its messages
    return parse


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` that were given as flags (unset flags are None or [])."""
    out = {}
    for f in fields(cls):
        if spec(f) is None:
            continue
        value = getattr(args, f.name, None)
        if value is not None and value != []:
            out[f.name] = value
    return out


def from_mapping(
    cls: type, raw: Mapping[str, Any], where: str, base: Path | None = None, skip: Sequence[str] = ()
) -> dict[str, Any]:
    """Check a job file's keys against the settings of ``cls``; returns keyword arguments.

    Raises ValueError naming ``where``, the key and what it must be. Relative
    paths of settings with ``path_base`` are taken relative to ``base``.
    """
    known = {f.name: f for f in fields(cls) if spec(f) is not None}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in skip:
            continue
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        s = spec(known[key])
        try:
            value = s.kind(value)
        except ValueError as err:
            raise ValueError(f"{where}: {key} {err}") from None
        if s.path_base and base is not None and isinstance(value, Path) and not value.is_absolute():
            value = base / value
        out[key] = value
    return out


def check_fields(obj: Any) -> None:
    """Check every declared setting of a config object; raises ValueError naming the setting."""
    for f in fields(obj):
        s = spec(f)
        if s is None:
            continue
        value = getattr(obj, f.name)
        try:
            converted = s.kind(value)
        except ValueError as err:
            raise ValueError(f"{f.name} {err}") from None
        if converted is not value:
            setattr(obj, f.name, converted)  # normalized: ~ expanded, a path as Path, a number as float


def fingerprint_fields(cls: type) -> tuple[str, ...]:
    """Names of the settings that shape the learned vectors."""
    return tuple(f.name for f in fields(cls) if spec(f) is not None and spec(f).fingerprint)
