"""The ``enclaveml`` command line: one small module per command group."""

from __future__ import annotations

import logging

import typer

from enclaveml import __version__
from enclaveml.cli import attest, fl, kbs, quantize, seal, serve, vfl

app = typer.Typer(
    name="enclaveml",
    help="Confidential machine learning on trusted execution environments.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(attest.app, name="attest")
app.add_typer(kbs.app, name="kbs")
app.add_typer(fl.app, name="fl")
app.add_typer(vfl.app, name="vfl")
app.command("seal")(seal.seal)
app.command("unseal")(seal.unseal)
app.command("quantize")(quantize.quantize)
app.command("serve")(serve.serve)
app.command("serve-worker")(serve.serve_worker)
app.command("predict")(serve.predict)


@app.command("demo")
def demo(quiet: bool = typer.Option(False, help="Only print the final verdict.")) -> None:
    """Show a simulated workload attesting end to end (collect, verify, appraise, RA-TLS)."""
    # Imported on use: the demo is built on the simulation backend, which nothing else loads.
    from enclaveml.cli._console import console
    from enclaveml.cli.demo import run_demo

    console.quiet = quiet
    try:
        run_demo()
    finally:
        console.quiet = False


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
