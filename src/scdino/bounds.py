"""How a numeric value is bounded (:class:`Bound`) and checked: what each may be, and what 0 means where 0 is allowed.
A bad number is refused in one line naming the option, before any work starts; no option takes 0 (or a negative
number) as a silent "use the default".

The bounds themselves live with the values: on the config fields (:func:`bounded`: ``RunConfig``, ``CellOptions``,
``SegmentParams``), or declared by the module that owns a command's argument (:func:`declare`: the k-NN protocol in
:mod:`scdino.knn`, UMAP's settings in ``engine/umap.py``). Light on purpose (no numpy), so that the configs stay
importable for ``--help``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from scdino.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """The values an option takes: ``low`` <= value (< with ``low_open``), value <= ``high`` (< with ``high_open``),
    a whole number with ``integer``. ``what`` says what the option is (in the error)."""

    what: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def expected(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {_num(self.high)}")
        if not parts:
            return kind
        return f"{kind} {'of ' if parts[0].startswith('at ') else ''}{' and '.join(parts)}"

    def admits(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and float(value) != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


#: every declared bound, by the name of what it bounds (a config field, or a command's argument of that name); filled
#: by the modules that own those values (:func:`declare`): the core holds none of a stage's options
BOUNDS: dict[str, Bound] = {}

#: a seed of numpy's generators (0 .. 2**32 - 1): every command with a seed
SEED = Bound("random seed", low=0, high=2**32 - 1, integer=True)


def bounded(default, bound: Bound) -> Any:
    """A dataclass field with ``default`` and its bound as metadata (:func:`declare` reads it)."""
    return field(default=default, metadata={"bound": bound})


def declare(owner: Any = None, **bounds: Bound) -> Any:
    """Declare the bounds of the values a module owns: the bounded fields of the dataclass ``owner`` (usable as a class
    decorator) and ``bounds`` by name. A name has one bound: declaring another one for it is an error."""
    found = dict(bounds)
    if owner is not None:
        found.update({f.name: f.metadata["bound"] for f in fields(owner) if "bound" in f.metadata})
    for name, bound in found.items():
        if BOUNDS.setdefault(name, bound) != bound:
            raise ConfigError(f"two bounds of {name!r}: {BOUNDS[name]} and {bound}; a value has one home")
    return owner


declare(seed=SEED)


def option(name: str) -> str:
    """How a command line spells the value ``name`` (every option is named as the field it sets: ``--chunk-cells``)."""
    return "--" + name.replace("_", "-")


def check(**values: float | None) -> None:
    """Refuse the first value outside its declared bounds. Keywords are the names of the values (``chunk_cells=0``
    is ``--chunk-cells 0``); None means "not given" and is skipped."""
    for key, value in values.items():
        if value is None:
            continue
        bound = BOUNDS.get(key)
        if bound is None:
            raise ConfigError(f"no bounds are declared for {key!r}; this is a bug, please report it")
        if not bound.admits(value):
            raise ConfigError(f"{option(key)} {value}: expected {bound.expected()} ({bound.what})")


def check_fields(obj: Any) -> None:
    """Refuse the first bounded field of the dataclass ``obj`` (or of a dataclass it holds) outside its bounds."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if "bound" in f.metadata and value is not None and not f.metadata["bound"].admits(value):
            bound = f.metadata["bound"]
            raise ConfigError(f"{option(f.name)} {value}: expected {bound.expected()} ({bound.what})")
        if is_dataclass(value) and not isinstance(value, type):
            check_fields(value)
