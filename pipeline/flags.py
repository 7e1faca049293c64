"""CLI flags generated from a settings model, so a command and the recipe section built from the same model offer
the same options with the same defaults (`--w-bits` is `w_bits`, `--no-progress` turns `progress` off)."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from repq.errors import RepqError


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _literal_value(choices):
    def parse(text: str):
        for choice in choices:
            if str(choice) == text or (isinstance(choice, float) and _float_or_none(text) == choice):
                return choice
        return text  # argparse names the allowed choices

    return parse


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, config: type[BaseModel], *, exclude=(),
                     title: str | None = None, aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per field of ``config`` (less ``exclude``), typed from its annotation, with its description and
    default in the help. Flags left out of a command line leave their field at the model's default."""
    group = parser.add_argument_group(title) if title else parser
    for name, field in config.model_fields.items():
        if name in exclude:
            continue
        annotation, optional = _unwrap_optional(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = f" (default: {default})" if default not in (None, [], {}) else " (default: none)"
        help_text = (field.description or name.replace("_", " ")) + shown
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(annotation)
        names = (flag_name(name), *(aliases or {}).get(name, ()))
        if annotation is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin is Literal:
            choices = typing.get_args(annotation)
            kwargs.update(choices=list(choices), type=_literal_value(choices), metavar="{" + ",".join(
                str(c) for c in choices) + "}")
        elif origin is list:
            item = typing.get_args(annotation)[0]
            kwargs.update(nargs="+", action="extend", type=item if item in (int, float, str) else str)
            if typing.get_origin(item) is Literal:  # a list of choices: argparse names them on a bad one
                kwargs.update(choices=list(typing.get_args(item)), type=_literal_value(typing.get_args(item)))
        elif origin is dict:
            from repq.pipeline.recipe import parse_value

            kwargs.update(type=parse_value, metavar="{KEY: VALUE}")
        elif annotation in (int, float, str):
            kwargs.update(type=_optional(annotation) if optional else annotation,
                          metavar=annotation.__name__.upper())
        else:
            raise TypeError(f"{config.__name__}.{name}: no flag for {annotation!r}")
        group.add_argument(*names, **kwargs)


def config_from_args(args: argparse.Namespace, config: type[BaseModel], base: dict | None = None, *,
                     what: str = "setting", **fixed):
    """The settings the command line gives: ``base`` values, then the flags given, then ``fixed``; one-line
    errors for a bad value."""
    values = dict(base or {})
    values.update({name: getattr(args, name) for name in config.model_fields if hasattr(args, name)})
    values.update(fixed)
    return validate_config(config, values, what)


def validate_config(config: type[BaseModel], values: dict, what: str = "setting"):
    """``config(**values)`` with pydantic's error as one RepqError line that names the flag."""
    try:
        return config(**values)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(loc, config.model_fields, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(config.model_fields)}"
            raise RepqError(f"unknown {what} {loc!r}: {hint}") from None
        from repq.pipeline.recipe import error_detail

        where = f"{flag_name(loc)} ({what} {loc})" if loc else f"{what}s"
        raise RepqError(f"{where}: {error_detail(first)}") from None


DATA_HELP = "ImageFolder tree (train/ [val/ or test/]) or `digits`"
EPOCH_STATE = ("last.pt", "the last finished epoch")  # what train, substitute and qat save to resume from


def add_folder_command(parser: argparse.ArgumentParser, doc: str | None, *, source: tuple[str, str] | None = None,
                       out: str, resume: str = "continue from OUT/last.pt", data: str = DATA_HELP) -> None:
    """The flags every command writing an output folder shares: its input (``source``: flag, help), ``--data``,
    ``--out`` and ``--resume``; ``doc`` (the module's docstring) is the command's --help text."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = doc
    if source is not None:
        parser.add_argument(source[0], required=True, help=source[1])
    parser.add_argument("--data", default="digits", help=data)
    parser.add_argument("--out", required=True, help=out)
    parser.add_argument("--resume", action="store_true", help=resume)


def epoch_resume_hint(args: argparse.Namespace, argv: list[str]) -> tuple[str, list[str]]:
    """`resume_hint` of the commands that save OUT/last.pt each epoch (train, substitute, qat)."""
    from repq.pipeline.runfolder import resume_hint

    return resume_hint(args.out, *EPOCH_STATE, argv)
