"""Command-line flags generated from a dataclass of defaults, so a config has one source.

Each field becomes `--field-name`; `metadata={"help": ..., "choices": ...}` documents it.
The resolved dataclass is what the scripts write next to their outputs (training.record_config).
"""

import argparse
import dataclasses
import sys
import typing

from foundation.errors import UserError


def _argument_type(annotation):
    """The callable argparse should use for a field annotated `T` or `T | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def build_parser(config_class, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind = _argument_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            # a default chosen from the data is said in the help's own words, once
            said = "(default:" in help_text
            parser.add_argument(
                flag, type=kind, default=default, choices=field.metadata.get("choices"),
                help=help_text if said else f"{help_text} (default: {default})",
            )
    return parser


def refuse_renamed_flags(config_class, argv) -> None:
    """A flag that was renamed (`RENAMED_FLAGS = {"--old": "--new"}` on the config class) gets one
    sentence pointing to its new name, instead of argparse's "unrecognized arguments"."""
    renamed = getattr(config_class, "RENAMED_FLAGS", {})
    for argument in argv or []:
        old = argument.split("=", 1)[0]
        if old in renamed:
            raise UserError(f"{old} was renamed {renamed[old]}; use {renamed[old]} (one flag name, one meaning)")


def parse_config(config_class, argv=None, description: str = ""):
    """Parse argv into an instance of `config_class` (argparse reports unknown or bad flags)."""
    refuse_renamed_flags(config_class, sys.argv[1:] if argv is None else argv)
    args = build_parser(config_class, description).parse_args(argv)
    return config_class(**vars(args))

