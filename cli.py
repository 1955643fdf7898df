"""Command lines generated from dataclasses.

Each script (the examples, the benchmarks) declares its flags as one dataclass: one field per flag,
with a default (or none, for a required flag) and a one-line help text in ``metadata["help"]``.
``parse_dataclass_args`` turns that dataclass into an argparse parser and returns a filled instance,
so the flags, their types, defaults and ``--help`` lines cannot drift apart.

Supported field types: ``int``, ``float``, ``str``, ``pathlib.Path``, ``bool``, ``Literal[...]``
(choices), ``list[T]`` (one or more values) and ``Optional[T]`` / ``T | None`` of any of those
(an Optional flag also takes ``none``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_SCALAR_TYPES = (int, float, str, Path)
_TRUE_WORDS = ("true", "yes", "1", "on")
_FALSE_WORDS = ("false", "no", "0", "off")


class UserInputError(ValueError):
    """The user's flags or files cannot work; the message says what went wrong and what to do.

    The scripts print it as one ``error: ...`` line instead of a traceback.
    """


def looks_like_local_path(text: str) -> bool:
    """Whether a ``*_path_or_name`` flag value is meant as a local path rather than a hub id.

    Hub ids are ``name`` or ``owner/name``; anything starting with ``.``, ``/`` or ``~``, holding
    more than one ``/``, a backslash, or ending in a file extension such as ``.json`` is a path.
    Callers use it to say "no such file" instead of trying (and failing) to reach a hub.
    """
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    return Path(text).suffix.lower() in {".json", ".jsonl", ".txt", ".text", ".parquet", ".csv", ".arrow",
                                         ".gz", ".bz2", ".xz", ".zst", ".safetensors", ".bin", ".model"}


def parse_bool(text: str) -> bool:
    """Parse a command-line truth value: true/yes/1/on or false/no/0/off, any case."""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """Return (inner type, whether None is allowed) for ``Optional[X]`` / ``X | None``."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported union type {annotation!r}: only Optional[X] is allowed")
        return members[0], True
    return annotation, False


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


def _none_or(convert: Any) -> Any:
    """Wrap an argparse type so that an Optional flag also accepts ``none`` to mean None."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in errors
    return parse


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _scalar_argparse_type(annotation: Any, where: str) -> tuple[Any, tuple[Any, ...] | None]:
    """Return (argparse ``type=`` callable, choices) for a non-list, non-bool annotation."""
    choices = _literal_choices(annotation)
    if choices is not None:
        kinds = {type(choice) for choice in choices}
        if len(kinds) != 1 or next(iter(kinds)) not in (int, float, str):
            raise TypeError(f"{where}: Literal choices must all be int, float or str, got {choices!r}")
        return next(iter(kinds)), choices
    if annotation in _SCALAR_TYPES:
        return annotation, None
    raise TypeError(f"{where}: unsupported type {annotation!r}; use int, float, str, Path, bool, "
                    f"Literal[...], list[...] or Optional of one of them")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """Build an argparse parser with one ``--<field name>`` flag per field of dataclass ``cls``.

    Fields without a default become required flags. A bool field ``x`` accepts ``--x``,
    ``--x true|false`` and ``--no-x``. The help line is ``metadata["help"]`` plus the default,
    unless the help already mentions one.
    Raises TypeError if a field has no help text or a type this module cannot parse.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if description is None:
        doc = cls.__doc__ or ""
        # dataclass() writes a signature-like __doc__ when the class has none; do not show that.
        description = None if doc.startswith(f"{cls.__name__}(") else doc.strip()
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(cls)

    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        where = f"{cls.__name__}.{field.name}"
        help_text = field.metadata.get("help")
        if not help_text:
            raise TypeError(f"{where} has no help text; declare it as "
                            f"field(default=..., metadata={{'help': 'one line saying what it does'}})")
        annotation, optional = _strip_optional(hints[field.name])
        default = _default_of(field)
        required = default is dataclasses.MISSING
        # argparse %-formats help strings, so a literal % must be doubled.
        help_line = help_text.replace("%", "%%")
        if not required and "default" not in help_text.lower():  # the help already says it
            help_line += f" (default: {default})".replace("%", "%%")
        flag = f"--{field.name}"

        if annotation is bool:
            if required:
                raise TypeError(f"{where}: a bool flag needs a default")
            parser.add_argument(flag, dest=field.name, nargs="?", const=True, default=default,
                                type=parse_bool, metavar="true|false", help=help_line)
            parser.add_argument(f"--no-{field.name}", dest=field.name, action="store_false",
                                help=f"same as {flag} false")
            continue

        kwargs: dict[str, Any] = {"dest": field.name, "help": help_line, "required": required}
        if not required:
            kwargs["default"] = default
        if typing.get_origin(annotation) is list:
            (item,) = typing.get_args(annotation)
            kwargs["nargs"] = "+"
            annotation = item
        arg_type, choices = _scalar_argparse_type(annotation, where)
        if choices is not None:
            kwargs["choices"] = (*choices, None) if optional else choices
            kwargs["metavar"] = "{" + ",".join(str(choice) for choice in choices) + "}"
        kwargs["type"] = _none_or(arg_type) if optional else arg_type
        parser.add_argument(flag, **kwargs)
    return parser


def parse_dataclass_args(cls: type[T], argv: Sequence[str] | None = None,
                         description: str | None = None) -> T:
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of dataclass ``cls``.

    Every field is a flag named after it (see ``build_parser``); the instance is built with
    ``cls(**values)``, so ``__post_init__`` checks run. Bad flags exit with argparse's usage message.
    """
    parser = build_parser(cls, description)
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return cls(**vars(namespace))
