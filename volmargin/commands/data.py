"""``volmargin data ...`` commands (list, prepare, quality). Owned by the data-pipelines work."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
