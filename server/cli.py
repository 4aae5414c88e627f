"""The `specvlm` command line.

    specvlm serve                      # the demo model on 127.0.0.1:8000
    specvlm generate --image cat.jpg --prompt "What is in the picture?"
    specvlm demo-model --print-paths   # build (or find) the demo checkpoint

Flags of `serve` and `generate` are derived from `server.config.ServerConfig`, so each
default is written once, there.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing

from pydantic import ValidationError

from server import __version__
from server.config import ServerConfig


def add_config_flags(parser: argparse.ArgumentParser, fields: list[str] | None = None) -> None:
    """Add one flag per `ServerConfig` field; unset flags fall back to env vars and defaults."""
    for name, info in ServerConfig.model_fields.items():
        if fields is not None and name not in fields:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        help_text = f"{info.description} (default: {info.default}; env SPECVLM_{name.upper()})"
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = None
        value_type: typing.Any = str
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            choices = list(args)
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            value_type = inner[0] if inner and inner[0] in (int, float, str) else str
        elif annotation in (int, float, str):
            value_type = annotation
        parser.add_argument(flag, dest=name, type=value_type, choices=choices, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the config from the flags that were given, then env vars, then defaults."""
    given = {
        name: getattr(args, name)
        for name in ServerConfig.model_fields
        if getattr(args, name, None) is not None
    }
    return ServerConfig(**given)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specvlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"specvlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)

    from draft_models.training import cli as train_draft
    from server import demo_model, generate, self_distill, serve

    serve.add_parser(subparsers)
    generate.add_parser(subparsers)
    demo_model.add_parser(subparsers)
    self_distill.add_parser(subparsers)
    train_draft.add_parser(subparsers)
    from server.bench import cli as bench

    bench.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ValidationError as error:
        problems = "; ".join(
            f"--{'-'.join(str(part) for part in item['loc']).replace('_', '-')}: {item['msg']}"
            for item in error.errors()
        )
        parser.exit(2, f"specvlm {args.command}: error: invalid setting ({problems})\n")


if __name__ == "__main__":
    sys.exit(main())
