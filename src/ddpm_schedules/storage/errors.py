"""`ParameterError`: a one-line ValueError that names parameters by placeholder, so that a caller can rename them.

A function raises with its own parameter names; a caller that knows the value by another name renames them on the
way out (app/ renames them to the config keys they were read from), and the user reads the name they wrote:

    raise ParameterError("{grid} = {value!r}; use null or a stride", value=spec)   # grid = 'x'; use null or a stride
    with parameter_names(grid="coarse"):                                           # coarse = 'x'; use null or ...
        candidate_grid(settings.coarse, T)
"""

from __future__ import annotations

import string
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping


@dataclass(frozen=True)
class Renaming:
    """Parameter names -> the names a caller shows: ``names``, else ``prefix.name`` with a prefix, else the name."""

    names: Mapping[str, str] = field(default_factory=dict)
    prefix: str | None = None

    def __call__(self, name: str) -> str:
        if name in self.names:
            return self.names[name]
        return f"{self.prefix}.{name}" if self.prefix else name


class ParameterError(ValueError):
    """A bad argument. In ``template`` (str.format syntax) the fields given as keyword ``values`` are values; every
    other field is a parameter name, shown as itself until renamed (`parameter_names`)."""

    def __init__(self, template: str, /, **values: Any) -> None:
        super().__init__(template)
        self.template, self.values = template, values
        self.renamings: list[Renaming] = []  # innermost first

    def shown(self, name: str) -> str:
        for renaming in self.renamings:
            name = renaming(name)
        return name

    def __str__(self) -> str:
        return _Fields(self).format(self.template)


class _Fields(string.Formatter):
    """A field is a value or a parameter name; a name may hold dots (``{cost.grid}``), as a config key does."""

    def __init__(self, error: ParameterError) -> None:
        self.error = error

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        values = self.error.values
        return (values[field_name] if field_name in values else self.error.shown(field_name)), field_name


@contextmanager
def parameter_names(prefix: str | None = None, /, **names: str) -> Iterator[None]:
    """Inside, a `ParameterError` leaves with its parameter names renamed: by ``names``, else to ``prefix.name``
    (the arguments of an object built from a config node). Nested, the innermost renames first. Also a decorator."""
    try:
        yield
    except ParameterError as e:
        e.renamings.append(Renaming(names, prefix))
        raise


def check_count(value: Any, name: str, null_means: str | None = None) -> int | None:
    """A positive integer, or None where ``null_means`` says what None means; else a ParameterError naming ``name``."""
    if value is None and null_means:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = f"a positive integer or null ({null_means})" if null_means else "a positive integer"
        raise ParameterError("{" + name + "} = {value!r}; it must be {allowed}", value=value, allowed=allowed)
    return value
