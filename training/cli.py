"""Command line of `synthd-train`.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so one command
never pays for (or breaks on) another's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("training.demo_data", "synthesise the built-in demo set of one-shots"),
    "prepare": ("training.prepare", "turn a folder of audio files into a training set"),
    "train": ("training.train", "train a causal VAE on a prepared set"),
    "export": ("training.export", "export a trained run as a TorchScript model file"),
    "analyze": ("training.analyze", "measure what each control does and name it"),
    "evaluate": ("training.evaluate", "write an evaluation report for a model or run"),
    "demo": ("training.demo", "the main job on the built-in demo data, end to end"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="synthd-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = "__none__"  # help or an error: no module needs importing
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
