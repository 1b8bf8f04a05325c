"""How an entry point's parameter is defined once (name, type, default, choices, range, help) and checked."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mnist_tracking.core.errors import UserError

REQUIRED = dataclasses.MISSING  # a parameter without a default: the user must give it
METADATA_KEY = "parameter"


@dataclass(frozen=True)
class Range:
    """The values a number may take: above `low`, below `high` (each bound closed unless `*_open`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def text(self) -> str:
        """The range in words, as the error messages and the docs' parameter tables say it."""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            if self.low_open and self.high_open:
                return f"between {low} and {high} (exclusive)"
            if not self.low_open and not self.high_open:
                return f"between {low} and {high}"
            return f"{'>' if self.low_open else '>='} {low} and {'<' if self.high_open else '<='} {high}"
        if self.low is not None:
            return f"a number > {low}" if self.low_open else f"at least {low}"
        if self.high is not None:
            return f"a number < {high}" if self.high_open else f"at most {high}"
        return "any number"


def _number(value: float | None) -> str:
    """A bound as people write it: 4294967295 and 0.5, not 4.29497e+09 and 0.500000."""
    return "" if value is None else (str(int(value)) if float(value).is_integer() else f"{value:g}")


@dataclass(frozen=True)
class Parameter:
    """One parameter of an entry point, as MLproject, the CLI, the checks and the docs show it."""

    name: str
    type: type  # int, float or str
    default: Any  # REQUIRED when the user must give it
    help: str
    choices: tuple | None = None  # the allowed values (strings: compared case-insensitively)
    range: Range | None = None  # numbers only
    note: str = ""  # said after the range in the error message, e.g. "0 = all"
    mlproject_type: str = ""  # "path" for a folder MLflow makes absolute; else from `type`
    cli: bool = True  # False: set by the code (e.g. the sweep), not an option of the command

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def mlproject(self) -> str:
        return self.mlproject_type or {int: "int", float: "float", str: "string"}[self.type]

    def check(self, value: Any) -> Any:
        """The value as the code uses it (strings stripped, choices lower-cased), or a one-line UserError."""
        if self.type is str:
            # Leading and trailing whitespace in an id, a name or a path is never meant: " /data" or "name ".
            value = str(value).strip()
            if self.choices is not None:
                if value.lower() not in self.choices:
                    raise UserError(f"unknown {self.name} {value!r}: choose one of {', '.join(self.choices)}")
                value = value.lower()
            return value
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise UserError(f"{self.name} must be {'an integer' if self.type is int else 'a number'}, "
                            f"got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{self.name} must be {' or '.join(str(c) for c in self.choices)}, got {value}")
        if isinstance(value, float) and math.isinf(value):  # "at least 0, got inf" would not say what is wrong
            allowed = f"{self.range.text()} and finite" if self.range is not None else "a finite number"
            raise UserError(f"{self.name} must be {allowed}, got {value}")
        if self.range is not None and not self.range.holds(value):
            note = f" ({self.note})" if self.note else ""
            raise UserError(f"{self.name} must be {self.range.text()}{note}, got {value}")
        return value


def param(default: Any = REQUIRED, help: str = "", *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None, low_open: bool = False, high_open: bool = False, note: str = "",
          mlproject_type: str = "", cli: bool = True) -> Any:
    """A dataclass field that defines a parameter: its default, help text, choices and valid range."""
    meta = {"default": default, "help": help, "choices": choices, "note": note, "mlproject_type": mlproject_type,
            "cli": cli, "range": Range(low, high, low_open, high_open) if (low, high) != (None, None) else None}
    if default is REQUIRED:
        return field(metadata={METADATA_KEY: meta})
    return field(default=default, metadata={METADATA_KEY: meta})


def parameters(config_class) -> tuple[Parameter, ...]:
    """The parameters a config dataclass defines, in field order."""
    found = []
    for f in dataclasses.fields(config_class):
        meta = f.metadata.get(METADATA_KEY)
        if meta is None:
            continue
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[f.type]
        found.append(Parameter(f.name, kind, **meta))
    return tuple(found)


def check_all(config) -> None:
    """Check and normalise every parameter of a config dataclass instance in place, in field order."""
    for parameter in parameters(type(config)):
        setattr(config, parameter.name, parameter.check(getattr(config, parameter.name)))


def values(config) -> dict[str, Any]:
    """The config's parameters by name: what is logged as the run's params."""
    return {p.name: getattr(config, p.name) for p in parameters(type(config))}


def given_under_mlflow_run(config) -> frozenset[str]:
    """The parameters a user gave, as far as can be told under `mlflow run`: MLflow passes every
    MLproject parameter to the command, its default when the user gave none, so a value typed on
    the command line cannot be told from the default there. A value that differs from the
    default counts as given; one equal to it as not given (the one place this rule is made)."""
    return frozenset(p.name for p in parameters(type(config))
                     if not p.required and getattr(config, p.name) != p.check(p.default))


def resume_changes(config, original: dict[str, Any], may_change: tuple[str, ...],
                   same: dict[str, Callable[[Any, Any], bool]] | None = None) -> tuple[list[tuple], dict[str, Any]]:
    """The one rule of a resume (a training's resume_from, a search's --resume): what `config` gives against the
    `original` run's values. Returns (conflicts: (name, given value, original value) of each parameter the user
    gave outside `may_change` whose value differs, by `same[name]` where given, else ==; changed: the `may_change`
    values to use, those the user gave or the original lacks). `config.given` is what the user gave (None: what
    differs from its default, as under `mlflow run`)."""
    given = config.given if config.given is not None else given_under_mlflow_run(config)
    wanted, same = values(config), same or {}
    conflicts = [(name, wanted[name], original[name]) for name in sorted(given)
                 if name not in may_change and name in original
                 and not same.get(name, lambda a, b: a == b)(wanted[name], original[name])]
    changed = {name: wanted[name] for name in may_change if name in given or name not in original}
    return conflicts, changed
