"""The table of subcommands (filled by the ``@command`` decorator) and how commands print."""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``func`` as subcommand ``name``; its docstring becomes the help text."""

    def wrap(func: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (func, configure)
        return func

    return wrap


def say(text: str) -> None:
    """Print one line of a command's result at once (flushed: progress shows while it runs)."""
    print(text, flush=True)
