"""Options declared once on a config dataclass, read by the docstring, the API and the command line.

A field made with :func:`option` carries its help text and, unless ``cli=False``, the command-line flag
it becomes (``--class-word`` for ``class_word``). :func:`document` appends an ``Args:`` section built
from those help texts and defaults to the class docstring; :func:`add_options` adds the flags to an
``argparse`` parser with their defaults taken from the field; :func:`given_options` returns only the
options the user gave, so that every default comes from the dataclass itself.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Optional, Sequence


def option(default: Any, help: str, *, type: Optional[type] = None, choices: Optional[Sequence] = None,
           flag: Optional[str] = None, action: Optional[str] = None, cli: bool = True) -> Any:
    r"""A dataclass field with its documentation and command-line spelling.

    Args:
        default: the default value (immutable).
        help (`str`): one line; ``" (default X)"`` is appended unless the default is None or False.
            A None default should say in ``help`` what it stands for.
        type (`type`, *optional*): the argparse ``type`` (defaults to the default's type).
        choices (`Sequence`, *optional*): accepted values.
        flag (`str`, *optional*): the flag, defaults to ``--field-name``.
        action (`str`, *optional*): argparse ``action`` (``"append"``); a False bool default becomes
            ``store_true``.
        cli (`bool`, *optional*, defaults to True): whether the option is a command-line flag.
    """
    meta = dict(help=help, type=type, choices=choices, flag=flag, action=action, cli=cli)
    return dataclasses.field(default=default, metadata={"option": meta})


def _options(cls) -> list:
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata]


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["option"]["help"]
    if f.default is None or f.default is False:
        return text
    if isinstance(f.default, tuple):
        shown = ", ".join(map(str, f.default))
    elif isinstance(f.default, str) and " " in f.default:
        shown = repr(f.default)
    else:
        shown = str(f.default)
    return f"{text} (default {shown})"


def document(cls):
    """Class decorator: append an ``Args:`` section listing every option field to ``cls.__doc__``."""
    lines = ["", "    Args:"]
    for f in _options(cls):
        lines.append(f"        {f.name} (`{f.type}`): {_help(f)}.")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"
    return cls


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of an option field."""
    return f.metadata["option"]["flag"] or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add a flag to ``parser`` for every command-line option field of the dataclass ``cls``.

    A flag the user does not give leaves no attribute (``argparse.SUPPRESS``): the dataclass default
    applies. ``--help`` shows that default.
    """
    for f in _options(cls):
        meta = f.metadata["option"]
        if not meta["cli"]:
            continue
        help_text = _help(f).replace("%", "%%")  # a bare '%' would start an argparse format
        kwargs: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.default is False:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta["type"] or type(f.default)
            if meta["flag"]:
                kwargs["metavar"] = meta["flag"].lstrip("-").replace("-", "_").upper()
            if meta["action"]:
                kwargs["action"] = meta["action"]
            if meta["choices"]:
                kwargs["choices"] = tuple(meta["choices"])
        parser.add_argument(flag_name(f), **kwargs)


def given_options(args: argparse.Namespace, cls) -> Dict[str, Any]:
    """The options of ``cls`` the user gave on the command line, by field name."""
    return {f.name: getattr(args, f.name) for f in _options(cls) if hasattr(args, f.name)}


def check_option_names(options: Dict[str, Any], cls, what: str) -> None:
    """``TypeError`` naming the keys of ``options`` that are not fields of ``cls``."""
    unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")


__all__ = ["option", "document", "add_options", "given_options", "flag_name", "check_option_names"]
