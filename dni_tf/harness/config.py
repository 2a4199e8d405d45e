"""One config pattern for every study: a dataclass whose fields carry their own rules.

A study's config is a dataclass; each field is declared with `option(...)`,
which records its help text and allowed values (choices, bounds, list items).
The same record serves three callers:

  * `check_fields(config)` (called by every config's `validate()`), so a
    notebook building a config by hand gets the same one-line errors as the
    command line;
  * `define_flags(ConfigClass)`, which defines one absl flag per field with
    absl's own machinery (`DEFINE_enum`, integer/float bounds, list parsers,
    `register_validator`), so a bad value is refused while flags are parsed,
    before anything is loaded or trained;
  * `from_flags(ConfigClass)`, which builds the config from the parsed flags
    and runs its `validate()` for the checks that span several fields.

    @dataclasses.dataclass
    class MyConfig:
        steps: int = option(1000, "Training batches.", low=1)
        method: str = option("dni", "Training method.", choices=("bptt", "dni"))
        rates: Sequence[float] = option((0.1, 0.01), "One run per rate.", low=0.0, low_open=True)

        def validate(self):
            check_fields(self)
            ...  # checks across fields, raising ValueError("field=...: why")

Error texts name the flag (`--steps=0 is out of range: allowed [1, inf)`), so
the command line prints them as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from typing import Any, Optional, Sequence

from absl import flags

from dni_tf.errors import UsageError


def option(default: Any, help: str, *, choices: Optional[Sequence[str]] = None,
           low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False, distinct: bool = True,
           allow_empty: bool = False, none_text: Optional[str] = None, grid: bool = False,
           flag: bool = True):
    """A dataclass field with its help text and allowed values.

    Args:
      default: the default value; a list default is given as a tuple.
      help: the flag's help text.
      choices: allowed strings (for a list field: allowed items).
      low, high, low_open, high_open: bounds of a number (for a list field: of
        each item); NaN and infinities are always refused.
      distinct: a list field's items must differ (a sweep: one run folder each).
      allow_empty: a list field may be empty.
      none_text: for an Optional list field, the flag text that means None
        (e.g. "all").
      grid: a scalar field whose flag takes a comma list, one run per value
        (`grid_from_flags` returns the lists; the config gets the first).
      flag: False for a field that is set by code, not from the command line.
    """
    metadata = dict(help=help, choices=tuple(choices) if choices is not None else None,
                    low=low, high=high, low_open=low_open, high_open=high_open,
                    distinct=distinct, allow_empty=allow_empty, none_text=none_text,
                    grid=grid, flag=flag)
    return dataclasses.field(default=default, metadata=metadata)


def _kind(config_class, field: dataclasses.Field):
    """(base type, is_list, is_optional) of a field, from its annotation."""
    hint = typing.get_type_hints(config_class)[field.name]
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) in (list, tuple, typing.get_origin(Sequence)):
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _allowed(meta: dict) -> str:
    left = "(" if meta["low_open"] or meta["low"] is None else "["
    right = ")" if meta["high_open"] or meta["high"] is None else "]"
    low = "-inf" if meta["low"] is None else f"{meta['low']:g}"
    high = "inf" if meta["high"] is None else f"{meta['high']:g}"
    return f"allowed {left}{low}, {high}{right}"


def _check_value(name: str, value, item_type, meta: dict) -> None:
    """Raises UsageError("--name=value ...") unless `value` obeys the field's rules."""
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            raise UsageError(f"--{name}={value!r} is not allowed: choose from "
                             f"{', '.join(meta['choices'])}")
        return
    if item_type in (int, float):
        kind = "an integer" if item_type is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                item_type is int and not isinstance(value, int)):
            raise UsageError(f"--{name}={value!r} is not {kind}")
        if not math.isfinite(value):
            raise UsageError(f"--{name}={value!r} is not a finite number: {_allowed(meta)}")
        low, high = meta["low"], meta["high"]
        too_low = low is not None and (value <= low if meta["low_open"] else value < low)
        too_high = high is not None and (value >= high if meta["high_open"] else value > high)
        if too_low or too_high:
            raise UsageError(f"--{name}={value!r} is out of range: {_allowed(meta)}")


def _check_list(name: str, values, item_type, meta: dict, texts=None) -> None:
    if not values and not meta["allow_empty"]:
        raise UsageError(f"--{name}: give at least one value")
    for value in values:
        _check_value(name, value, item_type, meta)
    if meta["distinct"]:
        texts = [repr(v) for v in values] if texts is None else list(texts)
        seen = {}
        for value, text in zip(values, texts):
            if value in seen:
                same = (f"{text} is given more than once" if text == seen[value]
                        else f"{seen[value]} and {text} are the same value")
                raise UsageError(f"--{name}: {same}; each value must be distinct "
                                 "(one run per value)")
            seen[value] = text


def check_fields(config) -> None:
    """Checks every `option` field of `config` against its rules; raises UsageError."""
    for field in dataclasses.fields(config):
        meta = field.metadata
        if "help" not in meta:
            continue
        value = getattr(config, field.name)
        item_type, is_list, optional = _kind(type(config), field)
        if value is None and optional:
            continue
        if is_list:
            _check_list(field.name, list(value), item_type, meta)
        else:
            _check_value(field.name, value, item_type, meta)


class _ListParser(flags.ArgumentParser):
    """Parses "a,b,c" into a list of `item_type`, checking each item and distinctness."""

    def __init__(self, name: str, item_type, meta: dict):
        self.name, self.item_type, self.meta = name, item_type, meta

    def parse(self, argument):
        if argument is None or (self.meta["none_text"] is not None
                                and str(argument).strip() == self.meta["none_text"]):
            return None
        if isinstance(argument, (list, tuple)):
            texts = [str(a) for a in argument]
        else:
            texts = [t.strip() for t in str(argument).split(",") if t.strip()]
        kind = {int: "an integer", float: "a number"}.get(self.item_type, "a name")
        values = []
        for text in texts:
            try:
                values.append(self.item_type(text))
            except ValueError:
                raise ValueError(f"--{self.name}: {text!r} is not {kind}") from None
        if self.item_type is str:
            texts = None  # names are quoted in messages; numbers show as typed
        try:
            _check_list(self.name, values, self.item_type, self.meta, texts)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return values

    def flag_type(self):
        return f"comma-separated list of {self.item_type.__name__}"


class _OptionalBooleanParser(flags.BooleanParser):
    """A boolean flag that also takes a word for None (e.g. `--jit_compile=auto`)."""

    def __init__(self, name: str, none_text: str):
        self.name, self.none_text = name, none_text

    def parse(self, argument):
        if argument is None or (isinstance(argument, str)
                                and argument.strip().lower() == self.none_text):
            return None
        try:
            return super().parse(argument)
        except ValueError:
            raise ValueError(f"--{self.name}={argument!r} is not allowed: choose from true, "
                             f"false, {self.none_text}") from None

    def flag_type(self):
        return f"bool or {self.none_text}"


def define_flags(config_class, skip: Sequence[str] = (), flag_values=flags.FLAGS) -> None:
    """Defines one absl flag per `option` field of `config_class` (except `skip`).

    Types follow the annotations: bool -> boolean flag (Optional[bool]: also
    `--name=<none_text>` for None, e.g. auto); str with choices ->
    `DEFINE_enum`; int/float -> numeric flag with a registered validator for
    its bounds (and NaN/inf); Sequence[...] (or a grid field) -> a
    comma-separated list parsed and checked item by item. Every check runs
    while absl parses the command line, before the program's `main`.
    """
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if "help" not in meta or not meta["flag"] or field.name in skip:
            continue
        name, default, help_text = field.name, field.default, meta["help"]
        item_type, is_list, optional = _kind(config_class, field)
        if is_list or meta["grid"]:
            if default is None:
                default = meta["none_text"]
            elif meta["grid"]:
                default = [default]
            else:
                default = list(default)
            flags.DEFINE(_ListParser(name, item_type, meta), name, default, help_text,
                         flag_values=flag_values, serializer=flags.CsvListSerializer(","))
            continue
        if item_type is bool and optional:
            # true / false / `none_text` (None), still accepting --name and --noname.
            parser = _OptionalBooleanParser(name, meta["none_text"] or "none")
            flags.DEFINE_flag(flags.Flag(parser, flags.ArgumentSerializer(), name, default,
                                         help_text, boolean=True), flag_values=flag_values)
        elif item_type is bool:
            flags.DEFINE_boolean(name, default, help_text, flag_values=flag_values)
        elif meta["choices"] is not None:
            flags.DEFINE_enum(name, default, list(meta["choices"]), help_text,
                              flag_values=flag_values)
        elif item_type in (int, float):
            # Bounds go through a validator rather than absl's lower_bound/upper_bound:
            # those let NaN through and cannot say "(0, 1]"; this states the interval.
            define = flags.DEFINE_integer if item_type is int else flags.DEFINE_float
            define(name, default, help_text + _bounds_help(meta), flag_values=flag_values)
            flags.register_validator(name, _validator(name, item_type, meta),
                                     flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def _bounds_help(meta: dict) -> str:
    if meta["low"] is None and meta["high"] is None:
        return ""
    return f" ({_allowed(meta)})"


def _validator(name, item_type, meta):
    def check(value):
        if value is not None:
            try:
                _check_value(name, value, item_type, meta)
            except UsageError as exc:
                raise flags.ValidationError(str(exc)) from None
        return True
    return check


def _flag_or_preset(name, flag_values, preset):
    """The flag's value if given on the command line, else the preset's, else the flag default."""
    if name in preset and not flag_values[name].present:
        value, parser = preset[name], flag_values[name].parser
        if isinstance(parser, _ListParser) and value is not None:  # checked like a flag
            try:
                return parser.parse(list(value) if isinstance(value, (list, tuple)) else [value])
            except ValueError as exc:
                raise UsageError(f"{exc} (from the preset)") from None
        return value
    return flag_values[name].value


def grid_from_flags(config_class, flag_values=flags.FLAGS, preset=None) -> dict:
    """{field: [values]} for the `grid=True` fields (one run per combination)."""
    preset = preset or {}
    out = {}
    for field in dataclasses.fields(config_class):
        if field.metadata.get("grid") and field.name in flag_values:
            value = _flag_or_preset(field.name, flag_values, preset)
            out[field.name] = list(value) if isinstance(value, (list, tuple)) else [value]
    return out


def from_flags(config_class, flag_values=flags.FLAGS, preset=None, **overrides):
    """The config built from the flags of its fields' names, validated.

    A value comes from `overrides`, else from a flag given on the command line,
    else from `preset` (a dict of field values), else from the flag's default;
    fields without a flag keep their defaults. A grid field gets its first
    value. `validate()` raising `ValueError("field...: why")` becomes a
    UsageError naming the flag; a UsageError passes unchanged. With grid
    fields, every combination is validated.
    """
    preset = preset or {}
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif field.name in flag_values:
            value = _flag_or_preset(field.name, flag_values, preset)
            if field.metadata.get("grid"):
                value = value[0]
            values[field.name] = tuple(value) if isinstance(value, list) else value
        elif field.name in preset:
            values[field.name] = preset[field.name]
    config = config_class(**values)
    grid = grid_from_flags(config_class, flag_values, preset)
    for combination in itertools.product(*grid.values()) if grid else [()]:
        try:
            dataclasses.replace(config, **dict(zip(grid, combination))).validate()
        except UsageError:
            raise
        except ValueError as exc:
            raise UsageError(f"--{exc}") from None
    return config
