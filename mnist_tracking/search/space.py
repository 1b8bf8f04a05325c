"""The `tune` search space: its default, its compact syntax and YAML form, checked against the training's parameters."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.parameters import Parameter, parameters

# Kinds of searched values, what Tune draws from: a float between two bounds (uniformly, or
# uniformly in its logarithm), an int between two bounds (both included), or one of a list.
UNIFORM, LOGUNIFORM, INT, CHOICE = "uniform", "loguniform", "int", "choice"
RANGES = (UNIFORM, LOGUNIFORM, INT)
KINDS = (*RANGES, CHOICE)
# What defines the data and its split: never searched, so every trial's val metrics are measured
# on the same images. `tune`'s own options set all but val_fraction, which may be fixed in the space.
NEVER_SEARCHED = ("dataset", "data_dir", "max_samples", "val_fraction", "seed")
# Set by `tune` itself for every trial (its options of the same names; the budget is --max-epochs;
# a trial is always a new run, and only the best trial is registered).
SET_BY_TUNE = ("epochs", "resume_from", "register_as", "dataset", "data_dir", "max_samples", "seed")
DEFAULT_SPACE = (
    "lr=loguniform(1e-4,1e-1); momentum=uniform(0.5,0.99); weight_decay=loguniform(1e-6,1e-2); "
    "optimizer=choice(sgd,adam,adamw); batch_size=choice(32,64,128,256); activation=choice(relu,leaky_relu,elu,gelu)"
)
SYNTAX = ("name=loguniform(low,high), name=uniform(low,high), name=int(low,high), name=choice(a,b,...) "
          "or name=value (fixed), separated by ';'")
ENTRY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", re.S)
CALL = re.compile(r"^([a-z]+)\((.*)\)$", re.S)


@dataclass(frozen=True)
class Domain:
    """What one searched parameter is drawn from: `kind` and its bounds (RANGES) or choices."""

    kind: str
    values: tuple

    def text(self) -> str:
        return f"{self.kind}({','.join(_show(v) for v in self.values)})"


@dataclass(frozen=True)
class SearchSpace:
    """The searched parameters (name -> Domain) and the fixed ones every trial gets (name -> value)."""

    searched: dict
    fixed: dict

    def text(self) -> str:
        """The space in the compact syntax (parses back to the same space)."""
        entries = [f"{n}={d.text()}" for n, d in self.searched.items()]
        return "; ".join(entries + [f"{n}={_show(v)}" for n, v in self.fixed.items()])


def training_parameters() -> dict[str, Parameter]:
    """The training's parameters by name, as `main` defines them once (type, choices, range)."""
    return {p.name: p for p in parameters(TrainConfig)}


def load_space(space: str) -> SearchSpace:
    """`space` as given to `tune --space`: empty = the default, a path to a .yaml/.yml file, or the compact syntax."""
    space = str(space or "").strip()
    if not space:
        return parse_space(DEFAULT_SPACE)
    if space.lower().endswith((".yaml", ".yml")) and "=" not in space:
        return parse_yaml(Path(space))
    return parse_space(space)


def parse_space(text: str) -> SearchSpace:
    """The compact syntax (SYNTAX): `lr=loguniform(1e-4,1e-1); optimizer=choice(sgd,adam)`."""
    entries = {}
    for part in (p for p in re.split(r"[;\n]", text) if p.strip()):
        match = ENTRY.match(part)
        if not match:
            raise UserError(f"cannot read {part.strip()!r} in the search space: write {SYNTAX}")
        name, value = match.groups()
        if name in entries:
            raise UserError(f"the search space names {name} twice; name each parameter once")
        call = CALL.match(value)
        entries[name] = (call.group(1), [v.strip() for v in call.group(2).split(",")]) if call else value
    return checked_space(entries)


MAX_SPACE_CHARS = 64 * 1024  # a space of every training parameter is under 2 KiB


def parse_yaml(path: Path) -> SearchSpace:
    """A YAML mapping: `name: {loguniform: [1e-4, 1e-1]}`, `name: {choice: [sgd, adam]}`, `name: value` (fixed),
    or `name: "loguniform(1e-4,1e-1)"` (the compact form of one entry)."""
    import yaml

    try:
        text = path.read_text()
        refuse_references(path, text)  # before anything is built from the file
        loaded = yaml.safe_load(text)
    except OSError as exc:
        raise UserError(f"cannot read the search space file {path}: {exc.strerror}; "
                        "pass an existing .yaml file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"the search space file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"the search space file {path} must hold a mapping of parameter names, e.g. "
                        "'lr: {loguniform: [1e-4, 1e-1]}'")
    entries = {}
    for name, value in loaded.items():
        if isinstance(value, dict):
            if len(value) != 1:
                raise UserError(f"{name} in {path}: give one of {', '.join(KINDS)} with its values, e.g. "
                                f"'{name}: {{choice: [a, b]}}'")
            (kind, values), = value.items()
            entries[str(name)] = (str(kind), [str(v) for v in (values if isinstance(values, list) else [values])])
        elif isinstance(value, str) and (call := CALL.match(value.strip())):
            entries[str(name)] = (call.group(1), [v.strip() for v in call.group(2).split(",")])
        else:
            entries[str(name)] = str(value)
    return checked_space(entries)


def refuse_references(path: Path, text: str) -> None:
    """A UserError for a file larger than any space, or one with YAML anchors or aliases (&a, *a): a few hundred
    bytes of nested aliases expand to gigabytes ("billion laughs"), and a space never needs them. Reads the
    file's events only, so nothing is expanded."""
    import yaml

    if len(text) > MAX_SPACE_CHARS:
        raise UserError(f"the search space file {path} has {len(text)} characters, more than a space needs "
                        f"({MAX_SPACE_CHARS}); pass a file of parameter names and their values")
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise UserError(f"the search space file {path} uses YAML anchors or aliases (line "
                            f"{event.start_mark.line + 1}); write each value out")


def checked_space(entries: dict) -> SearchSpace:
    """Every name a training parameter that may be searched, every value of its type and allowed
    (each bound and choice is checked by the training's own rules); one UserError line otherwise."""
    types = training_parameters()
    searched, fixed = {}, {}
    for name, entry in entries.items():
        if name not in types:
            raise UserError(f"unknown parameter {name!r} in the search space: choose among "
                            f"{', '.join(n for n in types if n not in SET_BY_TUNE)}")
        if name in SET_BY_TUNE:
            option = "max-epochs" if name == "epochs" else name.replace("_", "-")
            raise UserError(f"{name} cannot be in the search space: `tune` sets it for every trial "
                            f"(--{option})" if name != "resume_from" else "resume_from cannot be in the search "
                            "space: every trial is a new run (resume a search with --resume)")
        if isinstance(entry, tuple):
            if name in NEVER_SEARCHED:
                raise UserError(f"{name} defines the data or its split and is never searched (every trial must "
                                f"be measured on the same images); fix it with {name}=<value>")
            searched[name] = checked_domain(types[name], *entry)
        else:
            fixed[name] = checked_value(types[name], entry)
    if not searched:
        raise UserError("the search space has nothing to search: give at least one name=choice(...), "
                        "uniform(...), loguniform(...) or int(...) (empty --space: the default space)")
    return SearchSpace(searched, fixed)


def checked_domain(parameter: Parameter, kind: str, raw: list[str]) -> Domain:
    name, kind_of, kind = parameter.name, parameter.type, kind.lower()
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind}(...) for {name}: use {', '.join(KINDS)}")
    if kind in (UNIFORM, LOGUNIFORM) and kind_of is not float:
        raise UserError(f"{name} is {_type_name(kind_of)}: {kind}(...) draws floats; use "
                        + ("int(low,high) or choice(...)" if kind_of is int else "choice(...)"))
    if kind == INT and kind_of is not int:
        raise UserError(f"{name} is {_type_name(kind_of)}: int(...) draws integers; use "
                        + ("uniform(...), loguniform(...) or choice(...)" if kind_of is float else "choice(...)"))
    values = tuple(checked_value(parameter, v) for v in raw)
    if kind == CHOICE:
        if len(set(values)) != len(values) or not values:
            raise UserError(f"{name}=choice(...) needs distinct values, got {', '.join(raw)}")
        return Domain(kind, values)
    if len(values) != 2:
        raise UserError(f"{name}={kind}(...) takes two bounds (low,high), got {len(values)}")
    low, high = values
    if not low < high:
        raise UserError(f"{name}={kind}({_show(low)},{_show(high)}) is an empty range: low must be below high")
    if kind == LOGUNIFORM and low <= 0:
        raise UserError(f"{name}=loguniform needs bounds > 0 (a logarithm), got {_show(low)}; use uniform(...) "
                        f"to include 0")
    return Domain(kind, values)


def checked_value(parameter: Parameter, raw):
    """`raw` (text) as a value of the parameter's type, allowed by its own definition (choices, range),
    normalised as the training has it (`SGD` -> `sgd`)."""
    name, kind_of, text = parameter.name, parameter.type, str(raw).strip()
    try:
        value = kind_of(text) if kind_of is not int else _integer(text)
    except ValueError:
        raise UserError(f"{name} is {_type_name(kind_of)}, got {text!r}") from None
    if kind_of is float and not math.isfinite(value):
        raise UserError(f"{name} takes finite numbers, got {text!r}")
    return parameter.check(value)


def _integer(text: str) -> int:
    number = float(text)
    if not number.is_integer():
        raise ValueError(text)
    return int(number)


def _type_name(kind_of: type) -> str:
    return {float: "a number (float)", int: "an integer", str: "a text",
            bool: "true/false"}.get(kind_of, kind_of.__name__)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
