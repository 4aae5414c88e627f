"""`specvlm train-draft`: train a draft for a target by online logit distillation.

    specvlm train-draft --data train.json --image-folder images/ --eval-data val.json --out runs/draft
    specvlm train-draft --data chats.json --out runs/draft --max-steps 30 --lr 3e-4   # small CPU run
    specvlm train-draft --data train.json --out runs/draft --resume latest
    torchrun --nproc_per_node=2 -m server.cli train-draft --data train.json --out runs/draft

Without `--target` the demo model is the target. The final draft lands in `<out>/draft`
and serves with `specvlm serve --model TARGET --draft <out>/draft`. Flags derive from
`TrainingConfig`, where each default is written once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path

logger = logging.getLogger(__name__)

COMMAND = "train-draft"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `TrainingConfig` field; an unset flag keeps the field's default."""
    from draft_models.training.config import TrainingConfig

    for name, info in TrainingConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        required = info.is_required()
        help_text = info.description
        if required:
            help_text += " (required)"
        elif info.default is not None:
            help_text += f" (default: {info.default})"
        annotation = info.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if annotation is bool or (args and args[0] is bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
        choices = list(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else None
        value_type = annotation if annotation in (int, float, str) else str
        parser.add_argument(
            flag, dest=name, type=value_type, choices=choices, default=None, required=required,
            metavar=_metavar(name, value_type, choices), help=help_text,
        )


# Fields that name files or folders, shown as PATH in the help.
_PATH_FIELDS = {"target", "data", "image_folder", "eval_data", "out", "init_from", "resume"}
_DESCRIPTION_TAIL = (
    "The final draft is written to OUT/draft; checkpoints, metrics.jsonl and mal.png go to OUT. "
    "Run it under torchrun to train on several processes."
)


def _metavar(name: str, value_type: type, choices) -> str | None:
    if choices:
        return None
    if name in _PATH_FIELDS:
        return "PATH"
    return {int: "N", float: "X"}.get(value_type)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `train-draft` subcommand."""
    parser = subparsers.add_parser(
        COMMAND,
        help="train a draft for a target (online logit distillation)",
        description="Train a draft for a target by online logit distillation. " + _DESCRIPTION_TAIL,
    )
    _add_config_flags(parser)
    parser.set_defaults(handler=run_train_draft_command)
    return parser


def _missing_path_error(config) -> str | None:
    """Return a one-line error for the first input path that does not exist, else None."""
    checks = [("--data", path, Path.is_file) for path in config.data_files()]
    checks += [
        ("--eval-data", config.eval_data, Path.is_file),
        ("--image-folder", config.image_folder, Path.is_dir),
        ("--target", config.target, Path.is_dir),
        ("--init-from", config.init_from, Path.is_dir),
    ]
    for flag, value, exists in checks:
        if value is not None and not exists(Path(value)):
            kind = "file" if exists is Path.is_file else "folder"
            return f"{flag} {value}: {kind} not found"
    return None


def _describe_problem(item: dict) -> str:
    message = item["msg"].removeprefix("Value error, ")
    if not item["loc"]:
        return message
    return "--" + "-".join(str(part) for part in item["loc"]).replace("_", "-") + ": " + message


def run_train_draft_command(args: argparse.Namespace) -> int:
    """Run `specvlm train-draft`; return 0, or 1 after a one-line error on stderr."""
    from pydantic import ValidationError

    from draft_models.training.config import TrainingConfig
    from server.cli import setup_logging

    given = {name: getattr(args, name) for name in TrainingConfig.model_fields if getattr(args, name, None) is not None}
    try:
        config = TrainingConfig(**given)
    except ValidationError as invalid:
        problems = "; ".join(_describe_problem(item) for item in invalid.errors())
        print(f"specvlm {COMMAND}: error: invalid setting ({problems})", file=sys.stderr)
        return 2
    setup_logging("info")
    error = _missing_path_error(config)
    if error is not None:
        print(f"specvlm {COMMAND}: error: {error}", file=sys.stderr)
        return 1
    try:
        train(config)
    except (FileNotFoundError, ValueError) as failure:
        print(f"specvlm {COMMAND}: error: {failure}", file=sys.stderr)
        return 1
    return 0


def train(config):
    """Load the target, run the training that `config` (a `TrainingConfig`) describes, and return its `TrainingResult`."""
    from draft_models.training.distributed import start_processes, stop_processes
    from draft_models.training.trainer import DraftTrainer
    from server.engine.target import TargetModel

    context = start_processes(config.device)
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        target_path = config.target
        if target_path is None:
            from server.demo_model import ensure_demo_model

            target_path = ensure_demo_model().target
        target = TargetModel(target_path, dtype=config.teacher_dtype, device=str(context.device))
        return DraftTrainer(config, target, context).run()
    finally:
        stop_processes(context)
