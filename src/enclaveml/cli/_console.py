"""Console output shared by the CLI commands: rich tables for claims and the simulation banner."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def simulation_banner(target: Console = err_console) -> None:
    """Print the warning that must accompany every use of the simulation TEE."""
    from enclaveml.attestation.simulation import SIMULATION_WARNING  # only loaded when simulation is in use

    target.print(Panel(f"[bold]{SIMULATION_WARNING}[/bold]", title="SIMULATION MODE", style="bold red"))


def claims_table(claims: dict[str, Any], title: str = "Verified claims") -> Table:
    """Render a claims dict (from ``Claims.to_dict``) as a two-column table."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("claim", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in claims.items():
        if key == "simulated" and value:
            table.add_row(key, "[bold red]YES: this evidence protects nothing[/bold red]")
            continue
        table.add_row(key, _show(value))
    return table


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(_show(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if value is None:
        return "-"
    return str(value)
