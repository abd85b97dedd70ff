"""Command-line layer: parse arguments, call one library function per command."""

from histodetect.cli.main import main

__all__ = ["main"]
