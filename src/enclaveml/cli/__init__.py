"""The ``enclaveml`` command line: one small module per command group."""

from __future__ import annotations

import logging
import sys

import typer

from enclaveml import __version__
from enclaveml.cli import attest, fl, kbs, quantize, seal, serve, vfl
from enclaveml.cli.serve import EXIT_USAGE

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
    from enclaveml.cli._signals import unwind_on_sigterm
    from enclaveml.cli.demo import run_demo

    console.quiet = quiet
    try:
        with unwind_on_sigterm():  # its working directory is removed on the way out
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


_CLICK_USAGE_ERROR = 2


def main() -> None:
    """Console-script entry point.

    Exit codes are the CLI's own (0 done, 1 refused, 2 failed, 3 bad arguments or setup), so a
    usage error that click would answer with 2 (an unknown option, a missing argument) exits 3:
    a script must be able to tell it from "the evidence failed verification". (typer bundles its
    own click, whose exception classes are not public: they are recognised by their ``show`` and
    ``exit_code``, 2 being click's code for usage errors.)
    """
    try:
        result = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except Exception as exc:
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if not callable(show) or not isinstance(code, int):
            raise
        show()
        sys.exit(EXIT_USAGE if code == _CLICK_USAGE_ERROR else code)
    sys.exit(result if isinstance(result, int) else 0)
