"""CLI: ``python -m train --config mnist_mlp --method srigl --sparsity 0.9 --steps 500 --workdir DIR``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from train.configs import CONFIGS, METHODS, Config, get_config


def _parse_value(field: dataclasses.Field, text: str):
    """Convert a CLI string to the field's type (JSON for dicts/tuples, 'none' for optional values)."""
    hint = str(field.type)
    if text.lower() in ("none", "null") and "None" in hint:
        return None
    if hint.startswith("bool"):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"--{field.name} expects true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if hint.startswith("int"):
        return int(text)
    if hint.startswith("float"):
        return float(text)
    if hint.startswith("dict") or hint.startswith("tuple"):
        value = json.loads(text)
        return tuple(value) if hint.startswith("tuple") else value
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", description="Train a sparse network with SRigL / RigL / SET / static / dense. "
        "Every --field overrides that field of the chosen --config preset (see train/configs.py).")
    parser.add_argument("--config", default="mnist_mlp", choices=sorted(CONFIGS),
                        help="recipe preset (default: mnist_mlp)")
    for field in dataclasses.fields(Config):
        if field.name == "name":
            continue
        flag = "--" + field.name.replace("_", "-")
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "metavar": field.name.upper(),
                  "type": (lambda f: (lambda s: _parse_value(f, s)))(field)}
        if field.name == "method":
            kwargs.update(choices=METHODS, metavar=None, type=str)
        parser.add_argument(flag, *([] if "_" not in field.name else ["--" + field.name]), **kwargs,
                            help=f"override {field.name}")
    return parser


def main(argv: typing.Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    name = args.pop("config")
    cfg = get_config(name, **args)
    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.loop import NonFiniteError, train
    from train.report import summary_text
    try:
        result = train(cfg)
    except (DataError, CheckpointError, NonFiniteError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print("\n" + summary_text(result.summary))
    if not result.summary["finished"]:
        print(f"\nstopped at step {result.summary['steps']} of {result.summary['total_steps']} "
              f"(checkpointed); run the same command without --stop-after to resume.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
