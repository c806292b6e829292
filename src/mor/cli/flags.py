"""Flags generated from a settings dataclass (``TrainConfig``, ``AdapterSpec``): one flag per field,
named after it, with its default, help text and choices from the field's metadata; and the
dataclass built back from the parsed flags. The settings stay the one source."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from ..train.config import flag_name


def add_settings_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` that has a help text (fields with ``flag=None`` have none)."""
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        meta = item.metadata
        if item.name in skip or "help" not in meta or ("flag" in meta and meta["flag"] is None):
            continue
        default = item.default if item.default is not MISSING else item.default_factory()
        kind = _plain_type(hints[item.name])
        flag = flag_name(cls, item.name)
        help_text = meta["help"]
        if kind is bool and default is None:  # on, off, or left to the run to decide
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action="store_false" if default else "store_true",
                                help=help_text)
            continue
        if default not in (None, [], "", {}) and "default" not in help_text:
            help_text += f" (default: {default})"
        if kind is list:
            parser.add_argument(flag, dest=item.name, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=item.name, type=meta.get("parse", kind), default=default,
                                choices=meta.get("choices"), help=help_text)


def settings_from_args(cls, args: argparse.Namespace, **extra) -> Any:
    """``cls`` from the parsed flags (fields without a flag keep their default) and ``extra``."""
    values = {item.name: getattr(args, item.name) for item in fields(cls) if hasattr(args, item.name)}
    return cls(**{**values, **extra})


def _plain_type(hint) -> type:
    """bool, int, float, str or list for a field's annotation (``Optional[X]`` is X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _plain_type(args[0]) if len(args) == 1 else str
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint
