"""User-facing error types: one clear paragraph, no traceback."""

from __future__ import annotations


class HistodetectError(Exception):
    """An error the user can act on; the CLI prints its message and exits non-zero."""

    exit_code = 2


class HistodetectWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints one line."""


class BadInputError(HistodetectError):
    """Input data is unusable; ``problems`` lists ``(path_or_id, reason)`` pairs."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = problems or []
        super().__init__(message)


def describe_problems(problems: list[tuple[str, str]], limit: int = 10) -> str:
    """Render the first ``limit`` problems as indented lines, with a count of the rest."""
    lines = [f"  - {where}: {why}" for where, why in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
