"""The ``enclaveml`` command line: one small module per command group."""

from __future__ import annotations

import logging

import typer

from enclaveml import __version__
from enclaveml.cli import attest, demo

app = typer.Typer(
    name="enclaveml",
    help="Confidential machine learning on trusted execution environments.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(attest.app, name="attest")
app.command("demo")(demo.demo)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command("version")
def version() -> None:
    """Print the enclaveml version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
