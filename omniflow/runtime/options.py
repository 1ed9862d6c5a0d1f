"""Dataclass-defined options -> argparse, with JSON config files.

Every option is a dataclass field with a default, a type and ``metadata["help"]``.
``--config FILE.json`` (plus any per-script aliases such as ``--load_config``) loads values,
explicit command-line flags override the file, unknown keys fail with the closest valid name,
and :func:`save_config` writes the resolved configuration next to the run's outputs.

Field metadata understood here:
  help     one-line help text (required)
  choices  allowed values
  aliases  extra flag spellings (e.g. ``["--save_interval"]``)

A script may add its own spellings of any option (``aliases``: a seed's ``--save_dir`` for
``--output_dir``) and values that stand for others (``synonyms``: ``float32`` for ``no``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

# argparse (before Python 3.13) takes "-1e-3" for an option: its pattern of negative numbers has no exponent.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _ArgumentParser(argparse.ArgumentParser):
    """Flags only in full (an abbreviation such as --fmt_dept must fail, not set --fmt_depth), negative numbers
    in any notation as values, and an error as one ConfigError line instead of the usage text and exit 2."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional[...]; return (inner type, is_optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _str2bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, hints: dict, aliases: Sequence[str],
               synonyms: dict[str, Any]) -> None:
    meta = field.metadata
    if "help" not in meta:
        raise TypeError(f"option {field.name!r} has no help text")
    names = [f"--{field.name}", *meta.get("aliases", []), *aliases]
    kwargs: dict[str, Any] = {"dest": field.name, "help": meta["help"], "default": argparse.SUPPRESS}
    tp, optional = _base_type(hints[field.name])
    origin = typing.get_origin(tp)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin in (list, tuple, Sequence):
        (item,) = typing.get_args(tp)[:1] or (str,)
        kwargs.update(nargs="*" if optional else "+", type=item)
    else:
        kwargs["type"] = tp
    if synonyms:  # argparse converts before it checks the choices
        convert = kwargs["type"]
        kwargs["type"] = lambda text: synonyms[text] if text in synonyms else convert(text)
        kwargs["help"] += " (also " + ", ".join(f"{k} = {v}" for k, v in synonyms.items()) + ")"
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    kwargs["help"] += f" (default: {default!r})"
    parser.add_argument(*names, **kwargs)


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    """Check/convert a value read from a JSON config to the field's type."""
    tp, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: key {name!r} is null but the option is not optional")
    try:
        if tp is bool:
            return value if isinstance(value, bool) else _str2bool(value)
        origin = typing.get_origin(tp)
        if origin in (list, tuple, Sequence):
            (item,) = typing.get_args(tp)[:1] or (str,)
            if not isinstance(value, list):
                value = [value]
            return [item(v) for v in value]
        if tp is float and isinstance(value, (int, float)):
            return float(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: key {name!r} has value {value!r}, expected {getattr(tp, '__name__', tp)}") from None


def _nearest(name: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.4)
    return f"; did you mean {match[0]!r}?" if match else ""


def load_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of option names to values")
    return data


def load_options_file(path: str | os.PathLike) -> dict:
    """A JSON file of option values, flat or grouped in sections (``{"model": {...}, "training": {...}}``,
    merged: no option takes a dict)."""
    flat: dict = {}
    for key, value in load_config_file(path).items():
        for name, item in (value.items() if isinstance(value, dict) else [(key, value)]):
            if name in flat:
                raise ConfigError(f"{path}: key {name!r} is set twice (sections are merged)")
            flat[name] = item
    return flat


def parse_options(
    *option_classes: type,
    args: Sequence[str] | None = None,
    description: str | None = None,
    config_flags: Sequence[str] = ("--config",),
    config_values: dict | None = None,
    aliases: dict[str, Sequence[str]] | None = None,
    synonyms: dict[str, dict[str, Any]] | None = None,
):
    """Parse the command line into one instance of each dataclass in ``option_classes``.

    Precedence: dataclass defaults < ``config_values`` < the JSON file named by one of
    ``config_flags`` (e.g. ``--config``, or a seed's ``--load_config``) < explicit flags,
    whichever spelling each uses. Config files may use a field's name or any of its aliases as
    the key, one spelling per option; a null under an alias is skipped (a file saved when that
    spelling was an option of its own holds it as null). ``aliases`` adds spellings per field name
    (``{"output_dir": ["--save_dir"]}``), ``synonyms`` values per field name that stand for
    others, on the command line and in files (``{"mixed_precision": {"float32": "no"}}``).
    Returns a single instance when one class is given, else a tuple in the same order.
    """
    parser = _ArgumentParser(description=description)
    parser.add_argument(*config_flags, dest="_config_file", default=None,
                        help="JSON file of option values; flags given on the command line override it")
    owners: dict[str, tuple[type, Any]] = {}
    spellings: dict[str, str] = {}  # alias key -> field name
    aliases, synonyms = aliases or {}, synonyms or {}
    for cls in option_classes:
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group(cls.__name__)
        for field in dataclasses.fields(cls):
            if field.name in owners:
                raise TypeError(f"option {field.name!r} is defined twice ({owners[field.name][0].__name__}, {cls.__name__})")
            owners[field.name] = (cls, hints[field.name])
            extra = aliases.get(field.name, [])
            spellings.update({a.lstrip("-"): field.name for a in [*field.metadata.get("aliases", []), *extra]})
            _add_field(group, field, hints, extra, synonyms.get(field.name, {}))
    unknown_aliases = set(aliases) - set(owners)
    if unknown_aliases:
        raise TypeError(f"aliases for unknown options {sorted(unknown_aliases)}")
    namespace, unknown = parser.parse_known_args(args)
    if unknown:
        flags = [f"--{name}" for name in [*owners, *spellings]]
        near = _nearest(unknown[0], flags) if unknown[0].startswith("-") else ""
        parser.error(f"unrecognized argument {unknown[0]!r}{near}")
    cli = vars(namespace)
    config_path = cli.pop("_config_file")

    values: dict[str, Any] = {}
    sources = [("config defaults", config_values or {})]
    if config_path:
        sources.append((str(config_path), load_options_file(config_path)))
    for source, data in sources:
        keys: dict[str, str] = {}  # field name -> the key that set it in this source
        for key, value in data.items():
            name = spellings.get(key, key)
            if name not in owners:
                raise ConfigError(f"{source}: unknown key {key!r}{_nearest(key, list(owners))}")
            if key != name and value is None:
                continue
            if name in keys:
                raise ConfigError(f"{source}: keys {keys[name]!r} and {key!r} both set option {name!r}; keep one")
            keys[name] = key
            value = _coerce(key, value, owners[name][1], source)
            values[name] = synonyms[name].get(value, value) if name in synonyms else value
    values.update(cli)

    instances = []
    for cls in option_classes:
        own = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        instance = cls(**own)
        _check_choices(instance)
        instances.append(instance)
    return instances[0] if len(instances) == 1 else tuple(instances)


def _check_choices(instance: Any) -> None:
    for field in dataclasses.fields(instance):
        choices = field.metadata.get("choices")
        value = getattr(instance, field.name)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if choices and v is not None and v not in choices]
        if bad:
            raise ConfigError(f"option {field.name!r}: {bad[0]!r} is not one of {list(choices)}")
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()


def options_dict(*instances: Any) -> dict:
    merged: dict[str, Any] = {}
    for instance in instances:
        merged.update(dataclasses.asdict(instance))
    return merged


def save_config(path: str | os.PathLike, *instances: Any) -> Path:
    """Write the resolved options as JSON (atomically); loadable again with ``--config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(options_dict(*instances), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
