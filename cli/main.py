"""`avatar-render`: one console script, one module per subcommand under `cli/commands/`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func` to the function
that runs it. Modules import their heavy dependencies (torch, ray) inside `func`, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("model_info", "render_one", "import_weights", "synth", "eval", "run", "serve", "submit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-render", description="Batch renderer of talking-avatar videos.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cli.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
