"""Shared CLI plumbing: user errors exit 2 with one clear line, never a traceback."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

#: Exceptions that mean "the user's input is wrong": reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, TypeError)


def user_errors(func: F) -> F:
    """Decorator for CLI commands: turn input errors into ``exit 2`` with the message."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            err_console.print(f"[bold red]error:[/] {escape(str(msg))}", highlight=False, markup=True)
            logging.getLogger("volmargin").debug("input error", exc_info=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Rich progress bars, one per stage: yields ``progress(stage, done, total)`` for the jobs to call."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield progress
