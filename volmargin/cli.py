"""The ``volmargin`` command line (Typer).

Each area keeps its commands in ``volmargin/commands/<area>.py``; this module only wires them.
Input errors exit with code 2 and a message naming the file, field and value.
"""

from __future__ import annotations

import logging
import os

import typer

from volmargin.commands import data as data_cmd

app = typer.Typer(
    name="volmargin",
    help="Volatility forecasts turned into margin parameters for crypto derivatives protocols.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # MLflow logs at INFO on its own handler (experiment created, signature validated ...): only with -v
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    logging.getLogger("mlflow").setLevel(logging.DEBUG if verbose else logging.WARNING)


app.add_typer(data_cmd.app, name="data", help="Load, check and prepare market data.")


def _optional(module: str) -> None:
    """Wire command modules that other areas provide (train, margin, run) when present."""
    import importlib

    try:
        mod = importlib.import_module(f"volmargin.commands.{module}")
    except ModuleNotFoundError as exc:  # area not built yet
        if exc.name != f"volmargin.commands.{module}":
            raise
        return
    mod.register(app)


for _m in ("train", "margin", "run", "serve", "stress"):
    _optional(_m)


if __name__ == "__main__":  # pragma: no cover
    app()
