"""The `histodetect` command line: one program, a subcommand per job, help from docstrings.

Each command lives in the module of its group (``data``, ``train``, ``infer``, ``slides``,
``serve``, ``demo``) and registers itself with ``@command``; this module builds the parser
from them and runs one, turning user errors into one paragraph on stderr.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import warnings
from functools import partial
from pathlib import Path

from histodetect import __version__

# Imported for their @command registrations; each keeps its heavy imports inside the commands.
from histodetect.cli import data, demo, infer, serve, slides, train  # noqa: F401
from histodetect.cli.registry import COMMANDS, command, say
from histodetect.errors import HistodetectError, HistodetectWarning

__all__ = ["COMMANDS", "HELP_ORDER", "build_parser", "command", "main", "say"]

# The order of `histodetect --help`, the order of the work; commands not listed follow it.
HELP_ORDER = (
    "synth",
    "pack",
    "explore",
    "train",
    "evaluate",
    "predict",
    "explain",
    "report",
    "export",
    "lr-find",
    "augment-preview",
    "models",
    "serve",
    "view",
    "slide",
    "slide-eval",
    "slidesynth",
    "extract",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="histodetect",
        description="Find metastatic cancer in lymph-node histopathology patches (PCam/Kaggle).",
    )
    parser.add_argument("--version", action="version", version=f"histodetect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(COMMANDS, key=_help_position):
        func, configure = COMMANDS[name]
        doc = inspect.getdoc(func) or ""
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0].replace("%", "%%") if doc else None,  # argparse %-formats
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        configure(p)
        p.set_defaults(func=func)
    return parser


def _help_position(name: str) -> int:
    return HELP_ORDER.index(name) if name in HELP_ORDER else len(HELP_ORDER)


def _show_warning(command: str, default, message, category, *rest) -> None:
    """Our own warnings as one line, like errors; other libraries' warnings as usual."""
    if issubclass(category, HistodetectWarning):
        print(f"histodetect {command}: warning: {message}", file=sys.stderr)
    else:
        default(message, category, *rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one paragraph and exit non-zero."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the hook after the command
            warnings.showwarning = partial(_show_warning, args.command, warnings.showwarning)
            return args.func(args)
    except HistodetectError as exc:
        print(f"histodetect {args.command}: error: {exc}", file=sys.stderr)
        problems = getattr(exc, "problems", None)
        if problems and getattr(args, "out", None) is not None and args.command == "pack":
            report = Path(args.out).with_name(Path(args.out).name + ".problems.json")
            try:
                report.write_text(json.dumps(problems, indent=1))
                print(f"(the full list is in {report})", file=sys.stderr)
            except OSError:
                pass
        return exc.exit_code
    except BrokenPipeError:  # e.g. `histodetect models --all | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        return 0
    except KeyboardInterrupt:
        print(f"histodetect {args.command}: interrupted; run it again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
